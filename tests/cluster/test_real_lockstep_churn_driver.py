"""Faults on real lockstep arms (ddp, diloco), without peers: the driver's membership, records and rounds, checked
against the simulator's `cluster.churn` on the same trace (the real peers: `test_real_lockstep_churn.py`).

Without peers, `_Peers` holds in-process replicas that answer the real peers' calls: an exchange is the exact mean of
the members' tensors, a state download is the donor's `export_state` (the real peer sends the same through hivemind).
"""

from __future__ import annotations

import numpy as np
import pytest

from cluster.churn import ChurnDriver, ChurnExchanges
from cluster.driver import average
from cluster.faults import parse_faults
from cluster.real.lockstep_churn import LockstepChurnDriver, LockstepMembers
from cluster.real.messages import MeasuredStep
from cluster.records import CommRecord, FaultRecord, StepRecord
from cluster.runtime import LocalRuntime
from trainer.replica import Replica, StepDone
from trainer.strategies.ddp import DDPSettings
from trainer.strategies.diloco import DiLoCoSettings

from simtools import TINY, TINY_DATA, TINY_OPTIM, SEED


def _specs(n: int, steps: int, algorithm: str, settings):
    from trainer.replica import ReplicaSpec

    return [ReplicaSpec(w, n, SEED, TINY, TINY_DATA, TINY_OPTIM, 2, steps, algorithm, settings, eval_batches=2)
            for w in range(n)]


def _plan(n: int, steps: int):
    from cluster.devices import get_device
    from cluster.driver import ArmPlan
    from cluster.network import build_network

    return ArmPlan(name="arm", n_workers=n, network=build_network("datacenter", n),
                   devices=(get_device("laptop-cpu"),) * n, speed_factors=(1.0,) * n, codec="none",
                   total_steps=steps, tokens_per_step=n * 2 * TINY.block_size, eval_every_steps=steps, seed=SEED)


class _Peer:
    """What the driver calls on a real lockstep peer, over an in-process replica."""

    def __init__(self, spec, holds_state: bool = True):
        self.replica, self.holds_state = Replica(spec), holds_state
        self.pending = self.reply = None
        self.next_step, self.members = 0, None

    def advance(self, until_step, reply=None, finish=False):
        out = self.replica.advance(until_step, self.reply, finish)
        self.reply = None
        events = [MeasuredStep(e.step, e.loss, e.flops, 0.5, 0.0) if isinstance(e, StepDone) else e for e in out]
        if out and not isinstance(out[-1], StepDone):
            self.pending = out[-1]
        for e in out:
            if isinstance(e, StepDone):
                self.next_step = e.step + 1
        return events

    def set_members(self, members, number, step):
        self.members = (tuple(members), number)

    def set_faults(self, faults):
        self.faults = faults

    def visible_maddrs(self):
        return [f"/peer/{id(self)}"]

    def params(self):
        return self.replica.params()

    def evaluate(self, flat=None):
        return self.replica.evaluate(flat)


class _Peers:
    def __init__(self, specs):
        self.specs = specs
        self.slots: list[_Peer | None] = [_Peer(s) for s in specs]
        self.killed: list[int] = []
        self.restarts: list[tuple[int, list[str]]] = []

    def call(self, method, args=None, workers=None, timeout_s=None):
        workers = range(len(self.slots)) if workers is None else workers
        args = args or [()] * len(workers)
        assert all(self.slots[w] is not None for w in workers), f"{method} called on a killed peer: {list(workers)}"
        if method == "load_state":
            return [self._load(w) for w in workers]
        return [getattr(self.slots[w], method)(*a) for w, a in zip(workers, args)]

    def kill(self, worker, method):
        assert method == "crash"
        self.slots[worker] = None
        self.killed.append(worker)

    def restart(self, worker, initial_peers, arm_clock_s):
        self.restarts.append((worker, initial_peers))
        self.slots[worker] = _Peer(self.specs[worker], holds_state=False)
        return {"dial_address": ("127.0.0.1", 1000 + worker)}

    def _load(self, w):
        donors = [p for p in self.slots if p is not None and p.holds_state]
        donor = donors[0]
        me = self.slots[w]
        nbytes = me.replica.import_state(donor.replica.export_state())
        me.replica._progress.step = me.next_step = donor.next_step
        me.holds_state = True
        return {"donor": self.slots.index(donor), "step": donor.next_step, "state_bytes": nbytes, "download_s": 0.25}


