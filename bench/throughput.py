"""Wall-clock throughput, start-up and memory of the simulator against plain single-process PyTorch.

For each model in --models and each N in --workers it times, side by side in one run:

* plain: one process, one GPT, AdamW from `GPT.configure_optimizers`, batch N*b, torch's default thread
  count, the same number of optimizer steps, the same lr schedule and gradient clipping as a replica;
* sim: `experiments.run(spec, runtime="ray")` of a one-arm experiment, DDP on `datacenter` (an exchange
  after every step, the most of any arm), optionally DiLoCo (--diloco H), with each --layouts: `grouped`
  (the runtime: several replicas per actor, one actor per CPU) and `per-worker` (one actor per worker);
* gloo (--gloo): the usual way, one torch process per worker with gloo collectives (`bench/gloo_baseline.py`).

Each plain and sim run has a fresh process of its own (`bench.fresh`), so that no run's memory holds what an
earlier one left behind; a sim run's process starts Ray before any timing (its start-up is reported apart, as a
median), and each run starts its own actors (the runner's pool), unless --pool holds one Ray and one pool of hosts
across runs in this process, as a sweep does. `--repeat R` runs everything R times in turn and reports each figure's
median. `--growth` is the cost of growth: N = 1, 4, 16, 64 of `tiny`, `small` and `base` as one table per arm,
skipping a run whose memory, extrapolated from the runs before it, would not fit the machine. `--json` prints all
figures as one JSON object instead of the tables. Run it from the checkout: `python bench/throughput.py` (a few
minutes on a 2-core machine with the defaults).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's farflung, however it is started

import torch  # noqa: E402

import psutil  # noqa: E402

import experiments  # noqa: E402
from bench.fresh import in_fresh_process  # noqa: E402
from bench.gloo_baseline import run_gloo  # noqa: E402
from bench.growth import predicted_peak  # noqa: E402
from bench.memory import PeakRss, replica_state_bytes  # noqa: E402
from bench.tables import algorithm_of, figures, print_tables  # noqa: E402
from cluster import replica_hosts  # noqa: E402
from cluster import runtime as cluster_runtime  # noqa: E402
from experiments.spec import parse_spec  # noqa: E402
from trainer.data import DataConfig, ShardSampler, load_corpus  # noqa: E402
from trainer.model import GPT, PRESETS  # noqa: E402
from trainer.replica import OptimConfig  # noqa: E402


class _Timed:
    """Wraps the runtime the runner builds with timestamps: ready (actors built), arm finished, actors gone."""

    timings: list[dict] = []
    layout = "grouped"
    t_call = 0.0

    def __init__(self, specs, corpus=None):
        if _Timed.layout == "grouped":
            self.inner = replica_hosts.RayReplicaRuntime(specs, corpus)
        else:  # one actor per worker, each loading the corpus itself: the runtime before replicas were grouped
            self.inner = cluster_runtime.RayRuntime(specs)
        self._ready = time.perf_counter()
        self._record = {"startup_s": self._ready - _Timed.t_call}

    def call(self, *args, **kwargs):
        return self.inner.call(*args, **kwargs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        t_done = time.perf_counter()
        self.inner.close()
        self._record["loop_s"] = t_done - self._ready
        self._record["teardown_s"] = time.perf_counter() - t_done
        _Timed.timings.append(self._record)


def sim_spec(args, model: str, n_workers: int, arm: dict) -> dict:
    block = PRESETS[model].block_size
    tokens = args.steps * n_workers * args.batch_size * block
    return {
        "name": f"bench-{arm['name']}-n{n_workers}",
        "model": {"preset": model},
        "data": {"corpus": "stdlib"},
        "run": {
            "workers": n_workers, "batch_size": args.batch_size, "tokens": tokens, "seed": args.seed,
            # One evaluation interval spanning the whole run: held-out loss only at step 0 and at the end.
            "eval_interval": tokens, "eval_batches": args.eval_batches,
        },
        "arm": [arm],
    }


def run_sim(args, model: str, n_workers: int, arm: dict, layout: str) -> dict:
    spec = parse_spec(sim_spec(args, model, n_workers, arm))
    assert spec.total_steps == args.steps, (spec.total_steps, args.steps)
    tmp = Path(tempfile.mkdtemp(prefix="farflung-bench-"))
    try:
        _Timed.timings.clear()
        _Timed.layout = layout
        with PeakRss() as peak:
            _Timed.t_call = t0 = time.perf_counter()
            result = experiments.run(spec, out=tmp / "run", runtime="ray")
            run_s = time.perf_counter() - t0
        (timing,) = _Timed.timings
        steps = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
        last = [r["loss"] for r in steps if r.get("kind") == "step" and r["step"] == args.steps - 1]
        return {"tokens": spec.total_steps * spec.tokens_per_step, "run_s": run_s, **timing,
                "peak_rss_bytes": peak.bytes, "peak_pss_bytes": peak.pss_bytes, "final_loss": sum(last) / len(last)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sim_in_fresh_ray(args, model: str, n_workers: int, arm: dict, layout: str) -> dict:
    """`run_sim` in this process (a fresh one), Ray started here first, its start-up timed apart as `ray_start_s`.
    The corpus is loaded first, as the bench process had it loaded for the plain run when runs shared a process."""
    import ray

    load_corpus(DataConfig(corpus="stdlib"), args.seed)
    t0 = time.perf_counter()
    started = cluster_runtime.start_ray()
    ray_start_s = time.perf_counter() - t0
    wait_for_idle_workers(int(ray.cluster_resources().get("CPU", 1)))
    saved = cluster_runtime.RUNTIMES["ray"]
    cluster_runtime.RUNTIMES["ray"] = _Timed  # the runner looks the class up in this same dict
    try:
        return run_sim(args, model, n_workers, arm, layout) | {
            "ray_start_s": ray_start_s, "ray_cpus": ray.cluster_resources().get("CPU", 0.0)}
    finally:
        cluster_runtime.RUNTIMES["ray"] = saved
        if started:
            ray.shutdown()


def wait_for_idle_workers(count: int, timeout_s: float = 120.0) -> None:
    """Until Ray's worker processes, which it starts for a new driver (one per CPU), are up and idle: a run is timed
    with Ray already up, as it was when the bench's own process started Ray once, minutes before the first run."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        idle = 0
        for p in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                idle += p.cmdline()[:1] == ["ray::IDLE"]
        if idle >= count:
            return
        time.sleep(0.2)


