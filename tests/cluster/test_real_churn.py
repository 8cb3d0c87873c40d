"""Faults on real peers: the simulator's fault trace kills and restarts real swarm peers, and the lone-restart guard.

The first tests start nothing: the trace the real mode plays is the simulator's draw, and the experiment file refuses
what real swarm peers do not play. Then hivemind in this process: a peer restarted alone never serves or trains its
fresh weights and loads the state of the peer that comes back; a swarm arm's averagers refuse a peer without the run
secret (each 16-22 s on a 2-core machine under a load average of 13-20). Last, 3 real peers on Ray over loopback, one
SIGKILLed mid-run and restarted (115-140 s under that load, most of it starting Ray, the actors and the new actor).
The driver itself, while a peer restarts, is tested without peers in `test_real_restart.py`.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from cluster.faults import FaultTrace, parse_faults
from cluster.real.swarm_churn import SwarmChurn
from experiments.fields import ConfigError
from realtools import SECRET, donors, swarm_peer

# --- the trace, without peers ------------------------------------------------------------------------------------
class _Peers:
    def __init__(self):
        self.killed: list[int] = []

    def kill(self, worker: int, method: str) -> None:
        assert method == "crash"
        self.killed.append(worker)


def _plan(n: int, tokens_per_step: int = 10):
    from cluster.devices import get_device
    from cluster.driver import ArmPlan
    from cluster.real.options import UNSHAPED
    from cluster.network import Network

    return ArmPlan(name="trace", n_workers=n, network=Network(links=(UNSHAPED,) * n),
                   devices=(get_device("laptop-cpu"),) * n, speed_factors=(1.0,) * n, codec="none", total_steps=10,
                   tokens_per_step=tokens_per_step, eval_every_steps=10, seed=11)


def test_real_peers_fail_and_return_on_the_simulators_seeded_trace():
    n, poll_s, until_s = 3, 0.25, 120.0
    faults = parse_faults("faults", {"mtbf": "30s", "mttr": "5s"}, n)
    plan = _plan(n)
    peers = _Peers()
    restarted: list[tuple[int, int, list]] = []
    records: list = []
    churn = SwarmChurn(faults, plan, peers, lambda w, k, initial, clock: restarted.append((w, k, initial)) or {},
                       records.append)
    live = list(range(n))
    for tick in range(int(until_s / poll_s) + 1):  # the driver's polls
        now = tick * poll_s
        for w in churn.leaving(live, now, tokens=0):
            churn.kill(w, now, epoch=tick, lost_s=0.5)
            live.remove(w)
        for w in churn.returning(now, tokens=0):
            churn.restart(w, now, tick, [f"/peer/{x}" for x in live], lambda: now).result()
            live.append(w)
    churn.close()
    # The same draw as the simulator's: each outage acted on at the first poll at or after its time (a failure due
    # at the poll that brings the worker back waits for the next: failures are handled first).
    trace = FaultTrace(faults, n, plan.seed)
    expected = []
    for w in range(n):
        i, back_tick = 0, -1
        while (o := trace.outage(w, i)).leave <= until_s:
            leave_tick = max(int(np.ceil(o.leave / poll_s)), back_tick + 1)
            expected.append((w, "leave", leave_tick * poll_s, o.back))
            back_tick = max(int(np.ceil(o.back / poll_s)), leave_tick + 1)
            if back_tick * poll_s <= until_s:
                expected.append((w, "return", back_tick * poll_s, None))
            i += 1
    got = [(r.worker, r.event, r.time_s, r.back_s) for r in records]
    assert sorted(got) == sorted(expected) and len(got) > 2 * n
    assert all(r.cause == "mtbf" and r.lost_s == 0.5 for r in records if r.event == "leave")
    assert peers.killed == [r.worker for r in records if r.event == "leave"]
    # Every return is a new incarnation of that worker, joining through the peers live at that moment.
    returns = [r for r in records if r.event == "return"]
    assert [(w, k) for w, k, _ in restarted] == [(r.worker, sum(q.worker == r.worker for q in returns[:i + 1]))
                                                 for i, r in enumerate(returns)]
    assert all(f"/peer/{w}" not in initial for w, _, initial in restarted)


def test_a_written_trace_by_steps_counts_the_swarms_tokens():
    faults = parse_faults("faults", {"events": [{"worker": 1, "leave_step": 4, "return_step": 6}]}, 2)
    records: list = []
    churn = SwarmChurn(faults, _plan(2, tokens_per_step=100), _Peers(), lambda *a: {}, records.append)
    assert churn.leaving([0, 1], 1e9, tokens=399) == []
    assert churn.leaving([0, 1], 0.0, tokens=400) == [1]
    churn.kill(1, 12.0, epoch=3, lost_s=0.0)
    assert records[-1].back_step == 6 and records[-1].back_s is None
    assert churn.returning(1e9, tokens=599) == [] and churn.returning(0.0, tokens=600) == [1]


def test_the_experiment_file_takes_failures_and_returns_on_real_swarm_arms():  # lockstep: test_real_lockstep_churn
    from experiments.spec import parse_spec

    def spec(algorithm, faults):
        return parse_spec({"run": {"mode": "real", "workers": 4, "tokens": 4096}, "model": {"preset": "tiny"},
                           "faults": faults, "arm": [{"name": "a", "algorithm": algorithm,
                                                      "network": "home-broadband"}]})

    events = {"events": [{"worker": 3, "leave_s": 5, "return_s": 9}]}
    assert spec("collaborative", events).arms[0].faults.events[0].back == 9.0
    assert spec("local-updates", {"mtbf": "1min", "mttr": "10s"}).arms[0].faults.mtbf_s == 60.0
    with pytest.raises(ConfigError, match=r"^faults\.sender_timeout: real peers time out as hivemind"):
        spec("collaborative", {**events, "sender_timeout": 5})


# --- hivemind in this process ------------------------------------------------------------------------------------
def _optimizer_params(peer) -> list:
    """A swarm peer's parameters as its hivemind optimizer holds them (and serves them), in the optimizer's order."""
    return [p for group in peer.opt.state_averager.optimizer.param_groups for p in group["params"]]


def _model_order(peer) -> list[int]:
    """For each of the model's parameters in order, its index in the optimizer's order."""
    main = list(peer.opt.state_averager.main_parameters)
    return [next(i for i, m in enumerate(main) if m is p) for p in peer.replica.model.parameters()]


@pytest.mark.hivemind
def test_a_peer_restarted_alone_never_serves_or_trains_its_fresh_weights():
    """Worker 1 restarts with fresh weights while no other peer is up; worker 0 comes back later holding the trained
    state (epoch 3). The restarted peer waits, then loads worker 0's state; worker 0 never sees its fresh weights."""
    from hivemind.averaging.averager import compute_schema_hash
    from realtools import unshaped_arm

    from cluster.real.secret import secret_schema_hash
    from cluster.real.swarm_setup import SwarmSetup
    from cluster.real.swarm_state import hold_state, parameters_digest
    from cluster.swarm_timing import SwarmTiming
    from trainer.strategies import STRATEGIES
    from trainer.strategies.collaborative import CollaborativeSettings

    settings = CollaborativeSettings(target_batch_size=16)
    _, specs = unshaped_arm("lone", 2, 20, seed=9, algorithm="collaborative", settings=settings)
    setup = SwarmSetup.of(STRATEGIES["collaborative"], settings, SwarmTiming(matchmaking_time=1.0,
                          averaging_timeout=10.0), 2, specs[0].batch_size, "none")
    run_id = "farflung-lone-test"
    fresh_peer = swarm_peer(specs[1], run_id, holds_state=False, incarnation=1)
    back = None
    try:
        fresh_peer.join(None)  # nobody else is up: its own DHT is the whole swarm
        fresh_peer.start_optimizer(setup, 3.0, None)
        fresh = fresh_peer.params()
        for averager in (fresh_peer.opt.state_averager, fresh_peer.opt.grad_averager):  # both bound to the secret
            assert averager.schema_hash == secret_schema_hash(compute_schema_hash(averager._averaged_tensors), SECRET)
        fresh_peer.start_clock()
        fresh_peer.start_training(120.0)
        time.sleep(3 * fresh_peer.RETRY_LOAD_S + 1.0)  # several attempts to find a donor, alone
        alone = fresh_peer.progress()
        assert (alone["holds_state"], alone["samples"], alone["epoch"], alone["records"]) == (False, 0, 0, [])
        assert np.array_equal(fresh_peer.params(), fresh)  # it trained nothing on its fresh weights
        me = fresh_peer.dht.peer_id.to_base58()
        assert donors(fresh_peer.dht, run_id).get(me) is None  # and is no donor

        # Worker 0 comes back with the trained state: its replica trained 3 steps on its own, at epoch 3. (It
        # offers the state once its epoch is set, so that no download can catch it before.)
        back = swarm_peer(specs[0], run_id, holds_state=False)
        for step in range(3):
            back.replica.forward_backward()
            back.replica.optimizer_step(step)
        trained = back.params()
        assert not np.allclose(trained, fresh)
        back.join(fresh_peer.visible_maddrs())
        back.start_optimizer(setup, 3.0, None)
        back.opt.state_averager.local_epoch = 3
        hold_state(back.opt)
        deadline = time.monotonic() + 60
        while not (joined := fresh_peer.progress())["holds_state"] and time.monotonic() < deadline:
            time.sleep(0.2)
        fresh_peer.stop()
        loaded = joined["loaded"]
        assert joined["holds_state"] and loaded is not None, joined
        load = loaded["load"]
        assert load.donor == back.dht.peer_id.to_base58() and load.epoch == 3
        # Parameters and AdamW's two moments, float32, and its step count per tensor: the trained peer's whole state.
        tensors = len(list(back.replica.model.parameters()))
        assert load.state_bytes == 3 * 4 * back.num_params() + 4 * tensors
        # What it loaded is bit for bit what worker 0 served: the parameters of worker 0's optimizer, which are its
        # trained ones (hivemind's virtual first step, with zero gradients, applied its weight decay to them).
        served = _optimizer_params(back)
        assert load.digest in back.served_digests() and load.digest == parameters_digest(served)
        flat = np.concatenate([served[i].detach().numpy().ravel() for i in _model_order(back)])
        assert np.allclose(flat, trained, rtol=1e-3, atol=1e-7) and not np.allclose(flat, fresh, atol=1e-3)
        assert np.array_equal(back.params(), trained) and back._loads == 0  # the fresh weights never reached it
        # Holding the state now, the restarted peer is a donor at the epoch it loaded.
        deadline = time.monotonic() + 30
        while donors(back.dht, run_id).get(me) != 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert donors(back.dht, run_id).get(me) == 3
    finally:
        fresh_peer.shutdown()
        if back is not None:
            back.shutdown()