class _Exchanges:
    """`PeerExchanges`' side the driver uses, averaging the members' tensors exactly."""

    def __init__(self, peers, n):
        self.peers, self.members, self.round, self.now_s = peers, tuple(range(n)), 0, 0.0
        self.dial_addresses = [None] * n
        self.n = n
        self.failed, self.faults = {}, []  # the last round's failed members; every round's faults, as asked
        self.groups = (self.members,)

    def set_groups(self, groups):
        assert len(groups) == 1, "no partition here"
        self.groups, self.members = (tuple(groups[0]),), tuple(groups[0])

    def step_done(self, worker, event):
        self.now_s += 0.0
        return event.time_s, event.compute_s

    def exchange(self, requests, step, faults=None):
        # The members that fail are those asked to (the real one checks that hivemind's round went so); the rest
        # get the mean of every member's tensor (how hivemind's parts come out is the real test's to check).
        self.failed = dict(faults or {})
        if faults:
            self.faults.append((self.round, dict(faults)))
        tensors = [np.asarray(r.tensor, dtype=np.float32) for r in requests]
        mean = average(tensors, [r.weight for r in requests])
        for w in self.members:
            self.peers.slots[w].reply = mean.copy()
        absent = [w for w in range(self.n) if w not in self.members] or None
        record = CommRecord(arm="arm", round=self.round, group=0, step=step, collective="butterfly",
                            payload=requests[0].payload, participants=list(self.members), message_bytes=0, raw_bytes=0,
                            bytes_sent=[0] * len(self.members), bytes_received=[0] * len(self.members), comm_s=0.0,
                            blocking=True, idle_s=[0.0] * len(self.members), time_s=0.0, staleness=0, absent=absent)
        self.round += 1
        return [None] * len(requests), [record]

    def close(self):
        pass


def _real_driver(n, steps, algorithm, settings, faults):
    specs, plan = _specs(n, steps, algorithm, settings), _plan(n, steps)
    peers = _Peers(specs)
    records: list = []
    driver = LockstepChurnDriver(peers, plan, _Exchanges(peers, n), records.append,
                                 members=LockstepMembers(faults, plan), restart=peers.restart, load_timeout_s=5.0)
    driver.run()
    return peers, records, driver


def _simulated(n, steps, algorithm, settings, faults):
    specs, plan = _specs(n, steps, algorithm, settings), _plan(n, steps)
    records: list = []
    ChurnDriver(LocalRuntime(specs), plan, ChurnExchanges(plan, faults), records.append).run()
    return records


def _rounds(records):
    return [(c.step, tuple(c.participants), tuple(c.absent or ())) for c in records if isinstance(c, CommRecord)]


def _faults(records):
    return [(f.worker, f.event, f.step, f.back_step, f.cause) for f in records if isinstance(f, FaultRecord)]


def _exchange_faults(records):
    return [(f.worker, f.event, f.step, f.cause, f.phase, f.round, f.back_s) for f in records
            if isinstance(f, FaultRecord)]


