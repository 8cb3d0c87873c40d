"""The cost of growth: how a run's memory, start-up and speed grow with its workers and its model.

`growth_rows` gives the peak memory added per extra worker between consecutive N, beside the formula for what one
replica holds (`bench.memory.replica_state_bytes`); `print_growth` prints the whole-run ratio to plain PyTorch,
the start-up and the peak memory per model and N as one table per arm; `predicted_peak` is what a run about to
start will need, from the runs of the same kind already measured, so that one that would not fit the machine
is skipped rather than started.
"""

from __future__ import annotations

import statistics

from bench.memory import MB

# What the memory of a run grows by per extra worker, at most, where fewer than two runs of its kind are measured:
# the bound on the simulator (1.5x one replica's state) and, where the state is not the measure, the
# proportion of the largest run so far (a plain run's activations and a gloo run's processes grow with N).
SIM_BOUND = 1.5


def predicted_peak(key: tuple, rounds: dict[tuple, list[dict]], formula: int) -> float | None:
    """Peak PSS in bytes that the run `key` = (model, N, layout, arm) will need, or None before any run of its kind.

    Two runs of the kind (same model, layout and arm; smaller N): the line through the two largest. One: that run
    plus the bound per extra worker (a simulator run) or in proportion to N (plain, gloo)."""
    model, n, layout, arm = key
    earlier = sorted((k[1], statistics.median(r["peak_pss_bytes"] for r in runs)) for k, runs in rounds.items()
                     if (k[0], k[2], k[3]) == (model, layout, arm) and k[1] < n)
    if not earlier:
        return None
    if len(earlier) >= 2:
        (n1, p1), (n2, p2) = earlier[-2:]
        return p2 + (n - n2) * max(0.0, (p2 - p1) / (n2 - n1))
    (n1, p1), = earlier
    if layout in ("plain", "gloo"):
        return p1 * n / n1
    return p1 + (n - n1) * SIM_BOUND * formula


def growth_rows(medians: dict[tuple, dict], formulas: dict[tuple, int], layouts: list[str]) -> list[dict]:
    """Per model, arm and layout, between consecutive N: the peak PSS (and RSS) added per extra worker, and its
    ratio to the formula."""
    rows = []
    for (model, arm), formula in formulas.items():
        for layout in layouts:
            ns = sorted(n for (mo, n, la, a) in medians if (mo, la, a) == (model, layout, arm))
            for n1, n2 in zip(ns, ns[1:]):
                a, b = medians[model, n1, layout, arm], medians[model, n2, layout, arm]
                per = (b["peak_pss_bytes"] - a["peak_pss_bytes"]) / (n2 - n1)
                per_rss = (b["peak_rss_bytes"] - a["peak_rss_bytes"]) / (n2 - n1)
                rows.append({"model": model, "arm": arm, "layout": layout, "from_n": n1, "to_n": n2,
                             "mb_per_worker": round(per / MB, 2), "formula_mb": round(formula / MB, 2),
                             "ratio": round(per / formula, 2), "rss_mb_per_worker": round(per_rss / MB, 2),
                             "rss_ratio": round(per_rss / formula, 2)})
    return rows


def print_growth(out: dict) -> None:
    """One table per arm and layout: N down, models across, each cell whole-run ratio / start-up s / peak PSS MB."""
    models = out["settings"]["models"]
    skipped = {(k["model"], k["n"], k["layout"], k["arm"]) for k in out["skipped"]}
    cells = {(r["model"], r["n"], r["layout"], r["arm"]): r for r in out["rows"]}
    width = 22
    print("the cost of growth: whole-run tok/s ratio to plain PyTorch at batch N*b / start-up s / peak PSS MB "
          "(-: not run, its memory would not fit; ratio -: the plain run would not fit)")
    for layout, arm in dict.fromkeys((r["layout"], r["arm"]) for r in out["rows"]):
        print(f"  {arm} ({layout})")
        print("  " + f"{'N':>4}  " + "".join(f"{m:>{width}}" for m in models))
        for n in out["settings"]["workers"]:
            line = []
            for model in models:
                r = cells.get((model, n, layout, arm))
                if r is None:
                    line.append("-" if (model, n, layout, arm) in skipped else "")
                    continue
                ratio = f"{r['whole_ratio']:.2f}" if "whole_ratio" in r else "-"
                line.append(f"{ratio} / {r['startup_s']:.1f} / {r['peak_pss_mb']:,}")
            print("  " + f"{n:>4}  " + "".join(f"{c:>{width}}" for c in line))