@pytest.mark.hivemind
def test_a_swarm_arms_gradient_averagers_refuse_a_peer_without_the_secret():
    import hivemind
    import torch
    from hivemind.averaging.partition import AllreduceException

    from cluster.real.averager import SwarmGradientAverager

    local = ["/ip4/127.0.0.1/tcp/0"]
    dhts, averagers = [], []
    try:
        first = hivemind.DHT(start=True, host_maddrs=local)
        dhts.append(first)
        peers = [str(a) for a in first.get_visible_maddrs()]
        for i, value in enumerate((1.0, 3.0, 1000.0)):
            dht = first if i == 0 else hivemind.DHT(initial_peers=peers, start=True, host_maddrs=local)
            dhts.append(dht)
            param = torch.nn.Parameter(torch.zeros(64))
            param.grad = torch.full((64,), value)
            # The two insiders hold the secret; the third does not.
            a = SwarmGradientAverager([param], dht=dht, prefix="run_grad_averager", target_group_size=3,
                                      min_matchmaking_time=2.0, request_timeout=1.0, start=True,
                                      run_secret=SECRET if i < 2 else None)
            a.accumulate_grads_(batch_size=1)
            averagers.append(a)
        # The outsider looks for a group until its timeout; the insiders average within their first attempt.
        controls = [a.step(wait=False, timeout=6 if i == 2 else 30) for i, a in enumerate(averagers)]
        groups = [c.result() for c in controls[:2]]
        assert all(g is not None and len(g) == 2 for g in groups)
        assert averagers[2].peer_id not in groups[0]
        with pytest.raises(AllreduceException, match="could not find a group"):
            controls[2].result()
        for a in averagers[:2]:
            with a.get_tensors() as (averaged,):
                assert np.allclose(averaged.numpy(), 2.0)  # (1 + 3) / 2: the outsider's 1000 never got in
    finally:
        for a in averagers:
            a.shutdown()
        for dht in dhts[1:] + dhts[:1]:
            dht.shutdown()