def plain_in_fresh_process(args, model: str, n_workers: int) -> dict:
    return run_plain(args, model, n_workers, load_corpus(DataConfig(corpus="stdlib"), args.seed))


def run_plain(args, model: str, n_workers: int, corpus) -> dict:
    cfg, optim = PRESETS[model], OptimConfig()
    batch = n_workers * args.batch_size
    with PeakRss() as peak:
        torch.manual_seed(args.seed)
        gpt = GPT(cfg)
        optimizer = gpt.configure_optimizers(optim.weight_decay, optim.lr, (optim.beta1, optim.beta2))
        sampler = ShardSampler(corpus.train, 0, 1, batch, cfg.block_size, args.seed)
        gpt.train()
        t0 = time.perf_counter()
        for step in range(args.steps):
            x, y = sampler.next_batch()
            optimizer.zero_grad(set_to_none=False)
            _, loss = gpt(x, y)
            loss.backward()
            for group in optimizer.param_groups:
                group["lr"] = optim.lr_at(step, args.steps)
            if optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(gpt.parameters(), optim.grad_clip)
            optimizer.step()
            final_loss = loss.item()
        loop_s = time.perf_counter() - t0
    return {"tokens": args.steps * batch * cfg.block_size, "loop_s": loop_s, "final_loss": final_loss,
            "peak_rss_bytes": peak.bytes, "peak_pss_bytes": peak.pss_bytes}


def median_of(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


GROWTH_DEFAULTS = {"models": ["tiny", "small", "base"], "workers": [1, 4, 16, 64], "steps": 3, "diloco": 2}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", help="simulated worker counts N (default 4 8)")
    parser.add_argument("--models", nargs="+", choices=sorted(PRESETS), help="model presets (default small)")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default 30)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per worker per step, b (default 8)")
    parser.add_argument("--diloco", type=int, metavar="H",
                        help="also time a DiLoCo arm on home-broadband with H inner steps (default: off)")
    parser.add_argument("--growth", action="store_true",
                        help="the cost of growth: defaults become --models tiny small base --workers 1 4 16 64 "
                             "--steps 3 --diloco 2, and a table of ratio, start-up and peak memory per model and N "
                             "is printed; runs whose memory would not fit the machine are skipped and listed")
    parser.add_argument("--layouts", nargs="+", default=["grouped"], choices=["grouped", "per-worker"],
                        help="how replicas sit on actors: grouped (the runtime) and/or per-worker (one actor each)")
    parser.add_argument("--gloo", action="store_true", help="also time the process-per-worker gloo baseline")
    parser.add_argument("--pool", action="store_true",
                        help="hold one pool of replica hosts across all runs, as a sweep does, after one untimed run "
                             "has started them: start-up is then building the replicas only (grouped layout); the "
                             "runs then share one process and its memory")
    parser.add_argument("--repeat", type=int, default=1, help="run everything this many times; report medians")
    parser.add_argument("--eval-batches", type=int, default=1,
                        help="held-out batches per sim evaluation (at step 0 and at the end; default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print all figures as one JSON object")
    args = parser.parse_args(argv)
    defaults = GROWTH_DEFAULTS if args.growth else {"models": ["small"], "workers": [4, 8], "steps": 30, "diloco": 0}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.steps < 1 or args.batch_size < 1 or min(args.workers) < 1 or args.repeat < 1 or args.diloco < 0:
        parser.error("--steps, --batch-size, --workers and --repeat must be positive, --diloco at least 0")
    args.workers = sorted(set(args.workers))
    return args


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def bench_arms(args) -> list[dict]:
    arms = [{"name": "ddp-datacenter", "algorithm": "ddp", "network": "datacenter"}]
    if args.diloco:
        arms.append({"name": f"diloco{args.diloco}-home", "network": "home-broadband",
                     "algorithm": {"name": "diloco", "inner_steps": args.diloco}})
    return arms


