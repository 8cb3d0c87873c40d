"""The floor under the simulator's start-up: what a fresh Ray actor costs before it holds a single replica.

A replica host is a new process (Ray's worker), which must import torch and, at its first optimizer, torch._dynamo:
torch.optim.Optimizer's constructor wraps a method in `torch._disable_dynamo`, which imports torch._dynamo (sympy
with it) on first use, and every `step` imports it too. farflung never compiles, but it cannot build an AdamW without
paying for that import. This script times those phases in fresh actors, `--actors` of them at once (default: one,
and one per CPU, as the runtime starts them), so that `bench/throughput.py`'s `startup_s` can be read against the
part of it no change inside farflung can remove:

    .venv/bin/python bench/startup_floor.py --repeat 3

Each phase is timed inside the actor (wall clock, from the actor's `__init__`) except `ready`, which is from the
creation call to the actor's first answer. Ray is started first, untimed, as in throughput.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's farflung, however it is started

from cluster import runtime as cluster_runtime  # noqa: E402


class Probe:
    """A bare actor: each call performs one start-up phase and says how long it took."""

    def ready(self) -> float:
        return time.perf_counter()

    def phase(self, name: str) -> float:
        t0 = time.perf_counter()
        if name == "import_torch":
            import torch  # noqa: F401
        elif name == "import_farflung":
            import cluster.replica_hosts  # noqa: F401  (what unpickling a replica host imports)
        elif name == "first_optimizer":
            import torch

            torch.optim.AdamW([torch.zeros(4, requires_grad=True)], lr=1e-3)
        elif name == "second_optimizer":
            import torch

            torch.optim.AdamW([torch.zeros(4, requires_grad=True)], lr=1e-3)
        return time.perf_counter() - t0


PHASES = ["import_torch", "import_farflung", "first_optimizer", "second_optimizer"]


def measure(n_actors: int) -> dict:
    import ray

    remote = ray.remote(Probe).options(num_cpus=0)
    t0 = time.perf_counter()
    actors = [remote.remote() for _ in range(n_actors)]
    try:
        ready = [t - t0 for t in ray.get([a.ready.remote() for a in actors])]
        figures = {"ready_s": max(ready)}
        for name in PHASES:  # every actor runs the phase at once, as hosts do
            figures[f"{name}_s"] = max(ray.get([a.phase.remote(name) for a in actors]))
        figures["total_s"] = time.perf_counter() - t0
        return figures
    finally:
        cluster_runtime.kill_actors(actors)


def main(argv=None) -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--actors", type=int, nargs="+", help="actors started at once (default: 1 and the CPU count)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    t = time.perf_counter()
    started = cluster_runtime.start_ray()
    print(f"ray start-up {time.perf_counter() - t:.2f} s", file=sys.stderr)
    try:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        counts = args.actors or sorted({1, cpus})
        rows = []
        for n in counts:
            runs = [measure(n) for _ in range(args.repeat)]
            rows.append({"actors": n, **{k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}})
    finally:
        if started:
            ray.shutdown()
    if args.json:
        print(json.dumps({"cpus": cpus, "repeat": args.repeat, "rows": rows}))
        return
    keys = list(rows[0])
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(str(row[k]) for k in keys))
    print(f"medians of {args.repeat}; each phase is the slowest actor's; total_s: creation call to the last phase")


if __name__ == "__main__":
    main()
