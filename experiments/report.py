"""Turns a run's records and summary into three PNG plots and one self-contained HTML report.

Figures are built with the object-oriented `Figure` API rather than pyplot: no global figure registry, no GUI backend
picked from the environment, nothing left open when a sweep writes hundreds of reports in one process.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

from cluster.records import EvalRecord, Record
from experiments.churn_report import NAME as CHURN_PLOT
from experiments.churn_report import churn_figure, faults_html

BASELINE_COLOR = "black"
ARM_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
MINUTE, HOUR, DAY = 60.0, 3600.0, 86400.0
FINE_TICKS_S = [1e-3, 2e-3, 5e-3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 30, MINUTE, 2 * MINUTE, 5 * MINUTE,
                10 * MINUTE, 20 * MINUTE, 30 * MINUTE, HOUR, 2 * HOUR, 6 * HOUR, 12 * HOUR, DAY, 2 * DAY, 7 * DAY,
                30 * DAY, 365 * DAY]
COARSE_TICKS_S = [1e-3, 0.01, 0.1, 1, 10, MINUTE, 10 * MINUTE, HOUR, 6 * HOUR, DAY, 7 * DAY, 30 * DAY, 365 * DAY]
PLOT_NAMES = ("loss_vs_tokens.png", "loss_vs_time.png", "bytes.png")


def human_bytes(n: float) -> str:
    """Decimal units, as link speeds are quoted: '3.2 GB' is 3.2e9 bytes."""
    value = float(n)
    if abs(value) < 999.5:
        return f"{value:.0f} B"
    for unit in ("kB", "MB", "GB", "TB", "PB"):
        value /= 1000
        if abs(value) < 99.95:
            return f"{value:.1f} {unit}"
        # Move up a unit where the value would round to 1000 ('1.0 MB', not '1000 kB').
        if abs(value) < 999.5 or unit == "PB":
            return f"{value:.0f} {unit}"
    raise AssertionError("unreachable")


def human_seconds(s: float) -> str:
    if s == 0:
        return "0 s"
    if s < 0:
        return "-" + human_seconds(-s)
    # (seconds per unit, name, seconds at which the next unit takes over, decimals)
    units = [(1e-6, "µs", 1e-3, 0), (1e-3, "ms", 1.0, 0), (1.0, "s", 60.0, 1),
             (60.0, "min", 3600.0, 1), (3600.0, "h", 86400.0, 1), (86400.0, "d", math.inf, 1)]
    for scale, name, limit, decimals in units:
        # Compare after rounding so that 59.97 s reads '1.0 min', not '60.0 s'.
        if round(s / scale, decimals) < limit / scale or limit == math.inf:
            return f"{s / scale:.{decimals}f} {name}"
    raise AssertionError("unreachable")


def write_report(run_dir: Path, records: list[Record], summary: dict, config_text: str, manifest: dict,
                 title: str) -> list[Path]:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    evals = _evals_by_arm(records, list(summary["arms"]))
    # The simulator's clock is the network model's; real peers' is the wall clock.
    clock = "wall-clock" if manifest.get("mode") == "real" else "simulated"
    figures = {
        "loss_vs_tokens.png": _loss_figure(evals, summary, x_key="tokens"),
        "loss_vs_time.png": _loss_figure(evals, summary, x_key="time_s", clock=clock),
        "bytes.png": _bytes_figure(summary),
    }
    churn = churn_figure(records, list(summary["arms"]), {n: a["workers"] for n, a in summary["arms"].items()},
                         clock=clock)
    names = PLOT_NAMES + ((CHURN_PLOT,) if churn is not None else ())
    if churn is not None:
        figures[CHURN_PLOT] = churn
    paths = []
    for name in names:
        path = run_dir / name
        # No 'Software' metadata, so a rerun of a deterministic experiment gives byte-identical files.
        figures[name].savefig(path, format="png", dpi=110, metadata={"Software": None})
        paths.append(path)
    page = run_dir / "report.html"
    page.write_text(_html(paths, summary, config_text, manifest, title), encoding="utf-8")
    return paths + [page]


def headline(summary: dict) -> str:
    """One paragraph in plain words; every number in it comes from the summary."""
    arms, name = summary["arms"], summary["baseline"]
    base = arms[name]
    sentences = [f"The baseline, {name} ({base['algorithm']} on {base['network']}), reached held-out loss "
                 f"{_loss(base['final_loss'])} in {human_seconds(base['time_s'])} of simulated time, "
                 f"sending {human_bytes(base['bytes_sent'])}."]
    for other, arm in arms.items():
        if other == name:
            continue
        if arm["diverged"]:
            why = ("was not a finite number" if arm["final_loss"] is None
                   else f"{_loss(arm['final_loss'])}, was above the untrained model's")
            sentences.append(f"{other} diverged (its last held-out loss {why}).")
            continue
        loss = _loss(arm["final_loss"])
        if arm["loss_ratio"] is not None:
            loss += f" ({arm['loss_ratio']:.2f}x the baseline)"
        # Against an arm on the same network, the algorithm is the only difference left; that is the fair contrast.
        references = [name] + [n for n, a in arms.items()
                               if n not in (name, other) and a["network"] == arm["network"]][:1]
        times = [f"{_factor(arm['time_s'] / arms[r]['time_s'])}x {r}'s" for r in references if arms[r]["time_s"] > 0]
        sent = [_bytes_phrase(arm["bytes_sent"], arms[r]["bytes_sent"], r) for r in references]
        sending = f"{human_bytes(arm['bytes_sent'])} ({', '.join(sent)})" if arm["bytes_sent"] else "nothing"
        sentences.append(f"{other} reached loss {loss} in {human_seconds(arm['time_s'])} of simulated time"
                         + (f" ({', '.join(times)})" if times else "") + f", sending {sending}.")
    target = summary["target_loss"]
    if target is not None:
        hit = [n for n, arm in arms.items() if arm["time_to_target_s"] is not None]
        missed = [n for n in arms if n not in hit]
        sentences.append(f"Target loss {target:.2f} was reached by {_names(hit) or 'no arm'}"
                         + (f" and not by {_names(missed)}." if missed else "."))
    return " ".join(sentences)


def _evals_by_arm(records: list[Record], names: list[str]) -> dict[str, list[EvalRecord]]:
    evals: dict[str, list[EvalRecord]] = {name: [] for name in names}
    for record in records:
        if isinstance(record, EvalRecord) and record.arm in evals and math.isfinite(float(record.loss)):
            evals[record.arm].append(record)
    return {name: sorted(points, key=lambda r: (r.step, r.time_s)) for name, points in evals.items()}


def _styles(summary: dict) -> dict[str, dict]:
    styles, colors = {}, iter(ARM_COLORS * (1 + len(summary["arms"]) // len(ARM_COLORS)))
    for name in summary["arms"]:
        if name == summary["baseline"]:
            # Wide and underneath, so an arm that matches the baseline exactly (DDP on any network, per token)
            # shows as a coloured line inside the black one instead of vanishing behind it.
            styles[name] = {"color": BASELINE_COLOR, "linewidth": 4.0, "zorder": 2, "label": f"{name} (baseline)"}
        else:
            styles[name] = {"color": next(colors), "linewidth": 1.5, "zorder": 3, "label": name}
    return styles


def _loss_figure(evals: dict[str, list[EvalRecord]], summary: dict, x_key: str, clock: str = "simulated") -> Figure:
    figure = Figure(figsize=(7.5, 4.5), layout="constrained")
    axes = figure.add_subplot()
    styles = _styles(summary)
    for name, points in evals.items():
        # A log axis cannot place t = 0 (the eval before the first step), so time plots start at the first tick.
        points = [p for p in points if x_key == "tokens" or p.time_s > 0]
        if points:
            axes.plot([getattr(p, x_key) for p in points], [p.loss for p in points], marker="o", markersize=3,
                      **styles[name])
    if summary["target_loss"] is not None:
        axes.axhline(summary["target_loss"], color="grey", linestyle="--", linewidth=1,
                     label=f"target {summary['target_loss']:.2f}")
    if x_key == "time_s":
        axes.set_xscale("log")
        _time_ticks(axes, [p.time_s for points in evals.values() for p in points if p.time_s > 0])
        axes.set_xlabel(f"{clock} time (log scale)")
        axes.set_title(f"Held-out loss vs {clock} time")
    else:
        axes.xaxis.set_major_formatter(FuncFormatter(lambda x, _: _human_count(x)))
        axes.set_xlabel("tokens trained (all workers)")
        axes.set_title("Held-out loss vs tokens")
    axes.set_ylabel("held-out loss")
    axes.grid(True, which="major", alpha=0.3)
    if axes.has_data():
        axes.legend(fontsize="small")
    else:
        axes.text(0.5, 0.5, "no held-out evaluations recorded", ha="center", va="center", transform=axes.transAxes)
    return figure


def _time_ticks(axes, times: list[float]) -> None:
    """Ticks at round human durations (1 min, 1 h, 1 d) instead of powers of ten, which read as '1.7 min'."""
    axes.xaxis.set_major_formatter(FuncFormatter(lambda x, _: human_seconds(x)))
    axes.xaxis.set_minor_formatter(NullFormatter())
    if not times:
        return
    low, high = min(times) / 1.5, max(times) * 1.5
    for candidates in (FINE_TICKS_S, COARSE_TICKS_S):
        ticks = [t for t in candidates if low <= t <= high]
        if len(ticks) <= 8:
            break
    ticks = ticks[::max(1, math.ceil(len(ticks) / 8))]  # a run shorter than any round duration has none
    if len(ticks) >= 2:
        axes.xaxis.set_major_locator(FixedLocator(ticks))


def _bytes_figure(summary: dict) -> Figure:
    names = list(summary["arms"])
    sent = [summary["arms"][name]["bytes_sent"] for name in names]
    styles = _styles(summary)
    figure = Figure(figsize=(max(5.0, 1.3 * len(names) + 2), 4.5), layout="constrained")
    axes = figure.add_subplot()
    # Zero-height bars have no place on a log axis; they are left empty and labelled '0 B' at the floor.
    heights = [b if b > 0 else math.nan for b in sent]
    bars = axes.bar(names, heights, color=[styles[n]["color"] for n in names], edgecolor="black", linewidth=0.5)
    axes.set_yscale("log")
    positive = [b for b in sent if b > 0]
    low, high = (min(positive), max(positive)) if positive else (1, 1000)
    axes.set_ylim(low / 3, high * 5)
    for bar, value in zip(bars, sent):
        axes.annotate(human_bytes(value), (bar.get_x() + bar.get_width() / 2, value if value > 0 else low / 3),
                      xytext=(0, 3), textcoords="offset points", ha="center", va="bottom", fontsize="small")
    axes.yaxis.set_major_formatter(FuncFormatter(lambda y, _: human_bytes(y)))
    axes.set_ylabel("bytes sent, all workers (log scale)")
    axes.set_title("Total bytes on the wire")
    axes.tick_params(axis="x", labelrotation=20 if len(names) > 4 else 0)
    return figure


def _html(plots: list[Path], summary: dict, config_text: str, manifest: dict, title: str) -> str:
    e = html.escape
    images = "\n".join(
        f'<figure><img alt="{e(p.stem)}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        f"</figure>" for p in plots)
    columns = ["arm", "algorithm", "network", "device", "codec", "final loss", "loss ratio", "simulated time",
               "time ratio", "bytes sent", "bytes ratio", "compression", "utilisation", "time to target"]
    rows = []
    for name, arm in summary["arms"].items():
        cells = [name + (" (baseline)" if name == summary["baseline"] else ""), arm["algorithm"], arm["network"],
                 arm["device"], arm["codec"], _final_loss(arm),
                 _loss_ratio(arm["loss_ratio"]), human_seconds(arm["time_s"]),
                 _ratio(arm["time_ratio"]), human_bytes(arm["bytes_sent"]), _ratio(arm["bytes_ratio"]),
                 _ratio(arm.get("compression_ratio")),
                 "—" if arm["compute_utilisation"] is None else f"{100 * arm['compute_utilisation']:.1f} %",
                 _time_to_target(arm, summary["target_loss"])]
        style = ' class="baseline"' if name == summary["baseline"] else ""
        rows.append(f"<tr{style}>" + "".join(f"<td>{e(str(c))}</td>" for c in cells) + "</tr>")
    manifest_rows = "".join(
        f"<tr><th>{e(str(k))}</th><td>{e(v if isinstance(v, str) else json.dumps(v, sort_keys=True))}</td></tr>"
        for k, v in manifest.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 70rem; margin: 2rem auto; padding: 0 1rem; color: #222; }}
table {{ border-collapse: collapse; margin: 1rem 0; font-size: 0.9rem; }}
th, td {{ border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: left; }}
th {{ background: #f3f3f3; }}
tr.baseline td {{ font-weight: bold; }}
figure {{ margin: 1rem 0; }} img {{ max-width: 100%; }}
pre {{ background: #f6f6f6; padding: 0.75rem; overflow-x: auto; font-size: 0.85rem; }}
</style></head><body>
<h1>{e(title)}</h1>
<p class="headline">{e(headline(summary))}</p>
<h2>Arms</h2>
<table><tr>{"".join(f"<th>{e(c)}</th>" for c in columns)}</tr>
{chr(10).join(rows)}</table>
<p>Ratios are to the baseline, {e(summary["baseline"])}. Utilisation is compute time over workers × simulated time.</p>
{_ranking_html(summary)}
{faults_html(summary, human_seconds)}<h2>Plots</h2>
{images}
<h2>Manifest</h2>
<table>{manifest_rows}</table>
<h2>Resolved config</h2>
<pre>{e(config_text)}</pre>
</body></html>
"""