# --- 4 real peers on Ray -----------------------------------------------------------------------------------------
@pytest.mark.ray
@pytest.mark.hivemind
def test_a_peer_sigkilled_mid_run_restarts_loads_the_state_and_trains_with_the_swarm(fresh_ray):
    """The last worker of a 3-peer collaborative swarm is SIGKILLed 2 s into training and comes back at 3 s (wall clock):
    a new actor with fresh weights rejoins through the DHT, loads the state and contributes to the epochs after."""
    from proctools import tagged_processes, wait_until_gone
    from realtools import unshaped_arm

    from cluster.real import RealOptions, run_real_arm
    from cluster.swarm_timing import SwarmTiming
    from experiments.fault_summary import fault_summary
    from trainer.model import GPT
    from trainer.strategies.collaborative import CollaborativeSettings

    n = 3
    gone, others_ = n - 1, list(range(n - 1))  # the peer that fails, and the ones that stay
    plan, specs = unshaped_arm("collab-churn", n, 10_000, seed=3, algorithm="collaborative",
                               settings=CollaborativeSettings(target_batch_size=16),
                               swarm=SwarmTiming(matchmaking_time=1.0, averaging_timeout=10.0, target_group_size=n))
    faults = parse_faults("faults", {"events": [{"worker": gone, "leave_s": 2, "return_s": 3}]}, n)
    records: list = []
    # The swarm's epoch as the driver sees it, and the epoch the restarted peer loaded. The driver may notice the
    # join only after the swarm has moved on (it polls every peer), so the stop counts from the loaded epoch E: once
    # the swarm is at E + 2, E + 1 is closed (the joiner's first whole epoch) and E + 2 is the last.
    # When the driver emitted the return, and when it polled (it asks `should_stop` at every poll while training).
    epoch, joined_at, returned_at, polls = [0], [None], [None], []

    def on_step() -> None:
        epoch[0] += 1

    def emit(record) -> None:
        records.append(record)
        if record.kind == "fault" and record.event == "join":
            joined_at[0] = record.step
        if record.kind == "fault" and record.event == "return":
            returned_at[0] = time.monotonic()

    def should_stop() -> bool:
        polls.append(time.monotonic())
        return joined_at[0] is not None and epoch[0] >= joined_at[0] + 2

    result = run_real_arm(plan, specs, emit, on_step=on_step, faults=faults,
                          options=RealOptions(shaping="none", swarm_timeout_s=300.0), should_stop=should_stop)

    left = wait_until_gone(fresh_ray, timeout_s=15.0)
    assert not left, f"processes outlived the run: {left}"
    assert tagged_processes(fresh_ray) == {}
    faults_seen = [r for r in records if r.kind == "fault"]
    assert [(r.worker, r.event) for r in faults_seen] == [(gone, "leave"), (gone, "return"), (gone, "join")], faults_seen
    leave, back, join = faults_seen
    # The new peer's clock starts when its start is done but for its training thread, so `wait_s` ends no later
    # than that: the driver polled on meanwhile (a driver that waited for the start would poll only after it).
    restarting = [t for t in polls if returned_at[0] < t < returned_at[0] + join.wait_s]
    print(f"left at {leave.time_s:.1f} s, back at {back.time_s:.1f} s, joined at {join.time_s:.1f} s (download "
          f"{join.download_s:.2f} s; started {join.wait_s:.1f} s after its return, {len(restarting)} of the "
          f"driver's polls meanwhile), stopped at {max(r.time_s for r in records):.1f} s")
    assert restarting
    assert leave.cause == "event" and leave.back_s == 3.0 and 2 <= leave.time_s < back.time_s < join.time_s
    assert back.time_s >= 3
    assert join.sources[0] in others_ and join.download_s > 0 and join.wait_s > 0
    model = GPT(specs[0].model)
    numel, tensors = sum(p.numel() for p in model.parameters()), len(list(model.parameters()))
    assert join.state_bytes == 3 * 4 * numel + 4 * tensors  # parameters, AdamW's two moments and step counts
    # What it loaded is bit for bit what its donor served.
    (load,) = result.state_loads
    assert (load.worker, load.donor, load.epoch) == (gone, join.sources[0], join.step) and load.exact, load
    # Epochs closed while it was away (or loading) are without it; it contributes to those after it joined. The
    # epoch in flight when it died may close only at the averaging timeout, after it joined: what is certain is
    # that the first epoch closed after it left is without it, and so is every one before it joined.
    comms = [r for r in records if r.kind == "comm"]
    shown = [(c.round, round(c.time_s, 2), c.participants) for c in comms]
    after_leave = [c for c in comms if c.time_s > leave.time_s]
    away = [c for c in after_leave if gone not in c.participants]
    assert away and after_leave[0] is away[0], shown
    assert all(c.participants == others_ and c.absent == [gone] for c in away), shown
    assert all(gone not in c.participants for c in after_leave if c.time_s < join.time_s), shown
    assert min(c.round for c in after_leave if gone in c.participants) >= join.step, (join.step, shown)
    later = [c for c in comms if c.round > join.step and gone in c.participants]
    assert later and all(c.samples[c.participants.index(gone)] > 0 for c in later), (join.step, shown)
    # It trains from the swarm's weights, not its fresh ones: its first epoch's loss is the swarm's.
    evals = [r for r in records if r.kind == "eval"]
    first = min((r for r in records if r.kind == "step" and r.worker == gone and r.step > join.step),
                key=lambda r: r.step)
    others = [r.loss for r in records if r.kind == "step" and r.step == first.step and r.worker != gone]
    assert abs(first.loss - np.mean(others)) < 0.2 and first.loss < evals[0].loss - 0.2, (first, others)
    assert evals[-1].loss < evals[0].loss - 0.3
    assert len(result.final_params) == n  # every peer holds the state at the end
    summary = fault_summary(records, n, max(r.time_s for r in records if r.kind in ("step", "comm")))
    assert (summary["failures"], summary["joins"]) == (1, 1) and summary["rounds_without_someone"] >= len(away)
    assert summary["time_in_state_downloads_s"] == join.download_s and 0 < summary["goodput"] < 1

