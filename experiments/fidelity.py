"""`farflung fidelity FILE`: run one experiment in the simulator and on real peers, and compare.

The simulator is only credible where it agrees with the real thing. Both runs use the same file, seed
and token budget; the simulator's compute time comes from a device profile measured on this machine
(`measure_device`), so compute can be compared too. Per arm the report sets predicted against
measured: time per exchange, compute per step, total time, bytes on the wire and final loss, and
flags every figure off by more than 25 %.
"""

from __future__ import annotations

import html
import json
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from matplotlib.figure import Figure

from cluster.devices import DEVICES, DeviceProfile
from cluster.records import CommRecord, EvalRecord, Record, StepRecord, of_kind
from experiments.fields import ConfigError
from experiments.runner import run
from experiments.spec import ExperimentSpec, load_spec
from experiments.summary import read_metrics
from trainer.model import GPT, training_flops_per_token

TOLERANCE = 0.25


def measure_device(spec: ExperimentSpec, steps: int = 5) -> DeviceProfile:
    """FLOP/s one worker gets here: a single-threaded training step of the spec's model and batch, scaled by
    the share of a core each of the run's workers has (N actors on fewer cores take turns)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = GPT(spec.model)
        optimizer = model.configure_optimizers(0.0, 1e-4, (0.9, 0.95))
        x = torch.randint(0, 256, (spec.run.batch_size, spec.model.block_size))
        timings = []
        for _ in range(steps + 1):
            start = time.perf_counter()
            optimizer.zero_grad()
            model(x, x)[1].backward()
            optimizer.step()
            timings.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    flops = training_flops_per_token(spec.model) * spec.run.batch_size * spec.model.block_size
    share = min(1.0, (os.cpu_count() or 1) / spec.run.workers)
    per_second = flops / statistics.median(timings[1:]) * share  # the first step warms caches up
    note = f"measured here: one thread, {spec.run.workers} workers sharing {os.cpu_count()} cores"
    return DeviceProfile("measured", per_second, 1.0, note)


def fidelity(path: str | Path, overrides: list[str] | tuple[str, ...] = (), out: str | Path | None = None) -> Path:
    # The file may be a simulator experiment: its real counterpart is the same file in real mode.
    spec = load_spec(path, [*overrides, 'run.mode="real"', 'run.runtime="ray"'])
    out_dir = Path(out) if out else Path("results") / spec.name / f"fidelity-{time.strftime('%Y%m%d-%H%M%S')}"
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"--out: {out_dir} already holds files; give a new or empty folder")
    device = measure_device(spec)
    DEVICES["measured"] = device
    sim_spec = replace(
        spec, run=replace(spec.run, mode="sim", runtime="local"),
        arms=tuple(replace(a, device="measured") for a in spec.arms),
    )
    sim_dir, _ = run(sim_spec, out=out_dir / "sim")
    real_dir, _ = run(spec, out=out_dir / "real")
    table = compare(read_metrics(sim_dir / "metrics.jsonl"), read_metrics(real_dir / "metrics.jsonl"),
                    [a.name for a in spec.arms])
    result = {"experiment": spec.name, "tolerance": TOLERANCE, "device": {"flops_per_s": device.peak_flops,
              "note": device.note}, "arms": table}
    (out_dir / "fidelity.json").write_text(json.dumps(result, indent=2) + "\n")
    _loss_plot(out_dir, sim_dir, real_dir, [a.name for a in spec.arms])
    (out_dir / "fidelity.html").write_text(_html(result, out_dir / "loss_sim_vs_real.png"))
    return out_dir


def compare(sim: list[Record], real: list[Record], arms: list[str]) -> dict[str, dict]:
    """Per arm and figure: predicted (sim), measured (real), their ratio and whether it is off by > 25 %."""
    table = {}
    for arm in arms:
        s, r = _figures(sim, arm), _figures(real, arm)
        table[arm] = {key: _row(s[key], r.get(key)) for key in s}
    return table


def _figures(records: list[Record], arm: str) -> dict[str, float | None]:
    comm = of_kind(records, CommRecord, arm)
    steps = of_kind(records, StepRecord, arm)
    evals = of_kind(records, EvalRecord, arm)
    # Swarm arms' step records are epochs of whatever size the swarm reached: compare compute per sample there.
    sampled = [x for x in steps if x.samples is not None]
    samples = sum(x.samples for x in sampled)
    if sampled:  # a swarm arm: the blocking time at an epoch's end, matchmaking waits and all-reduces together
        # An epoch is one real record (the Optimizer.step that closed it: gradients, then the state average) and up
        # to two simulated ones, the state round's with its wait in idle_s and its all-reduce in comm_s.
        epochs: dict[int, float] = {}
        for x in comm:
            state_round_s = x.comm_s if x.payload == "parameters" and not x.measured else 0.0
            epochs[x.step] = epochs.get(x.step, 0.0) + max(x.idle_s) + state_round_s
        exchange = {"epoch_wait_s": statistics.median(epochs.values()) if epochs else None}
        rounds = len(epochs)
    else:
        exchange = {"exchange_s": statistics.median(x.comm_s for x in comm) if comm else None}
        rounds = len({x.round for x in comm})
    return {
        **exchange,
        "rounds": rounds,
        **({"compute_per_sample_s": sum(x.compute_s for x in sampled) / samples if samples else None} if sampled
           else {"compute_per_step_s": statistics.median(x.compute_s for x in steps) if steps else None}),
        "total_s": max((x.time_s for x in [*comm, *steps, *evals]), default=None),
        "bytes_sent": sum(sum(x.bytes_sent) for x in comm),
        "bytes_per_round": sum(sum(x.bytes_sent) for x in comm) / rounds if rounds else None,
        "final_loss": evals[-1].loss if evals else None,
    }


def _row(predicted: float | None, measured: float | None) -> dict:
    ratio = measured / predicted if predicted and measured is not None else None
    return {"predicted": predicted, "measured": measured, "ratio": ratio,
            "flagged": ratio is not None and abs(ratio - 1.0) > TOLERANCE}


def _loss_plot(out_dir: Path, sim_dir: Path, real_dir: Path, arms: list[str]) -> None:
    figure = Figure(figsize=(8, 4.5))
    axes = figure.add_subplot()
    for (label, folder, style) in (("sim", sim_dir, "-"), ("real", real_dir, "--")):
        for arm in arms:
            evals = of_kind(read_metrics(folder / "metrics.jsonl"), EvalRecord, arm)
            axes.plot([x.tokens for x in evals], [x.loss for x in evals], style, marker=".", label=f"{arm} ({label})")
    axes.set_xlabel("tokens")
    axes.set_ylabel("held-out loss")
    axes.set_title("Held-out loss: simulator (solid) vs real peers (dashed)")
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    figure.savefig(out_dir / "loss_sim_vs_real.png", dpi=100, metadata={"Software": None})


def _html(result: dict, plot_path: Path) -> str:
    import base64

    e = html.escape
    rows = []
    for arm, figures in result["arms"].items():
        for key, row in figures.items():
            def fmt(v):
                return "—" if v is None else f"{v:.4g}"
            flag = ' class="flag"' if row["flagged"] else ""
            rows.append(f"<tr{flag}><td>{e(arm)}</td><td>{e(key)}</td><td>{fmt(row['predicted'])}</td>"
                        f"<td>{fmt(row['measured'])}</td><td>{fmt(row['ratio'])}</td>"
                        f"<td>{'off by more than 25 %' if row['flagged'] else ''}</td></tr>")
    plot = base64.b64encode(plot_path.read_bytes()).decode()
    image = f'<img alt="held-out loss, sim vs real" src="data:image/png;base64,{plot}">'
    return f"""<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>fidelity: {e(result['experiment'])}</title>
<style>body {{ font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; }}
table {{ border-collapse: collapse; }} th, td {{ border: 1px solid #ccc; padding: 0.2rem 0.5rem; }}
tr.flag td {{ background: #fde2e2; }}</style></head><body>
<h1>Fidelity: {e(result['experiment'])}</h1>
<p>Simulator (predicted) against real hivemind peers (measured), same file and seed. Device profile:
{result['device']['flops_per_s'] / 1e9:.2f} GFLOP/s per worker ({e(result['device']['note'])}).</p>
<table><tr><th>arm</th><th>figure</th><th>predicted</th><th>measured</th><th>measured / predicted</th><th></th></tr>
{''.join(rows)}</table>{image}</body></html>
"""