def _ranking_html(summary: dict) -> str:
    ranking = summary.get("ranking")
    if not ranking:
        return ""
    e, arms = html.escape, summary["arms"]

    def items(names: list[str], describe) -> str:
        return "".join(f"<li>{e(name)}: {e(describe(arms[name]))}</li>" for name in names)

    by_target = items(ranking["time_to_target"], lambda a: _time_to_target(a, summary["target_loss"])
                      + f" (final loss {_loss(a['final_loss'])})")
    by_bytes = items(ranking["bytes_sent"], lambda a: human_bytes(a["bytes_sent"]))
    return (f"<h2>Ranking</h2><h3>By simulated time to the target loss</h3><ol>{by_target}</ol>"
            f"<h3>By bytes sent</h3><ol>{by_bytes}</ol>")


def _time_to_target(arm: dict, target: float | None) -> str:
    if target is None:
        return "—"
    if arm["time_to_target_s"] is None:
        return "not reached"
    return human_seconds(arm["time_to_target_s"])


def _bytes_phrase(sent: int, reference: int, name: str) -> str:
    if reference == 0:
        return f"{name} sent none"
    ratio = sent / reference
    if abs(ratio - 1) < 0.01:
        return f"as many as {name}"
    if ratio < 1:
        return f"{_factor(1 / ratio)}x fewer than {name}"
    return f"{_factor(ratio)}x more than {name}"


def _factor(x: float) -> str:
    return f"{x:.0f}" if x >= 10 else f"{x:.1f}" if x >= 1 else f"{x:.2g}"


def _final_loss(arm: dict) -> str:
    if not arm["diverged"]:
        return _loss(arm["final_loss"])
    return "diverged" if arm["final_loss"] is None else f"{_loss(arm['final_loss'])} (diverged)"

def _loss(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{_factor(value)}x"


def _loss_ratio(value: float | None) -> str:
    # Loss ratios near 1 are the result; they need two decimals where time and bytes ratios need two digits.
    return "—" if value is None else f"{value:.2f}x"


def _human_count(x: float) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.3g}"


def _names(names: list[str]) -> str:
    if len(names) <= 1:
        return "".join(names)
    return ", ".join(names[:-1]) + " and " + names[-1]