def measure(args) -> dict:
    """Every figure, as medians over --repeat rounds, each round running plain, gloo and sim side by side.

    Each plain and sim run has a fresh process of its own (`bench.fresh`), a sim run with its own Ray, so that no
    run's memory holds what another left; with --pool the sim runs share this process, one Ray and the pool."""
    arms = bench_arms(args)
    rounds: dict[tuple, list[dict]] = {}
    skipped: dict[tuple, str] = {}
    ray_starts, ray_cpus = [], [0.0]

    def fits(key: tuple, formula: int) -> bool:
        need = predicted_peak(key, rounds, formula)
        free = psutil.virtual_memory().available
        if key not in skipped and need is not None and need > 0.9 * free:
            skipped[key] = f"needs about {need / 2**30:.1f} GiB by the runs before it, {free / 2**30:.1f} GiB free"
            note(f"  skipped: {skipped[key]}")
        return key not in skipped

    def sim(model: str, n: int, arm: dict, layout: str) -> dict:
        if args.pool:
            return run_sim(args, model, n, arm, layout)
        run = in_fresh_process(sim_in_fresh_ray, args, model, n, arm, layout)
        ray_starts.append(run.pop("ray_start_s"))
        ray_cpus[0] = run.pop("ray_cpus")
        return run

    def one_round(r: int) -> None:
        for model in args.models:
            for n in args.workers:
                runs = [((model, n, "plain", ""), 0, f"plain, batch {n * args.batch_size}", lambda: in_fresh_process(plain_in_fresh_process, args,
                                                                                          model, n))]
                for arm in arms:
                    formula = replica_state_bytes(PRESETS[model], algorithm_of(arm))
                    if args.gloo:
                        h = args.diloco * ("diloco" in arm["name"])
                        runs.append(((model, n, "gloo", arm["name"]), formula, f"gloo {arm['name']}",
                                     lambda h=h: run_gloo(n, model, args.batch_size, args.steps, h, args.seed)))
                    for layout in args.layouts:
                        runs.append(((model, n, layout, arm["name"]), formula, f"sim {arm['name']} ({layout})",
                                     lambda arm=arm, layout=layout: sim(model, n, arm, layout)))
                for key, formula, what, go in runs:
                    note(f"[{r + 1}/{args.repeat}] {model}, N = {n}: {what} ...")
                    if fits(key, formula):
                        result = go()
                        rounds.setdefault(key, []).append(result)
                        # The run's own figures at once: a benchmark stopped part-way still leaves what it measured.
                        note("  " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()
                                              if isinstance(v, (int, float)) and not isinstance(v, bool)))

    if args.pool:
        import ray

        note("starting Ray ...")
        t0 = time.perf_counter()
        started = cluster_runtime.start_ray()
        ray_starts.append(time.perf_counter() - t0)
        saved = cluster_runtime.RUNTIMES["ray"]
        cluster_runtime.RUNTIMES["ray"] = _Timed  # the runner looks the class up in this same dict
        try:
            with replica_hosts.HostPool():
                note("starting the pool's hosts (an untimed run) ...")
                run_sim(args, args.models[0], min(args.workers), arms[0], "grouped")
                for r in range(args.repeat):
                    one_round(r)
            ray_cpus[0] = ray.cluster_resources().get("CPU", 0.0)
        finally:
            cluster_runtime.RUNTIMES["ray"] = saved
            if started:
                ray.shutdown()
    else:
        for r in range(args.repeat):
            one_round(r)
    return {"arms": arms, "ray_start_s": statistics.median(ray_starts) if ray_starts else 0.0,
            "ray_cpus": ray_cpus[0], "medians": {key: median_of(runs) for key, runs in rounds.items()},
            "skipped": [{"model": k[0], "n": k[1], "layout": k[2], "arm": k[3], "reason": why}
                        for k, why in skipped.items()]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_start = os.getloadavg()
    measured = measure(args)
    measured["load"] = {"start": "/".join(f"{x:.2f}" for x in load_start),
                        "end": "/".join(f"{x:.2f}" for x in os.getloadavg())}
    out = figures(args, measured)
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print_tables(out, args.growth)
    return 0


if __name__ == "__main__":
    sys.exit(main())