@pytest.mark.parametrize("algorithm, settings", [("ddp", DDPSettings()), ("diloco", DiLoCoSettings(inner_steps=3))])
def test_the_real_driver_plays_a_trace_by_steps_as_the_simulator(algorithm, settings):
    """Worker 1 leaves at step 2 and returns at step 4; worker 2 leaves at step 5 for good (3 workers, 9 steps)."""
    n, steps = 3, 9
    faults = parse_faults("faults", {"events": [{"worker": 1, "leave_step": 2, "return_step": 4},
                                                {"worker": 2, "leave_step": 5}]}, n)
    peers, records, driver = _real_driver(n, steps, algorithm, settings, faults)
    sim = _simulated(n, steps, algorithm, settings, faults)
    # The same rounds with the same members, and the same leaves, returns and joins at the same steps.
    assert _rounds(records) == _rounds(sim)
    assert _faults(records) == _faults(sim)
    # By hand. ddp: a round every step; worker 1 sits out 2, 3 and 4 (back at 4, it loads at that round's end), and
    # worker 2 is gone from 5 on. diloco (H = 3): rounds at steps 2, 5 and 8 (none to close 9 steps).
    if algorithm == "ddp":
        assert _rounds(records) == ([(s, (0, 1, 2), ()) for s in (0, 1)] + [(s, (0, 2), (1,)) for s in (2, 3, 4)]
                                    + [(s, (0, 1), (2,)) for s in (5, 6, 7, 8)])
        assert _faults(records) == [(1, "leave", 2, 4, "event"), (1, "return", 4, None, None),
                                    (1, "join", 4, None, None), (2, "leave", 5, None, "event")]
    else:
        # Worker 1 is due back at step 4 but returns at the next round (step 5), which it sits out, and worker 2
        # has left before it: worker 0 averages alone there.
        assert _rounds(records) == [(2, (0, 2), (1,)), (5, (0,), (1, 2)), (8, (0, 1), (2,))]
        assert _faults(records) == [(1, "leave", 2, 4, "event"), (2, "leave", 5, None, "event"),
                                    (1, "return", 5, None, None), (1, "join", 5, None, None)]
    assert peers.killed == [1, 2]
    # The new peer joined through the peers live at its return (never through itself), then trained on.
    (w, initial), = peers.restarts
    assert w == 1 and len(initial) == 2 - (algorithm == "diloco")
    joined = next(f for f in records if isinstance(f, FaultRecord) and f.event == "join")
    assert joined.sources == [0] and joined.state_bytes > 4 * peers.slots[0].replica.num_params()
    assert joined.download_s == 0.25 and joined.wait_s >= 0.0
    # Steps are booked only for live workers: worker 1 books none of its outage (2 .. join), worker 2 none from 5.
    booked = {(r.worker, r.step) for r in records if isinstance(r, StepRecord)}
    first_back = joined.step + 1
    assert {s for w, s in booked if w == 1} == set(range(2)) | set(range(first_back, steps))
    assert {s for w, s in booked if w == 2} == set(range(5))
    # The live replicas end on the same state (ddp: the same bits), and it is what the evaluation saw.
    final = driver.last_params
    assert len(final) == 2 and np.array_equal(final[0], final[1])
    assert np.array_equal(final[0], peers.slots[0].params())


def test_the_real_driver_plays_exchange_faults_and_stragglers_as_the_simulator():
    """ddp, 3 workers, 9 steps: worker 2 leaves at step 2 and returns at step 4 (rounds 2-4 without it), then dies
    reducing in round 6 for good; worker 0 cancels in round 7; worker 1 straggles at half speed throughout."""
    n, steps = 3, 9
    faults = parse_faults("faults", {"events": [{"worker": 2, "leave_step": 2, "return_step": 4}],
                                     "exchange": [{"worker": 2, "round": 6, "phase": "reducing"},
                                                  {"worker": 0, "round": 7, "phase": "cancel"},
                                                  {"worker": 2, "round": 3, "phase": "sending"}],
                                     "stragglers": [{"worker": 1, "from_s": 0, "to_s": 1e9, "speed": 0.5}]}, n)
    peers, records, driver = _real_driver(n, steps, "ddp", DDPSettings(), faults)
    sim = _simulated(n, steps, "ddp", DDPSettings(), faults)
    assert _rounds(records) == _rounds(sim)
    assert _exchange_faults(records) == _exchange_faults(sim) == [
        (2, "leave", 2, "event", None, None, None), (2, "return", 4, None, None, None, None),
        (2, "join", 4, None, None, None, None), (2, "leave", 6, "exchange", "reducing", 6, None),
        (0, "cancel", 7, None, None, 7, None)]
    # The round a member failed in still names it; it is absent from the next on. Its peer was killed (Ray let go).
    assert _rounds(records)[6:] == [(6, (0, 1, 2), ()), (7, (0, 1), (2,)), (8, (0, 1), (2,))]
    assert peers.killed == [2, 2]
    # Each fault was asked for in its own round only, of the member it names (worker 2 is away in round 3: no
    # fault there, as in the simulator).
    assert driver.exchanges.faults == [(6, {2: "reducing"}), (7, {0: "cancel"})]
    # Only the straggler's peer was told to straggle, once at the start (no restart of it).
    assert peers.slots[1].faults.speed(0.0) == 0.5 and not hasattr(peers.slots[0], "faults")
    assert not hasattr(peers.slots[2], "faults")  # a restarted peer is told too, if it straggles


