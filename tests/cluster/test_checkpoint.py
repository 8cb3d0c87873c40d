"""A simulated arm stopped after a checkpoint and resumed on freshly built replicas writes, bit for bit, the
metrics.jsonl of an arm never stopped: every registered strategy, top-k error feedback, links with jitter, exchanges
in flight across the checkpoint's boundary, the collaborative driver's epochs, fault traces (failures, returns and
state downloads on either side of a checkpoint, exchange faults, stragglers, partitions) and a hostile peer replaying
stale contributions. The files are the runner's
(`experiments.checkpoint`), read back with `torch.load(weights_only=True)`. About 1 s a case on a 2-core machine."""

from __future__ import annotations

import json

import pytest
from simtools import SEED, TINY, TINY_DATA, TINY_OPTIM

from cluster.checkpoint import NO_CHECKPOINTS, Checkpoints
from cluster.churn import ChurnDriver, ChurnExchanges
from cluster.collaborative import CollaborativeDriver
from cluster.devices import get_device
from cluster.driver import ArmPlan, LockstepDriver
from cluster.faults import parse_faults
from cluster.hostile import parse_hostile
from cluster.network import build_network
from cluster.runtime import LocalRuntime
from cluster.sim import ModelledExchanges
from cluster.swarm_churn import CollaborativeChurnDriver
from cluster.swarm_timing import SwarmTiming
from experiments.checkpoint import ArmCheckpoints, MetricsLog, RunCheckpoints
from trainer.replica import ReplicaSpec
from trainer.strategies import STRATEGIES

WORKERS, BATCH, STEPS, EVAL_EVERY, EVERY = 2, 4, 9, 3, 2  # checkpoints after steps 2, 4, 6, 8

# Settings under which each strategy holds state of its own at a checkpoint's boundary (a strategy missing here runs
# on its defaults, which may never exchange in 9 steps: then it still must resume, but proves less).
SETTINGS: dict[str, dict] = {
    "diloco": {"inner_steps": 3},  # outer momentum from step 3 on, a shared copy, steps since the last sync
    "local-updates": {"average_state_every": 3, "delay_state_averaging": True},  # a round in flight at step 6
    "moshpit": {"average_every": 2, "target_group_size": 2, "grouping": "random"},
    "streaming-diloco": {"inner_steps": 4, "fragments": 2},  # fragment 1 in flight at steps 2 and 6
    "sparta": {"fraction": 0.1},
    "collaborative": {"target_batch_size": 8},  # a late microbatch carried into the next epoch at times
}
# A swarm's microbatches slower than its notice delay on these links (0.2 s), so that an epoch is a few of them.
SPEED_FACTORS = {"collaborative": (0.0005, 0.00035)}
TIMING = SwarmTiming(matchmaking_time=0.0, target_group_size=WORKERS, progress_refresh_s=0.0)
CASES = {name: (name, "none") for name in STRATEGIES} | {"ddp+topk": ("ddp", "topk:0.1"),
                                                         "diloco+topk": ("diloco", "topk:0.1"),
                                                         "ddp+faults": ("ddp", "none"),
                                                         "diloco+faults": ("diloco", "none"),
                                                         "collaborative+faults": ("collaborative", "none"),
                                                         "ddp+stale-peer": ("ddp", "none")}
# Traces whose failures, returns and joins fall on both sides of the checkpoints (3 workers, 9 steps); the seeded
# draw goes on from where the checkpoint left the generators.
FAULTS: dict[str, dict] = {
    "ddp+faults": {"events": [{"worker": 2, "leave_step": 1, "return_step": 3},
                              {"worker": 0, "leave_step": 5, "return_step": 7}],
                   "exchange": [{"worker": 1, "round": 6, "phase": "reducing"}],
                   "stragglers": [{"worker": 0, "speed": 0.5, "from_s": 0.0, "to_s": 0.2}],
                   "partition": [{"groups": [[0], [1, 2]], "from_s": 0.3, "to_s": 0.5}]},
    "diloco+faults": {"events": [{"worker": 2, "leave_step": 2, "return_step": 5}],
                      "exchange": [{"worker": 0, "round": 1, "phase": "sending"}]},
    "collaborative+faults": {"mtbf": "1.5s", "mttr": "1s"},
}
HOSTILE = {"ddp+stale-peer": [{"peers": [1], "kind": "stale", "stale_rounds": 2, "from_step": 3}]}


class Killed(Exception):
    """Stands for the process dying: nothing after it runs."""


