"""Faults and churn in the simulator: replay, exchanges without the failed, state downloads, the lone-restart guard."""

from __future__ import annotations

import numpy as np
import pytest

from cluster.churn import ChurnDriver, ChurnExchanges
from cluster.collectives import butterfly_parts, state_download
from cluster.devices import get_device
from cluster.driver import ArmPlan
from cluster.faults import FaultTrace, parse_faults
from cluster.network import build_network
from cluster.records import CommRecord, FaultRecord, StepRecord
from cluster.runtime import LocalRuntime
from experiments.fault_summary import fault_summary
from simtools import SEED, TINY, TINY_DATA, TINY_OPTIM
from trainer.replica import ExchangeRequest, ReplicaSpec
from trainer.settings import ConfigError
from trainer.strategies.ddp import DDPSettings


# Home broadband without jitter, so that times are the closed formulas.
HOME = {"preset": "home-broadband", "jitter": 0}


def plan_of(n: int, steps: int, seed: int = SEED) -> ArmPlan:
    return ArmPlan(name="arm", n_workers=n, network=build_network(HOME, n), devices=(get_device("laptop-cpu"),) * n,
                   speed_factors=(1.0,) * n, codec="none", total_steps=steps, tokens_per_step=n * 4 * TINY.block_size,
                   eval_every_steps=max(1, steps // 2), seed=seed)


def churn_run(n: int, steps: int, faults: dict, seed: int = SEED):
    specs = [ReplicaSpec(w, n, seed, TINY, TINY_DATA, TINY_OPTIM, 4, steps, "ddp", DDPSettings(), eval_batches=2)
             for w in range(n)]
    plan = plan_of(n, steps, seed)
    runtime = LocalRuntime(specs)
    records: list = []
    exchanges = ChurnExchanges(plan, parse_faults("faults", faults, n))
    ChurnDriver(runtime, plan, exchanges, records.append).run()
    return runtime, records, exchanges


def test_a_seeded_trace_replays_bit_for_bit_and_another_seed_differs():
    # A compute step of the tiny model on a laptop CPU is ~0.3 ms and a round on home broadband ~0.16 s.
    faults = {"mtbf": "0.6s", "mttr": "0.3s"}
    _, first, ex = churn_run(3, 10, faults)
    _, again, _ = churn_run(3, 10, faults)
    assert [r.to_json() for r in first] == [r.to_json() for r in again]
    # Who was absent from a round is kept only until its record is out: nothing grows with the rounds of a run.
    assert any(isinstance(r, CommRecord) and r.absent for r in first) and not ex._absent and not ex._hidden
    assert any(isinstance(r, FaultRecord) and r.event == "join" for r in first)
    _, other, _ = churn_run(3, 10, faults, seed=SEED + 1)
    leaves = lambda rs: [(r.worker, r.time_s) for r in rs if isinstance(r, FaultRecord) and r.event == "leave"]
    assert leaves(first) != leaves(other)


def requests(tensors, collective="butterfly"):
    return [ExchangeRequest("gradients", collective, None, t, t.nbytes, flops=0.0) for t in tensors]


TENSORS = [np.arange(12, dtype=np.float32) * (w + 1) + w for w in range(4)]


def test_an_exchange_without_a_gone_peer_is_the_survivors_average():
    plan = plan_of(4, 4)
    ex = ChurnExchanges(plan, parse_faults("faults", {"events": [{"worker": 3, "leave_step": 0}]}, 4))
    replies, records = ex.exchange(requests(TENSORS), step=0)
    survivors = (TENSORS[0] + TENSORS[1] + TENSORS[2]) / np.float32(3)
    for w in range(3):
        np.testing.assert_array_equal(replies[w], survivors)
    (comm,) = [r for r in records if isinstance(r, CommRecord)]
    assert comm.participants == [0, 1, 2] and comm.absent == [3]
    (leave,) = [r for r in records if isinstance(r, FaultRecord)]
    assert (leave.worker, leave.event, leave.step) == (3, "leave", 0)


@pytest.mark.parametrize("phase", ["before", "sending", "reducing", "cancel"])
def test_a_peer_failing_mid_exchange_loses_its_part_as_hivemind_does(phase):
    plan = plan_of(4, 4)
    faults = parse_faults("faults", {"exchange": [{"worker": 1, "round": 0, "phase": phase}]}, 4)
    ex = ChurnExchanges(plan, faults)
    replies, records = ex.exchange(requests(TENSORS), step=0)
    parts = butterfly_parts(12, [50.0] * 4)  # home broadband: 50 Mbit/s up, 250 down: equal parts
    lo, hi = sum(parts[:1]), sum(parts[:2])
    # before / sending / cancel: its contribution is banned from every part; reducing: it is in the others' parts.
    contributors = [0, 2, 3] if phase != "reducing" else [0, 1, 2, 3]
    total = TENSORS[contributors[0]] * 1.0
    for w in contributors[1:]:
        total = total + TENSORS[w] * 1.0
    mean = total / np.float32(len(contributors))
    for w in (0, 2, 3):
        expected = mean.copy()
        expected[lo:hi] = TENSORS[w][lo:hi]  # the failed reducer's part: each survivor keeps its own values
        np.testing.assert_allclose(replies[w], expected, rtol=1e-6)
    np.testing.assert_array_equal(replies[1], TENSORS[1])
    (comm,) = [r for r in records if isinstance(r, CommRecord)]
    assert comm.missing_peers == [1] and comm.received_fraction == [1 - parts[1] / 12, 0.0, 1 - parts[1] / 12,
                                                                    1 - parts[1] / 12]
    wait = {"cancel": 0.0}.get(phase, faults.reducer_timeout_s)  # a peer with a part: its reducers' timeout
    assert comm.comm_s == pytest.approx(max(wait, comm.comm_s)) and (wait == 0 or comm.comm_s == wait)
    assert ex.status[1] == ("live" if phase == "cancel" else "down")


def test_a_failed_peers_round_is_combined_by_the_robust_rule_over_what_the_others_sent():
    """5 peers, peer 4 hostile (x -1000) and a coordinate-wise median: peer 1 fails before sending in round 0. The
    survivors' parts are the median of what 0, 2, 3 and the poisoned 4 sent; peer 1's part keeps their own values."""
    from dataclasses import replace

    from cluster.hostile import parse_hostile
    from trainer.robust import Aggregation

    n = 5
    tensors = [np.arange(12, dtype=np.float32) * (w + 1) + w for w in range(n)]
    plan = replace(plan_of(n, 4), aggregation=Aggregation(aggregation="median"),
                   hostile=parse_hostile("faults.hostile", [{"peers": [4], "kind": "sign_flip", "scale": -1000.0}], n))
    ex = ChurnExchanges(plan, parse_faults("faults", {"exchange": [{"worker": 1, "round": 0, "phase": "before"}]}, n))
    replies, records = ex.exchange(requests(tensors), step=0)
    parts = butterfly_parts(12, [50.0] * n)
    lo, hi = sum(parts[:1]), sum(parts[:2])
    # Per element the order is -1000 x t4 < t0 < t2 < t3 (every t_w >= 0 grows with w): the median of the four
    # is (t0 + t2) / 2, where the plain mean would be dragged to about -250 x t4.
    median = (tensors[0] + tensors[2]) / np.float32(2)
    for w in (0, 2, 3, 4):
        expected = median.copy()
        expected[lo:hi] = tensors[w][lo:hi]
        np.testing.assert_array_equal(replies[w], expected)
    np.testing.assert_array_equal(replies[1], tensors[1])
    (comm,) = [r for r in records if isinstance(r, CommRecord)]
    assert comm.missing_peers == [1] and comm.participants == list(range(n))


def test_state_download_time_is_the_alpha_beta_formula():
    net = build_network(HOME, 4)
    link = net.links[0]
    nbytes = 10_000_001
    one = state_download(net, 3, [0], nbytes)
    assert one.time_s == 8 * nbytes / min(link.uplink_bps, link.downlink_bps) + 2 * link.one_way_latency_s
    assert one.bytes_sent == (0, nbytes) and one.bytes_received == (nbytes, 0)
    two = state_download(net, 3, [0, 1], nbytes)
    share = nbytes // 2 + 1
    assert two.time_s == max(8 * nbytes / link.downlink_bps, 8 * share / link.uplink_bps) + 2 * link.one_way_latency_s
    assert two.bytes_sent == (0, share, nbytes - share)


def test_a_returning_peer_loads_a_live_peers_state_and_pays_for_it(tmp_path):
    runtime, records, ex = churn_run(4, 8, {"events": [{"worker": 3, "leave_step": 2, "return_step": 5}]})
    (join,) = [r for r in records if isinstance(r, FaultRecord) and r.event == "join"]
    assert join.worker == 3 and join.sources == [0] and join.step == 5
    cost = state_download(ex.plan.network, 3, [0], join.state_bytes)
    assert join.download_s == cost.time_s
    params = runtime.call("params")
    for p in params[1:]:
        np.testing.assert_array_equal(params[0], p)
    steps3 = [r.step for r in records if isinstance(r, StepRecord) and r.worker == 3]
    assert steps3 == [0, 1, 5, 6, 7]  # it contributes again from the step after the round it loaded the state in

    from experiments.report import write_report
    from experiments.summary import summarize

    arms = [{"name": "arm", "workers": 4, "algorithm": "ddp", "network": "home", "device": "laptop-cpu",
             "codec": "none"}]
    summary = summarize(records, arms, "arm", None)
    assert summary["arms"]["arm"]["faults"]["failures"] == 1 and summary["arms"]["arm"]["faults"]["joins"] == 1
    paths = write_report(tmp_path, records, summary, "", {}, "churn")
    assert (tmp_path / "membership.png").read_bytes().startswith(b"\x89PNG")
    assert "rounds without someone" in (tmp_path / "report.html").read_text() and len(paths) == 5


def test_a_peer_that_restarts_alone_waits_and_never_replaces_the_swarm():
    # Worker 3 restarts while cut off from everyone: it has no one to download from, so it waits with no state and
    # takes no part; when the partition heals it downloads from the others, never they from it.
    faults = {"events": [{"worker": 3, "leave_step": 1, "return_step": 3}],
              "partition": [{"groups": [[0, 1, 2], [3]], "from_s": 0, "to_s": 1.0}]}
    runtime, records, ex = churn_run(4, 12, faults)
    fault = [r for r in records if isinstance(r, FaultRecord)]
    (ret,) = [r for r in fault if r.event == "return"]
    (join,) = [r for r in fault if r.event == "join"]
    assert ret.step == 3 and join.worker == 3 and set(join.sources) <= {0, 1, 2}
    comms = [r for r in records if isinstance(r, CommRecord)]
    assert all(r.participants == [3] or 3 not in r.participants for r in comms if r.time_s < 1.0)
    assert join.wait_s > 0 and join.time_s > 1.0
    params = runtime.call("params")
    for p in params[1:]:
        np.testing.assert_array_equal(params[0], p)

    # Everyone gone, one back alone: it waits; no step is booked and no state is made up from fresh weights.
    _, records, ex = churn_run(2, 8, {"events": [{"worker": 0, "leave_step": 2, "return_step": 4},
                                                 {"worker": 1, "leave_step": 2}]})
    assert not [r for r in records if isinstance(r, FaultRecord) and r.event == "join"]
    assert max(r.step for r in records if isinstance(r, StepRecord)) == 1
    evals = [r for r in records if r.kind == "eval"]
    assert evals[-1].loss == evals[-2].loss  # the last consensus stands
    assert ex.status == ["returned", "down"]


def test_summary_counts_equal_the_trace():
    faults = {"mtbf": "0.6s", "mttr": "0.3s"}
    _, records, ex = churn_run(3, 10, faults)
    time_s = max(r.time_s for r in records)
    s = fault_summary(records, 3, time_s)
    trace = FaultTrace(parse_faults("faults", faults, 3), 3, SEED)
    leaves = [r for r in records if isinstance(r, FaultRecord) and r.event == "leave"]
    for w in range(3):
        times = [r.time_s for r in leaves if r.worker == w]
        drawn = [trace.outage(w, i).leave for i in range(len(times))]
        # Each failure comes from the trace: at the drawn time, or when the worker's step or round ended after it.
        assert all(t >= d for t, d in zip(times, drawn))
    assert s["failures"] == len(leaves) == sum(ex.outage_index) > 0
    assert s["joins"] == len([r for r in records if isinstance(r, FaultRecord) and r.event == "join"])
    assert s["rounds_without_someone"] == len({r.round for r in records if isinstance(r, CommRecord) and r.absent})
    assert s["time_in_state_downloads_s"] == sum(r.download_s for r in records if getattr(r, "event", "") == "join")


def test_bad_fault_tables_name_the_field():
    cases = [
        ({"events": [{"worker": 9, "leave_step": 1}]}, r"faults.events\[0\].worker: must be a worker index in 0..3"),
        ({"mtbf": "10min"}, "faults.mttr: a random trace needs both"),
        ({"mtbf": "ten", "mttr": "1min"}, "faults.mtbf: must be a duration"),
        ({"exchange": [{"worker": 0, "round": 1, "phase": "napping"}]}, r"faults.exchange\[0\].phase: must be one of"),
        ({"stragglers": [{"worker": 0, "from_s": 5, "to_s": 1, "speed": 0.5}]}, r"to_s: must be later"),
        ({"events": [{"worker": 0, "leave_step": 1, "return_step": 5}, {"worker": 0, "leave_step": 3}]},
         "contradictory faults"),
        ({"colour": 1}, "faults.colour: unknown key"),
    ]
    for table, message in cases:
        with pytest.raises(ConfigError, match=message):
            parse_faults("faults", table, 4)


def test_a_straggler_computes_slower_over_its_interval_only():
    plan = plan_of(2, 4)
    ex = ChurnExchanges(plan, parse_faults("faults", {"stragglers": [{"worker": 1, "from_s": 1, "to_s": 2,
                                                                      "speed": 0.25}]}, 2))
    flops = 1e9
    full = flops / plan.flops_per_second(1)
    assert ex.compute_seconds(1, flops) == full
    ex.clock.now_s[1] = 1.5
    assert ex.compute_seconds(1, flops) == flops / (plan.flops_per_second(1) * 0.25)
    assert ex.compute_seconds(0, flops) == full
    ex.clock.now_s[1] = 2.0
    assert ex.compute_seconds(1, flops) == full


def test_churn_file_compares_each_faulty_arm_with_its_twin_without_faults():
    from pathlib import Path

    from experiments.spec import load_spec

    spec = load_spec(Path(__file__).parents[2] / "experiments" / "churn.toml")
    arms = {a.name: a for a in spec.arms}
    faulty = [a for a in spec.arms if a.faults is not None]
    assert faulty and spec.run.workers == 8
    for arm in faulty:
        twin = arms[arm.name.removesuffix("-churn")]
        assert twin.faults is None and twin.network_label == arm.network_label == "home-broadband"
        assert (twin.algorithm, twin.settings) == (arm.algorithm, arm.settings)


def test_faults_in_the_experiment_file_read_back_and_refuse_what_is_not_simulated():
    import tomli_w
    import tomllib

    from experiments.resolved import resolved_config
    from experiments.spec import parse_spec

    raw = {"run": {"workers": 4, "tokens": 4096}, "model": {"preset": "tiny"},
           "faults": {"mtbf": "1min", "mttr": "10s"},
           "arm": [{"name": "a", "algorithm": "ddp", "network": "home-broadband"},
                   {"name": "b", "algorithm": "diloco", "network": "home-broadband",
                    "faults": {"events": [{"worker": 1, "leave_s": 3, "return_s": 9}]}}]}
    spec = parse_spec(raw)
    assert spec.arms[0].faults.mtbf_s == 60.0 and spec.arms[1].faults.events[0].back == 9.0
    back = parse_spec(tomllib.loads(tomli_w.dumps(resolved_config(spec))))
    assert back.arms == spec.arms
    # A collaborative arm's exchanges time out as hivemind.Optimizer's do: after matchmaking_time, then twice it.
    raw["arm"][1] = {"name": "c", "algorithm": {"name": "collaborative", "matchmaking_time": 4}, "network": "mobile"}
    collab = parse_spec(raw).arms[1]
    assert (collab.faults.sender_timeout_s, collab.faults.reducer_timeout_s) == (4.0, 8.0)
    raw["arm"][1]["algorithm"]["matchmaking_time"] = 30
    raw["arm"][1]["faults"] = {"mtbf": "1min", "mttr": "10s", "reducer_timeout": 20}
    with pytest.raises(ConfigError, match=r"^arm.c.faults.reducer_timeout: must be longer than sender_timeout \(30 s"):
        parse_spec(raw)
