"""What `bench/throughput.py` reports: its measured medians as one JSON object (`figures`: machine, settings, one
row per model, N, arm and layout, the memory growth, what was skipped), and that object printed as tables."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import psutil
import torch

from bench.growth import growth_rows, print_growth
from bench.memory import MB, replica_state_bytes
from trainer.model import PRESETS, count_params


def algorithm_of(arm: dict) -> str:
    return arm["algorithm"] if isinstance(arm["algorithm"], str) else arm["algorithm"]["name"]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def figures(args, measured: dict) -> dict:
    """The JSON object: machine, settings, one row per model, N, arm and layout, the memory growth, what was skipped."""
    med = measured["medians"]
    rows = []
    for (model, n, layout, arm), m in med.items():
        if layout in ("plain", "gloo"):
            continue
        row = {"model": model, "n": n, "arm": arm, "layout": layout, "startup_s": round(m["startup_s"], 2),
               "peak_rss_mb": round(m["peak_rss_bytes"] / MB), "peak_pss_mb": round(m["peak_pss_bytes"] / MB),
               "final_loss": round(m["final_loss"], 4)}
        plain = med.get((model, n, "plain", ""))
        if plain:  # none where the plain run would not have fitted in memory
            plain_tok_s = plain["tokens"] / plain["loop_s"]
            row |= {"plain_tok_s": round(plain_tok_s), "whole_ratio": round(m["tokens"] / m["run_s"] / plain_tok_s, 3),
                    "loop_ratio": round(m["tokens"] / m["loop_s"] / plain_tok_s, 3),
                    "plain_final_loss": round(plain["final_loss"], 4),
                    "plain_peak_pss_mb": round(plain["peak_pss_bytes"] / MB)}
        gloo = med.get((model, n, "gloo", arm))
        if gloo and plain:
            row |= {"gloo_whole_ratio": round(m["tokens"] / gloo["whole_s"] / plain_tok_s, 3),
                    "gloo_loop_ratio": round(m["tokens"] / gloo["loop_s"] / plain_tok_s, 3)}
        if gloo:
            row |= {"gloo_startup_s": round(gloo["startup_s"], 2), "gloo_peak_rss_mb": round(gloo["peak_rss_bytes"] / MB),
                    "gloo_peak_pss_mb": round(gloo["peak_pss_bytes"] / MB),
                    "vs_gloo_whole": round(gloo["whole_s"] / m["run_s"], 3)}
        rows.append(row)
    formulas = {(model, arm["name"]): replica_state_bytes(PRESETS[model], algorithm_of(arm))
                for model in args.models for arm in measured["arms"]}
    return {
        "machine": {"cpu": cpu_name(), "logical_cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
                    "ray_cpus": measured["ray_cpus"], "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
                    "torch": torch.__version__, "python": platform.python_version()},
        "settings": {"models": args.models, "workers": args.workers, "steps": args.steps,
                     "batch_size": args.batch_size, "diloco": args.diloco, "repeat": args.repeat, "pool": args.pool,
                     "params": {m: count_params(PRESETS[m]) for m in args.models}},
        "load_average": measured["load"], "ray_start_s": round(measured["ray_start_s"], 2),
        "rows": rows, "memory_growth": growth_rows(med, formulas, args.layouts), "skipped": measured["skipped"],
    }


def print_tables(out: dict, growth: bool) -> None:
    m = out["machine"]
    print(f"machine: {m['cpu']}, {m['logical_cpus']} logical CPUs ({m['usable_cpus']} usable), Ray sees "
          f"{m['ray_cpus']:g} CPUs, {m['memory_gib']} GiB of memory; torch {m['torch']}, Python {m['python']}")
    load = out["load_average"]
    print(f"load average (1/5/15 min): {load['start']} at start, {load['end']} at end (this benchmark's own processes "
          "count too)")
    s = out["settings"]
    pooled = "; hosts held in one pool across runs" if s["pool"] else "; each run in a fresh process"
    print(f"b = {s['batch_size']}, {s['steps']} steps, medians of {s['repeat']} round(s){pooled}; Ray start-up (not "
          f"in any figure, median): {out['ray_start_s']} s; plain: torch's default threads; sim and gloo: 1 thread "
          "per worker")
    print()
    cols = ["model", "n", "arm", "layout", "plain_tok_s", "whole_ratio", "loop_ratio", "startup_s", "peak_pss_mb",
            "peak_rss_mb", "gloo_whole_ratio", "gloo_startup_s", "gloo_peak_pss_mb", "vs_gloo_whole"]
    print("  ".join(f"{c:>{max(len(c), 6)}}" for c in cols))
    for row in out["rows"]:
        print("  ".join(f"{row.get(c, '-')!s:>{max(len(c), 6)}}" for c in cols))
    print()
    if growth:
        print_growth(out)
        print()
    print("memory growth per extra worker (peak PSS summed over the process tree, each page counted once; peak RSS "
          "sum beside it) vs one replica's params + grads + AdamW + strategy copies:")
    for g in out["memory_growth"]:
        print(f"  {g['model']:<6} {g['arm']:<16} {g['layout']:<10} N {g['from_n']:>3} -> {g['to_n']:<3} "
              f"{g['mb_per_worker']:>8.2f} MB/worker, formula {g['formula_mb']:.2f} MB, ratio {g['ratio']:.2f} "
              f"(RSS: {g['rss_mb_per_worker']:.2f} MB/worker, ratio {g['rss_ratio']:.2f})")
    for k in out["skipped"]:
        print(f"  not run: {k['model']}, N = {k['n']}, {k['layout']} {k['arm']}: {k['reason']}")
    print()
    print("whole_ratio: tokens / wall time of experiments.run (Ray already up: run folder, actors, evaluations, training, "
          "teardown, report) over plain tok/s at batch N*b; loop_ratio: the same from actors ready to arm finished;")
    print("startup_s: from the run call to the workers ready; vs_gloo_whole: gloo's whole time over the sim's (> 1: "
          "farflung is faster); gloo_*_ratio: the gloo baseline's own ratios to plain.")
