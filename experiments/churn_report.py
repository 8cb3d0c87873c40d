"""The churn plot of a run with faults: per arm, who was live when (peers x time), and the held-out loss
with the fault events marked. Written only when some arm has fault records."""

from __future__ import annotations

from matplotlib.figure import Figure

from cluster.records import EvalRecord, FaultRecord, Record, StepRecord

NAME = "membership.png"
STATE_COLOR = {"live": "#2ca02c", "gone": "#d62728", "waiting": "#ff7f0e"}


def membership(records: list[Record], arm: str, workers: int, end_s: float) -> list[list[tuple[float, float, str]]]:
    """Per worker, its intervals (start, stop, state): live, gone (left, not back) or waiting (back, no state yet)."""
    spans: list[list[tuple[float, float, str]]] = []
    for w in range(workers):
        events = [r for r in records if isinstance(r, FaultRecord) and r.arm == arm and r.worker == w]
        t, state, mine = 0.0, "live", []
        for r in events:
            nxt = {"leave": "gone", "return": "waiting", "join": "live"}.get(r.event)
            if nxt is None:
                continue
            mine.append((t, r.time_s, state))
            t, state = r.time_s, nxt
        mine.append((t, max(t, end_s), state))
        spans.append(mine)
    return spans


def churn_figure(records: list[Record], arms: list[str], workers: dict[str, int],
                 clock: str = "simulated") -> Figure | None:
    """`clock`: the x axes' name, "simulated" (the network model's seconds) or "wall-clock" (real peers)."""
    faulty = [a for a in arms if any(isinstance(r, FaultRecord) and r.arm == a for r in records)]
    if not faulty:
        return None
    figure = Figure(figsize=(7.5, 3.0 * len(faulty)), layout="constrained")
    grid = figure.subplots(len(faulty), 2, squeeze=False)
    for row, arm in zip(grid, faulty):
        end_s = max((r.time_s for r in records if r.arm == arm and isinstance(r, (StepRecord, EvalRecord))),
                    default=0.0)
        chart, loss = row
        for w, spans in enumerate(membership(records, arm, workers[arm], end_s)):
            for start, stop, state in spans:
                if stop > start:
                    chart.broken_barh([(start, stop - start)], (w - 0.4, 0.8), color=STATE_COLOR[state])
        chart.set(title=f"{arm}: peers (green live, red gone, orange waiting)", xlabel=f"{clock} s",
                  ylabel="worker", yticks=range(workers[arm]))
        chart.title.set_fontsize(8)
        evals = sorted((r for r in records if isinstance(r, EvalRecord) and r.arm == arm), key=lambda r: r.time_s)
        loss.plot([r.time_s for r in evals], [r.loss for r in evals], marker="o", color="black")
        for r in records:
            if isinstance(r, FaultRecord) and r.arm == arm and r.event in ("leave", "join"):
                loss.axvline(r.time_s, color=STATE_COLOR["gone" if r.event == "leave" else "live"], lw=0.6, alpha=0.7)
        loss.set(title=f"{arm}: held-out loss (red: a peer left, green: state loaded)", xlabel=f"{clock} s",
                 ylabel="loss")
        loss.title.set_fontsize(8)
    return figure


def faults_html(summary: dict, seconds) -> str:
    """The summary's fault figures, one row per arm with faults; '' when no arm had any."""
    import html

    rows = []
    for name, arm in summary["arms"].items():
        f = arm.get("faults")
        if f is None:
            continue
        goodput = "—" if f["goodput"] is None else f"{100 * f['goodput']:.1f} %"
        cells = [name, f["failures"], f["joins"], f["rounds_without_someone"], seconds(f["time_lost_to_faults_s"]),
                 seconds(f["time_in_state_downloads_s"]), goodput]
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    if not rows:
        return ""
    head = ["arm", "failures", "joins", "rounds without someone", "time lost to faults (worker-s)",
            "state downloads", "goodput"]
    return ("<h2>Faults</h2>\n<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>\n" + "\n".join(rows)
            + "</table>\n<p>Goodput is the compute that reached a round over workers × simulated time.</p>\n")
