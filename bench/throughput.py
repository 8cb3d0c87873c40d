"""Wall-clock throughput of the simulator against plain single-process PyTorch on the same machine.

For each N in --workers it times:

* plain: one process, one GPT, AdamW from `GPT.configure_optimizers`, batch N*b, torch's default thread
  count, the same number of optimizer steps, the same lr schedule and gradient clipping as a replica;
* sim: `experiments.run(spec, runtime="ray")` of a one-arm experiment, DDP on `datacenter` (an exchange
  after every step, the most of any arm), N Ray actors of batch b each; optionally a DiLoCo arm too.

Ray is started here, before any timing, so its start-up is reported on its own line; the runner does not
shut down a Ray it did not start, so one Ray serves every run and is shut down at the end. Run it with
`python bench/throughput.py` (about 3-5 minutes on a 2-core machine with the defaults).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

import experiments
from cluster import runtime as cluster_runtime
from experiments.spec import parse_spec
from trainer.data import DataConfig, ShardSampler, load_corpus
from trainer.model import GPT, PRESETS
from trainer.replica import OptimConfig


class _TimedRayRuntime(cluster_runtime.RayRuntime):
    """The Ray runtime, unchanged, plus timestamps: actors built and ready, arm finished, actors gone."""

    timings: list[dict] = []

    def __init__(self, specs):
        t0 = time.perf_counter()
        super().__init__(specs)
        self._ready = time.perf_counter()
        self._record = {"construct_s": self._ready - t0}

    def __exit__(self, *exc):
        t_done = time.perf_counter()
        super().__exit__(*exc)
        self._record["loop_s"] = t_done - self._ready
        self._record["teardown_s"] = time.perf_counter() - t_done
        _TimedRayRuntime.timings.append(self._record)


def sim_spec(args, n_workers: int, arm: dict) -> dict:
    block = PRESETS[args.model].block_size
    tokens = args.steps * n_workers * args.batch_size * block
    return {
        "name": f"bench-{arm['name']}-n{n_workers}",
        "model": {"preset": args.model},
        "data": {"corpus": "stdlib"},
        "run": {
            "workers": n_workers, "batch_size": args.batch_size, "tokens": tokens, "seed": args.seed,
            # One evaluation interval spanning the whole run: held-out loss only at step 0 and at the end.
            "eval_interval": tokens, "eval_batches": args.eval_batches,
        },
        "arm": [arm],
    }


def run_sim(args, n_workers: int, arm: dict) -> dict:
    spec = parse_spec(sim_spec(args, n_workers, arm))
    assert spec.total_steps == args.steps, (spec.total_steps, args.steps)
    tmp = Path(tempfile.mkdtemp(prefix="farflung-bench-"))
    try:
        _TimedRayRuntime.timings.clear()
        t0 = time.perf_counter()
        result = experiments.run(spec, out=tmp / "run", runtime="ray")
        run_s = time.perf_counter() - t0
        (timing,) = _TimedRayRuntime.timings
        steps = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
        last = [r["loss"] for r in steps if r.get("kind") == "step" and r["step"] == args.steps - 1]
        return {
            "tokens": spec.total_steps * spec.tokens_per_step, "run_s": run_s, **timing,
            "final_loss": sum(last) / len(last),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_plain(args, n_workers: int, corpus) -> dict:
    cfg, optim = PRESETS[args.model], OptimConfig()
    batch = n_workers * args.batch_size
    torch.manual_seed(args.seed)
    model = GPT(cfg)
    optimizer = model.configure_optimizers(optim.weight_decay, optim.lr, (optim.beta1, optim.beta2))
    sampler = ShardSampler(corpus.train, 0, 1, batch, cfg.block_size, args.seed)
    model.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        x, y = sampler.next_batch()
        optimizer.zero_grad(set_to_none=False)
        _, loss = model(x, y)
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = optim.lr_at(step, args.steps)
        if optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        optimizer.step()
        final_loss = loss.item()
    loop_s = time.perf_counter() - t0
    return {"tokens": args.steps * batch * cfg.block_size, "loop_s": loop_s, "final_loss": final_loss}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[4, 8], help="simulated worker counts N (default 4 8)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run (default 30)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per worker per step, b (default 8)")
    parser.add_argument("--model", default="small", choices=sorted(PRESETS), help="model preset (default small)")
    parser.add_argument("--diloco", type=int, default=0, metavar="H",
                        help="also time a DiLoCo arm on home-broadband with H inner steps (default: off)")
    parser.add_argument("--eval-batches", type=int, default=1,
                        help="held-out batches per sim evaluation (at step 0 and at the end; default 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or min(args.workers) < 1:
        parser.error("--steps, --batch-size and --workers must be positive")

    arms = [{"name": "ddp-datacenter", "algorithm": "ddp", "network": "datacenter"}]
    if args.diloco:
        arms.append({"name": f"diloco{args.diloco}-home", "network": "home-broadband",
                     "algorithm": {"name": "diloco", "inner_steps": args.diloco}})

    def note(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    load_before = os.getloadavg()
    # Plain runs first, before Ray exists, so its idle daemons do not share the cores with them.
    corpus = load_corpus(DataConfig(corpus="stdlib"), args.seed)
    plain_threads = torch.get_num_threads()
    plain = {}
    for n in args.workers:
        note(f"plain PyTorch, batch {n * args.batch_size}, {args.steps} steps ...")
        plain[n] = run_plain(args, n, corpus)

    import ray

    note("starting Ray ...")
    t0 = time.perf_counter()
    started = cluster_runtime.start_ray()
    ray_start_s = time.perf_counter() - t0
    saved = cluster_runtime.RUNTIMES["ray"]
    cluster_runtime.RUNTIMES["ray"] = _TimedRayRuntime  # the runner looks the class up in this same dict
    sim = {}
    try:
        ray_cpus = ray.cluster_resources().get("CPU", 0.0)
        for n in args.workers:
            for arm in arms:
                note(f"sim {arm['name']}, {n} workers x batch {args.batch_size}, {args.steps} steps ...")
                sim[n, arm["name"]] = run_sim(args, n, arm)
    finally:
        cluster_runtime.RUNTIMES["ray"] = saved
        if started:
            ray.shutdown()

    load_after = os.getloadavg()
    cfg = PRESETS[args.model]
    print(f"machine: {cpu_name()}, {os.cpu_count()} logical CPUs ({len(os.sched_getaffinity(0))} usable), "
          f"Ray sees {ray_cpus:g} CPUs; torch {torch.__version__}, Python {platform.python_version()}, Ray {ray.__version__}")
    print(f"load average (1/5/15 min): {'/'.join(f'{x:.2f}' for x in load_before)} at start, "
          f"{'/'.join(f'{x:.2f}' for x in load_after)} at end (counts this benchmark's own processes too; load from anything else distorts every figure)")
    print(f"threads: plain PyTorch {plain_threads} (torch default); sim 1 per worker actor (runner's setting), "
          f"actors get num_cpus = min(1, CPUs/N)")
    print(f"model: {args.model} ({GPT(cfg).num_params():,} params, block {cfg.block_size}), stdlib corpus, "
          f"b = {args.batch_size} per worker, {args.steps} optimizer steps; sim evaluates at step 0 and at the end "
          f"({args.eval_batches} held-out batch{'es' if args.eval_batches != 1 else ''} each)")
    print(f"Ray start-up (once, not in any figure below): {ray_start_s:.1f} s"
          + ("" if started else " (Ray was already running)"))
    print()
    header = (f"{'N':>3}  {'arm':<16} {'tokens':>9}  {'plain tok/s':>11}  {'sim tok/s':>9}  {'ratio':>6}  "
              f"{'loop tok/s':>10}  {'ratio':>6}  {'plain s':>7}  {'run s':>6}  {'actors s':>8}  {'loop s':>6}  "
              f"{'loss plain/sim':>14}")
    print(header)
    print("-" * len(header))
    for n in args.workers:
        p = plain[n]
        p_tps = p["tokens"] / p["loop_s"]
        for arm in arms:
            s = sim[n, arm["name"]]
            run_tps, loop_tps = s["tokens"] / s["run_s"], s["tokens"] / s["loop_s"]
            print(f"{n:>3}  {arm['name']:<16} {s['tokens']:>9,}  {p_tps:>11,.0f}  {run_tps:>9,.0f}  "
                  f"{run_tps / p_tps:>6.3f}  {loop_tps:>10,.0f}  {loop_tps / p_tps:>6.3f}  {p['loop_s']:>7.1f}  "
                  f"{s['run_s']:>6.1f}  {s['construct_s']:>8.1f}  {s['loop_s']:>6.1f}  "
                  f"{p['final_loss']:>6.3f}/{s['final_loss']:.3f}")
    print()
    print("plain tok/s: tokens / time of the plain training loop (model built and corpus loaded beforehand).")
    print("sim tok/s:   tokens / wall time of the whole experiments.run call (Ray already up): corpus load, actor")
    print("             construction, both evaluations, training, actor teardown, run folder and report.")
    print("loop tok/s:  tokens / time from all actors ready to the arm finished (training + the two evaluations).")
    print("ratio:       sim (or loop) tok/s divided by plain tok/s at the same N; 1.0 would mean no simulator overhead.")
    print("loss:        training loss at the last step (plain: batch N*b; sim: mean over workers).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