def build(case: str):
    algorithm, codec = CASES[case]
    n = 3 if case in FAULTS or case in HOSTILE else WORKERS
    settings = STRATEGIES[algorithm].Settings(**SETTINGS.get(algorithm, {}))
    specs = [ReplicaSpec(w, n, SEED, TINY, TINY_DATA, TINY_OPTIM, BATCH, STEPS, algorithm, settings, codec,
                         eval_batches=2, torch_threads=1) for w in range(n)]
    speed = SPEED_FACTORS.get(algorithm, (1.0, 0.7))
    plan = ArmPlan(name=case, n_workers=n, network=build_network("home-broadband", n),  # jitter 1 ms
                   devices=(get_device("laptop-cpu"),) * n, speed_factors=(speed * 2)[:n],
                   codec=codec, total_steps=STEPS, tokens_per_step=n * BATCH * TINY.block_size, eval_every_steps=EVAL_EVERY,
                   seed=SEED, swarm=TIMING if STRATEGIES[algorithm].schedule == "collaborative" else None,
                   hostile=parse_hostile("faults.hostile", HOSTILE[case], n) if case in HOSTILE else ())
    return specs, plan


def drive(case: str, emit, checkpoints: Checkpoints) -> None:
    specs, plan = build(case)
    runtime = LocalRuntime(specs)  # new replicas, as a new process builds them
    faults = parse_faults("faults", FAULTS[case], plan.n_workers) if case in FAULTS else None
    if STRATEGIES[CASES[case][0]].schedule == "collaborative":
        if faults is None:
            CollaborativeDriver(runtime, plan, emit, checkpoints=checkpoints).run()
        else:
            CollaborativeChurnDriver(runtime, plan, faults, emit, checkpoints=checkpoints).run()
    elif faults is None:
        LockstepDriver(runtime, plan, ModelledExchanges(plan), emit, checkpoints=checkpoints).run()
    else:
        ChurnDriver(runtime, plan, ChurnExchanges(plan, faults), emit, checkpoints=checkpoints).run()


def logged(work_dir, case: str, kill_after: int | None = None) -> None:
    """Run (or resume) the arm in `work_dir` as the runner does, dying after `kill_after` records."""
    saved = RunCheckpoints(work_dir)
    positions = saved.position([case])
    saved.keep_records([case], positions)
    with MetricsLog(work_dir / "metrics.jsonl", {case: positions[0]["records"]}) as metrics:
        def emit(record):
            if kill_after is not None and metrics.counts.get(case, 0) == kill_after:
                metrics.file.write('{"kind": "step", "arm": "')  # a line torn by the kill
                raise Killed
            metrics.write(record)

        drive(case, emit, ArmCheckpoints(saved, 0, case, metrics, EVERY))


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_resumed_arm_writes_the_records_of_one_never_stopped(case, tmp_path):
    reference = []
    drive(case, lambda r: reference.append(r.to_json()), NO_CHECKPOINTS)
    assert len({r["loss"] for r in reference if r["kind"] == "step"}) > 1, "it did not train: equal records prove nothing"
    whole = tmp_path / "whole"
    whole.mkdir()
    logged(whole, case)  # checkpoints taken, never stopped: saving changes no record
    expected = (whole / "metrics.jsonl").read_bytes()
    assert [json.loads(line) for line in expected.splitlines()] == reference

    # An arm with faults is killed at several points: who is down, who downloads, what the trace drew differ
    # from one checkpoint to the next.
    kills = [k * len(reference) // 6 for k in range(1, 6)] if case in FAULTS else [2 * len(reference) // 3]
    resumed_from = set()
    for kill_after in kills:
        work = tmp_path / f"killed-{kill_after}"
        work.mkdir()
        with pytest.raises(Killed):
            logged(work, case, kill_after)
        latest = RunCheckpoints(work).latest(0)
        if latest is None and case in FAULTS:
            continue  # killed before the first checkpoint
        assert latest is not None and 0 < latest[1]["records"] <= kill_after  # resumed mid-arm, not from the start
        resumed_from.add((latest[1]["step"], latest[1]["records"]))
        logged(work, case)
        assert (work / "metrics.jsonl").read_bytes() == expected, kill_after
    if case in FAULTS:  # resumed from several checkpoints, with fault records before and after one of them
        events = [i for i, r in enumerate(reference) if r["kind"] == "fault"]
        assert len(resumed_from) >= 2 and any(events[0] < kept <= events[-1] for _, kept in resumed_from), \
            (resumed_from, events)