def test_a_peer_failed_in_an_exchange_returns_after_down():
    """ddp, 2 workers: worker 1 dies sending in round 1 with down = 2 s; then worker 0, alone, in round 2 (before),
    which is the driver's to play, as no all-reduce runs."""
    n, steps = 2, 8
    faults = parse_faults("faults", {"exchange": [{"worker": 1, "round": 1, "phase": "sending", "down": "2s"},
                                                  {"worker": 0, "round": 2, "phase": "before"}]}, n)
    specs, plan = _specs(n, steps, "ddp", DDPSettings()), _plan(n, steps)
    peers = _Peers(specs)
    records: list = []
    exchanges = _Exchanges(peers, n)
    driver = LockstepChurnDriver(peers, plan, exchanges, records.append, members=LockstepMembers(faults, plan),
                                 restart=peers.restart, load_timeout_s=5.0)

    def clock():  # the arm's clock: s seconds once step s is booked (called before the count moves on)
        exchanges.now_s = float(driver.steps_completed)

    driver.on_step = clock
    driver.run()
    # Round 1 is step 1's, which ends at 0 s (step 0 booked): worker 1 is back from 2 s on. Worker 0 dies in step
    # 2's round, so no step is booked from 2 on; the steps pass with no one live (the clock at 4 s once step 3 has
    # passed), and the return falls due at step 4's boundary, where worker 1 finds no one to load from and waits
    # (the lone-restart guard).
    assert _exchange_faults(records) == [(1, "leave", 1, "exchange", "sending", 1, 2.0),
                                         (0, "leave", 2, "exchange", "before", 2, None),
                                         (1, "return", 4, None, None, None, None)]
    assert _rounds(records) == [(0, (0, 1), ()), (1, (0, 1), ()), (2, (0,), (1,))]
    assert peers.killed == [1, 0] and peers.restarts == [(1, [])]


def test_a_leave_by_time_loses_the_compute_since_its_last_round():
    """diloco, H = 3: worker 0 fails by the clock in its second inner step after the round of step 2."""
    n, steps = 2, 6
    faults = parse_faults("faults", {"events": [{"worker": 0, "leave_s": 10.0}]}, n)
    specs, plan = _specs(n, steps, "diloco", DiLoCoSettings(inner_steps=3)), _plan(n, steps)
    peers = _Peers(specs)
    records: list = []
    exchanges = _Exchanges(peers, n)
    driver = LockstepChurnDriver(peers, plan, exchanges, records.append, members=LockstepMembers(faults, plan),
                                 restart=peers.restart, load_timeout_s=5.0)

    def clock():  # the arm's clock reaches 10 s once step 4 is done
        exchanges.now_s = 10.0 if driver.steps_completed >= 4 else 0.0  # called before the count moves on

    driver.on_step = clock
    driver.run()
    leave = next(f for f in records if isinstance(f, FaultRecord))
    # Steps 3 and 4 (0.5 s each) came after its last round (step 2): lost.
    assert (leave.worker, leave.step, leave.time_s, leave.lost_s, leave.back_s) == (0, 5, 10.0, 1.0, None)
    assert _rounds(records) == [(2, (0, 1), ()), (5, (1,), (0,))]


