"""Arms one after another vs side by side: the wall time of `experiments.run` on a 4-arm experiment.

Each --shapes entry is SLOTSxCPUS: SLOTS arms train at once, each on CPUS CPUs (`cluster.arm_scheduler`); `1xC`
with C the machine's CPUs is one arm at a time with all of them (as runs went before arms ran side by side), and
`auto` is what the runner chooses by itself (`slot_shape`). Ray is started once, before any timing; each run opens
its own host pool, as a run alone does, so the time includes starting its actors. The shapes take turns, repetition
by repetition, so that load from elsewhere shifts them alike; each figure is the median over the repetitions. The records of every run are compared, byte for byte, with the
first's: the shape never changes a number.

    .venv/bin/python bench/parallel_arms.py --shapes 1x2 2x1 --repeat 4
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's farflung, however it is started

import experiments  # noqa: E402
from cluster.arm_scheduler import ArmScheduler, node_cpus, slot_shape  # noqa: E402
from cluster.replica_hosts import HostPool  # noqa: E402
from experiments.spec import parse_spec  # noqa: E402

ARMS = [
    {"name": "ddp-datacenter", "algorithm": "ddp", "network": "datacenter", "baseline": True},
    {"name": "ddp-home", "algorithm": "ddp", "network": "home-broadband"},
    {"name": "diloco-home", "algorithm": {"name": "diloco", "inner_steps": 10}, "network": "home-broadband"},
    {"name": "local-sgd-home", "algorithm": {"name": "diloco", "inner_steps": 10, "outer_lr": 1.0,
                                             "outer_momentum": 0.0}, "network": "home-broadband"},
]


def spec_of(args) -> dict:
    tokens = args.steps * args.workers * args.batch_size * 32  # `tiny`'s block of 32 tokens
    return {"name": "bench-parallel-arms", "model": {"preset": args.model}, "data": {"corpus": "stdlib"},
            "run": {"workers": args.workers, "batch_size": args.batch_size, "tokens": tokens,
                    "eval_interval": tokens, "eval_batches": 2, "seed": 0},
            "arm": ARMS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["1x2", "2x1"], help="SLOTSxCPUS, or auto")
    parser.add_argument("--repeat", type=int, default=4, help="repetitions per shape (the first warms the actors)")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    assert args.model == "tiny", "the token count assumes tiny's block size"
    import ray

    ray.init(address="local", include_dashboard=False, logging_level="ERROR")
    spec = parse_spec(spec_of(args))
    cpus = node_cpus()
    shapes = [slot_shape(cpus, args.workers, len(ARMS)) if s == "auto" else tuple(map(int, s.split("x")))
              for s in args.shapes]
    tmp = Path(tempfile.mkdtemp(prefix="farflung-bench-"))
    walls: dict[tuple, list[float]] = {s: [] for s in shapes}
    reference = None
    try:
        for rep in range(args.repeat):
            for shape in shapes:
                out = tmp / f"{shape[0]}x{shape[1]}-{rep}"
                t0 = time.perf_counter()
                with HostPool() as pool, ArmScheduler(pool, *shape):
                    result = experiments.run(spec, out=out, runtime="ray")
                walls[shape].append(time.perf_counter() - t0)
                metrics = (result.run_dir / "metrics.jsonl").read_bytes()
                reference = reference or metrics
                assert metrics == reference, f"{shape}: records differ from the first run's"
                print(f"rep {rep} {shape[0]}x{shape[1]}: {walls[shape][-1]:.1f} s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        ray.shutdown()
    rows = [{"shape": f"{s[0]}x{s[1]}", "median_s": round(statistics.median(w), 2), "runs_s": [round(x, 2) for x in w]}
            for s, w in walls.items()]
    print(json.dumps({"cpus_per_node": cpus, "load_avg_1m": os.getloadavg()[0], "arms": len(ARMS),
                      "workers": args.workers, "steps": args.steps, "shapes": rows}, indent=1))


if __name__ == "__main__":
    main()
