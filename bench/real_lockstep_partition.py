"""A network partition on a real ddp arm: 4 real hivemind peers on Ray (unshaped loopback), cut into sides [0, 1]
and [2, 3] over [--from-s, --to-s) of the arm's clock, then healed (`cluster.real.lockstep_churn`).

Prints one line per comm record (step, round, group, participants, absent, attempts, end time) and checks what the
driver must do: every round is either all 4 peers or one side's two, the side rounds come in pairs (both sides at
once) and only between the first and the last, and after the heal the rounds are all 4 peers again (the DHT whole
again after the re-pings: a round that failed to meet would have been retried, `attempts` > 1, or stopped the run).
Exits 1 if a check fails. Not in the test suite (it takes tens of seconds); run it by hand:

    python bench/real_lockstep_partition.py                       # 16 steps, cut over [3 s, 8 s)
    python bench/real_lockstep_partition.py --steps 24 --from-s 4 --to-s 12
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's farflung, however it is started

from cluster.devices import get_device  # noqa: E402
from cluster.driver import ArmPlan  # noqa: E402
from cluster.faults import parse_faults  # noqa: E402
from cluster.network import Link, Network  # noqa: E402
from cluster.records import CommRecord  # noqa: E402
from trainer.data import DataConfig  # noqa: E402
from trainer.model import PRESETS  # noqa: E402
from trainer.replica import OptimConfig, ReplicaSpec  # noqa: E402
from trainer.strategies.ddp import DDPSettings  # noqa: E402

N, BATCH = 4, 4
SIDES = [(0, 1), (2, 3)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--from-s", type=float, default=3.0)
    parser.add_argument("--to-s", type=float, default=8.0)
    args = parser.parse_args()
    from cluster.real import RealOptions, run_real_arm

    link = Link(uplink_bps=1e9, downlink_bps=1e9, one_way_latency_s=0.0)
    plan = ArmPlan(name="ddp-partition", n_workers=N, network=Network(links=(link,) * N),
                   devices=(get_device("laptop-cpu"),) * N, speed_factors=(1.0,) * N, codec="none",
                   total_steps=args.steps, tokens_per_step=N * BATCH * PRESETS["tiny"].block_size,
                   eval_every_steps=args.steps, seed=5)
    specs = [ReplicaSpec(worker=w, n_workers=N, seed=5, model=PRESETS["tiny"],
                         data=DataConfig(corpus="synthetic", synthetic_bytes=200_000),
                         optim=OptimConfig(lr=3e-3, warmup_steps=2), batch_size=BATCH, total_steps=args.steps,
                         algorithm="ddp", settings=DDPSettings(), eval_batches=2, torch_threads=1) for w in range(N)]
    faults = parse_faults("faults", {"partition": [{"groups": [list(s) for s in SIDES], "from_s": args.from_s,
                                                    "to_s": args.to_s}]}, N)
    import ray

    records: list = []
    started = time.perf_counter()
    # A Ray of its own: `ray.init()` alone would join whatever cluster another program left on this machine.
    ray.init(address="local", include_dashboard=False, logging_level="ERROR")
    try:
        run_real_arm(plan, specs, records.append, options=RealOptions(shaping="none"), faults=faults)
    finally:
        ray.shutdown()
    wall_s = time.perf_counter() - started
    comms = [r for r in records if isinstance(r, CommRecord)]
    for c in comms:
        print(f"step {c.step:3d} round {c.round:3d} group {c.group} participants {c.participants} absent {c.absent} "
              f"attempts {c.attempts} end {c.time_s:6.2f} s")
    kinds = ["all" if c.participants == list(range(N)) else "side" if tuple(c.participants) in SIDES else "other"
             for c in comms]
    side_rounds = [c.round for c, k in zip(comms, kinds) if k == "side"]
    checks = {
        "every round is all peers or one side": "other" not in kinds,
        "side rounds come in pairs, group 0 then 1": all(
            [(c.group, tuple(c.participants)) for c in comms if c.round == r] == [(0, SIDES[0]), (1, SIDES[1])]
            for r in set(side_rounds)),
        "some rounds were cut": bool(side_rounds),
        "the cut rounds are one stretch": not side_rounds or all(
            k == "side" for c, k in zip(comms, kinds) if min(side_rounds) <= c.round <= max(side_rounds)),
        "all peers average again after the heal": bool(side_rounds) and any(
            k == "all" for c, k in zip(comms, kinds) if c.round > max(side_rounds)),
    }
    retried = [c.round for c in comms if c.attempts > 1]
    evals = [r for r in records if r.kind == "eval"]
    print(f"wall {wall_s:.1f} s; side rounds {sorted(set(side_rounds))}; rounds retried {retried}; "
          f"final param spread {evals[-1].param_spread:.3g}")
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
