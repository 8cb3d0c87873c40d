"""`farflung report SWEEP_DIR`: one self-contained HTML page for a sweep, with the feasibility frontier.

The page states the question, the setup (grid, how many arm runs trained and how many were re-timed, the first point's
resolved config and manifest), the frontier plot (bandwidth against latency, one line per algorithm, the competitive
region shaded, the network presets marked), time to target, loss at a fixed simulated-time budget and utilisation
against bandwidth, the frontier table, and the caveats. Plots are PNGs embedded as data; one colour per arm throughout.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from matplotlib.figure import Figure

from cluster.network import PRESETS
from cluster.records import EvalRecord, of_kind
from experiments.frontier import FrontierCriteria, axes_of, frontier
from experiments.report import ARM_COLORS, human_bytes, human_seconds
from experiments.summary import read_metrics


def write_sweep_report(folder: str | Path) -> Path:
    folder = Path(folder)
    grid = json.loads((folder / "grid.json").read_text())
    rows = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    if not rows:
        raise ValueError(f"{folder}: no finished points yet; run or --resume the sweep first")
    criteria = FrontierCriteria(**grid["frontier"])
    baseline = grid["baseline"]
    bandwidth_key, latency_key = axes_of(grid["keys"])
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    colors = {arm: "black" if arm == baseline else ARM_COLORS[i % len(ARM_COLORS)] for i, arm in enumerate(arms)}
    figures, entries = [], []
    if bandwidth_key and latency_key:
        entries = frontier(rows, bandwidth_key, latency_key, baseline, criteria)
        figures.append(("The frontier: least bandwidth at which each algorithm is competitive",
                        _frontier_plot(entries, rows, bandwidth_key, colors)))
    if bandwidth_key:
        budget = next(r["sim_time_s"] for r in rows if r["arm"] == baseline)
        for title, y, label in (("Time to the target loss", "time_to_target_s", "simulated time to target"),
                                (f"Held-out loss after {human_seconds(budget)} of simulated time (the baseline's run)",
                                 "budget_loss", "held-out loss"),
                                ("Compute utilisation", "compute_utilisation", "compute utilisation")):
            if y == "budget_loss":
                rows = [dict(r, budget_loss=_loss_at(Path(r["run_dir"]), r["arm"], budget)) for r in rows]
            figures.append((title, _against_bandwidth(rows, bandwidth_key, latency_key, y, label, colors)))
    if latency_key:
        figures.append(("Held-out loss against latency, at each arm's highest swept bandwidth",
                        _against_latency(rows, bandwidth_key, latency_key, colors)))
    page = folder / "report.html"
    page.write_text(_html(folder, grid, rows, entries, criteria, figures), encoding="utf-8")
    return page


def _loss_at(run_dir: Path, arm: str, budget_s: float) -> float | None:
    """The last held-out loss an arm had reached by `budget_s` of simulated time (None before its first)."""
    evals = [e for e in of_kind(read_metrics(run_dir / "metrics.jsonl"), EvalRecord, arm) if e.time_s <= budget_s]
    return evals[-1].loss if evals else None


def _png(figure: Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return base64.b64encode(buffer.getvalue()).decode()


def _frontier_plot(entries: list[dict], rows: list[dict], bandwidth_key: str, colors: dict) -> str:
    figure = Figure(figsize=(7.5, 5), layout="constrained")
    axes = figure.add_subplot()
    bandwidths = [float(r[bandwidth_key]) for r in rows]
    low, high = min(bandwidths), max(bandwidths)
    for arm in dict.fromkeys(e["arm"] for e in entries):
        mine = sorted((e for e in entries if e["arm"] == arm), key=lambda e: e["latency_s"])
        xs = [e["latency_s"] * 1e3 for e in mine if e["frontier_bps"] is not None]
        ys = [e["frontier_bps"] for e in mine if e["frontier_bps"] is not None]
        if xs:
            axes.plot(xs, ys, marker="o", color=colors[arm], label=f"{arm} ({mine[0]['algorithm']})")
            axes.fill_between(xs, ys, high * 1.5, color=colors[arm], alpha=0.08)
        never = [e["latency_s"] * 1e3 for e in mine if e["frontier_bps"] is None]
        if never:
            axes.scatter(never, [high * 1.2] * len(never), marker="x", color=colors[arm])
    for name, link in PRESETS.items():
        latency_ms = link.one_way_latency_s * 1e3
        if low / 10 <= link.uplink_bps <= high * 10 and latency_ms > 0:
            axes.scatter([latency_ms], [link.uplink_bps], marker="s", color="grey", s=14)
            axes.annotate(name, (latency_ms, link.uplink_bps), fontsize=7, color="grey", xytext=(3, 3),
                          textcoords="offset points")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("one-way access latency per worker (ms, log scale)")
    axes.set_ylabel("bandwidth per worker (bit/s, log scale)")
    axes.set_title("Competitive above each line (shaded); x: never competitive", fontsize=10)
    axes.grid(alpha=0.3, which="both")
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=8)
    return _png(figure)


def _against_bandwidth(rows, bandwidth_key, latency_key, y, label, colors) -> str | None:
    latencies = sorted({r[latency_key] for r in rows}, key=_seconds) if latency_key else [None]
    shown = [latencies[0], latencies[-1]] if len(latencies) > 1 else latencies
    if not any(r[y] is not None for r in rows):
        return None  # nothing to draw: e.g. no target loss set, or none reached it
    figure = Figure(figsize=(11, 4), layout="constrained")
    for i, latency in enumerate(shown):
        axes = figure.add_subplot(1, len(shown), i + 1)
        for arm, color in colors.items():
            points = sorted((float(r[bandwidth_key]), r[y]) for r in rows
                            if r["arm"] == arm and (latency is None or r[latency_key] == latency) and r[y] is not None)
            if points:
                axes.plot(*zip(*points), marker="o", color=color, label=arm)
        axes.set_xscale("log")
        if y == "time_to_target_s":
            axes.set_yscale("log")
        axes.set_xlabel("bandwidth per worker (bit/s, log scale)")
        axes.set_ylabel(label + (" (s)" if y == "time_to_target_s" else ""))
        axes.set_title(f"latency {latency}" if latency is not None else label, fontsize=9)
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=7)
    return _png(figure)


def _against_latency(rows, bandwidth_key, latency_key, colors) -> str:
    figure = Figure(figsize=(7.5, 4), layout="constrained")
    axes = figure.add_subplot()
    for arm, color in colors.items():
        mine = [r for r in rows if r["arm"] == arm and r["final_loss"] is not None]
        if not mine:
            continue
        top = max(float(r[bandwidth_key]) for r in mine) if bandwidth_key else None
        points = sorted((_seconds(r[latency_key]) * 1e3, r["final_loss"]) for r in mine
                        if top is None or float(r[bandwidth_key]) == top)
        axes.plot(*zip(*points), marker="o", color=color, label=arm)
    axes.set_xscale("log")
    axes.set_xlabel("one-way access latency per worker (ms, log scale)")
    axes.set_ylabel("final held-out loss")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return _png(figure)


def _seconds(latency) -> float:
    from cluster.network import parse_duration

    return parse_duration(latency)


def _bps(value: float | None) -> str:
    if value is None:
        return "—"
    for scale, unit in ((1e9, "Gbit/s"), (1e6, "Mbit/s"), (1e3, "kbit/s")):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.3g} bit/s"


def _frontier_cell(entry: dict) -> str:
    if entry["frontier_bps"] is None:
        return "never competitive in the swept range"
    if entry["below_bps"] is None:
        return f"at most {_bps(entry['frontier_bps'])} (competitive at the lowest swept bandwidth)"
    return _bps(entry["frontier_bps"])


def _html(folder: Path, grid: dict, rows: list[dict], entries: list[dict], criteria: FrontierCriteria,
          figures: list[tuple[str, str]]) -> str:
    e = html.escape
    retimed = sum(r["retimed"] for r in rows)
    points = len({r["point"] for r in rows})
    wanted = [f"final held-out loss within {100 * criteria.loss_tolerance:g} % of the baseline's"
              if criteria.loss_tolerance is not None else "",
              f"the target loss within {criteria.time_factor:g}x the baseline's simulated time"
              if criteria.time_factor is not None else "",
              f"compute utilisation of at least {100 * criteria.utilisation:g} %"
              if criteria.utilisation is not None else ""]
    competitive = " and ".join(w for w in wanted if w)
    table = "".join(
        f"<tr><td>{e(x['arm'])}</td><td>{e(x['algorithm'])}</td><td>{e(str(x['latency']))}</td>"
        f"<td>{_frontier_cell(x)}</td>"
        f"<td>{_bps(x['below_bps'])}</td><td>{_bps(x['above_bps'])}</td></tr>" for x in entries)
    images = "".join(f"<h2>{e(title)}</h2>" + (f"<img alt=\"{e(title)}\" src=\"data:image/png;base64,{data}\">"
                                                if data else "<p>Nothing to plot: no arm has this figure (a time to "
                                                "target needs <code>run.target_loss</code>, and an arm that reaches "
                                                "it).</p>") for title, data in figures)
    first = folder / "points" / f"{min(r['point'] for r in rows):04d}"
    config = (first / "config.toml").read_text() if (first / "config.toml").is_file() else ""
    manifest = (first / "manifest.json").read_text() if (first / "manifest.json").is_file() else ""
    sent = sum(r["bytes_sent"] for r in rows)
    return f"""<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>farflung sweep</title>