def test_a_peer_that_returns_while_no_peer_is_live_waits_without_the_state():
    """Both workers leave at step 1; worker 0 returns at step 3 with no one to load from: it starts alone, is never
    given rounds or a join, and the evaluations keep the consensus last seen (the lone-restart guard)."""
    n, steps = 2, 5
    faults = parse_faults("faults", {"events": [{"worker": 0, "leave_step": 1, "return_step": 3},
                                                {"worker": 1, "leave_step": 1}]}, n)
    peers, records, driver = _real_driver(n, steps, "ddp", DDPSettings(), faults)
    sim = _simulated(n, steps, "ddp", DDPSettings(), faults)
    assert _faults(records) == _faults(sim) == [(0, "leave", 1, 3, "event"), (1, "leave", 1, None, "event"),
                                                (0, "return", 3, None, None)]
    assert peers.restarts == [(0, [])]  # alone: no peer to join the DHT through
    assert not peers.slots[0].holds_state and peers.slots[0].next_step == 0  # never trained its fresh weights
    assert _rounds(records) == _rounds(sim) == [(0, (0, 1), ())]
    # The last evaluation saw the initial model (step 0's training went down with both peers): it stands, as in the
    # simulator, rather than the restarted peer's fresh weights.
    evals = [(r.step, r.loss) for r in records if r.kind == "eval"]
    assert evals == [(r.step, r.loss) for r in sim if r.kind == "eval"] and evals[0][1] == evals[1][1]
    initial = Replica(_specs(n, steps, "ddp", DDPSettings())[0]).params()
    assert len(driver.last_params) == 2 and all(np.array_equal(p, initial) for p in driver.last_params)


def test_the_experiment_file_takes_failures_and_returns_on_real_lockstep_arms():
    from experiments.fields import ConfigError
    from experiments.spec import parse_spec

    def spec(algorithm, faults, **arm):
        return parse_spec({"run": {"mode": "real", "workers": 3, "tokens": 4096}, "model": {"preset": "tiny"},
                           "faults": faults, "arm": [{"name": "a", "algorithm": algorithm,
                                                      "network": "home-broadband", **arm}]})

    events = {"events": [{"worker": 2, "leave_step": 3, "return_step": 5}]}
    assert spec("ddp", events).arms[0].faults.events[0].back == 5.0
    assert spec("diloco", {"mtbf": "1min", "mttr": "10s"}).arms[0].faults.mttr_s == 10.0
    with pytest.raises(ConfigError) as error:
        spec("ddp", events, allreduce="gloo", codec="none")
    assert str(error.value) == ("faults: a gloo all-reduce has a fixed process group, so real peers cannot leave it; "
                                "set allreduce = 'hivemind' for this arm, or give it mode = 'sim'")
    played = spec("diloco", {**events, "exchange": [{"worker": 1, "round": 2, "phase": "sending", "down": "5s"}],
                             "stragglers": [{"worker": 0, "from_s": 0, "to_s": 10, "speed": 0.5}]}).arms[0].faults
    assert played.exchange_fault(1, 2).down_s == 5.0 and played.speed(0, 1.0) == 0.5
    with pytest.raises(ConfigError) as error:
        spec("ddp", {"exchange": [{"worker": 1, "round": 2, "phase": "reducing"}]}, allreduce="gloo", codec="none")
    assert str(error.value).startswith("faults: a gloo all-reduce has a fixed process group")
    with pytest.raises(ConfigError, match=r"^faults\.stragglers\[0\]\.speed: a real peer runs at its machine's speed"):
        spec("ddp", {"stragglers": [{"worker": 0, "from_s": 0, "to_s": 10, "speed": 2.0}]})
    with pytest.raises(ConfigError) as error:
        spec("ddp", {**events, "sender_timeout": 5})
    assert str(error.value) == ("faults.sender_timeout: real peers time out as hivemind does (after the timeouts "
                                "derived from the arm's network); remove sender_timeout or use mode = 'sim'")