<style>body {{ font-family: system-ui, sans-serif; max-width: 64rem; margin: 2rem auto; }}
table {{ border-collapse: collapse; }} th, td {{ border: 1px solid #ccc; padding: 0.2rem 0.5rem; }}
img {{ max-width: 100%; }} pre {{ background: #f6f6f6; padding: 0.5rem; overflow-x: auto; }}</style></head><body>
<h1>Sweep: {e(grid['file'])}</h1>
<p>The question: at what bandwidth and latency between workers does each algorithm stay competitive with the
baseline, <b>{e(grid['baseline'])}</b>? Competitive here means {e(competitive)}.</p>
<p>Setup: {points} points over {', '.join(f'<code>{e(k)}</code>' for k in grid['keys'])}; {len(rows)} arm runs, of
which {len(rows) - retimed} trained and {retimed} re-timed from a trained run's trace (bit for bit what training again
would give); {human_bytes(sent)} on the simulated wire in all.</p>
<h2>Frontier values</h2>
<table id="frontier-table"><tr><th>arm</th><th>algorithm</th><th>latency</th><th>least competitive bandwidth
(interpolated)</th><th>grid point below (not competitive)</th><th>grid point above (competitive)</th></tr>
{table}</table>
{images}
<h2>Caveats</h2>
<ul><li>The model is small (the file's <code>[model]</code>); what the frontier says of frontier-scale models needs the
estimate, which extrapolates the same cost model.</li>
<li>Time is modelled (alpha-beta costs on a virtual clock, compute from device profiles), not measured; the real mode
and <code>farflung fidelity</code> check the model against real peers.</li>
<li>Bandwidths between grid points are interpolated on the log axis; the bracketing points are in the table.</li></ul>
<h2>Resolved configuration (first point)</h2><pre>{e(config)}</pre>
<h2>Manifest (first point)</h2><pre>{e(manifest)}</pre>
</body></html>
"""
