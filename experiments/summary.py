"""Reduces a run's `metrics.jsonl` to the numbers an experiment is judged by.

`summarize` is pure: the same records give the same dict, and the dict holds only plain floats, ints, strings, lists
and None, so it can be written as `summary.json` with strict JSON (non-finite losses become None and set `diverged`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from cluster.records import CommRecord, EvalRecord, FaultRecord, Record, StepRecord, from_json, of_kind
from experiments.fault_summary import fault_summary


def read_metrics(path: str | Path) -> list[Record]:
    """Reads one record per line (see `cluster.records`); blank lines are skipped."""
    path = Path(path)
    records = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{path}:{number} is not a JSON object ({error.msg}); a run killed mid-write leaves a truncated "
                    f"last line: delete that line and summarise again"
                ) from error
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number} holds a {type(record).__name__}, expected a JSON object")
            try:
                records.append(from_json(record))
            except ValueError as error:
                raise ValueError(f"{path}:{number}: {error}") from None
    return records


def summarize(records: list[Record], arms: list[dict], baseline: str, target_loss: float | None) -> dict:
    names = [arm["name"] for arm in arms]
    if len(set(names)) != len(names):
        raise ValueError(f"arm names must be unique, got {names}; rename the repeated arm in the experiment file")
    if baseline not in names:
        raise ValueError(f"baseline {baseline!r} is not one of the arms {names}; set the baseline to one of them")
    target = _finite(target_loss)

    by_arm: dict[str, list[Record]] = {name: [] for name in names}
    for record in records:
        # Records of arms outside this experiment (e.g. a shared metrics file) do not belong in its summary.
        if record.arm in by_arm:
            by_arm[record.arm].append(record)

    summaries = {arm["name"]: _summarize_arm(arm, by_arm[arm["name"]], target) for arm in arms}
    reference = summaries[baseline]
    for summary in summaries.values():
        summary["loss_ratio"] = _ratio(summary["final_loss"], reference["final_loss"])
        summary["time_ratio"] = _ratio(summary["time_s"], reference["time_s"])
        summary["bytes_ratio"] = _ratio(summary["bytes_sent"], reference["bytes_sent"])
        summary["time_to_target_ratio"] = _ratio(summary["time_to_target_s"], reference["time_to_target_s"])
    return {"baseline": baseline, "target_loss": target, "arms": summaries, "ranking": rankings(summaries)}


def rankings(arms: dict[str, dict]) -> dict[str, list[str]]:
    """Arm names best first: by simulated time to the target loss (arms that never reached it last,
    by final loss), and by bytes sent."""
    def by_target(name: str) -> tuple:
        arm = arms[name]
        reached = arm["time_to_target_s"]
        loss = arm["final_loss"] if arm["final_loss"] is not None else math.inf
        return (reached is None, reached if reached is not None else loss, loss)

    return {
        "time_to_target": sorted(arms, key=by_target),
        "bytes_sent": sorted(arms, key=lambda name: arms[name]["bytes_sent"]),
    }


def _summarize_arm(arm: dict, records: list[Record], target: float | None) -> dict:
    steps = of_kind(records, StepRecord)
    comms = of_kind(records, CommRecord)
    # A stable sort keeps the file's order among evals taken at the same step and time.
    evals = sorted(of_kind(records, EvalRecord), key=lambda r: (r.step, r.time_s))

    workers = int(arm["workers"])
    # A participant id beyond the declared worker count (a peer that joined mid-run) still gets its own slot.
    slots = max([workers] + [int(p) + 1 for r in comms for p in r.participants])
    sent_per_worker = [0] * slots
    received_per_worker = [0] * slots
    idle_s = 0.0
    for record in comms:
        assert len(record.participants) == len(record.bytes_sent) == len(record.bytes_received), record
        for worker, sent, received in zip(record.participants, record.bytes_sent, record.bytes_received):
            sent_per_worker[int(worker)] += int(sent)
            received_per_worker[int(worker)] += int(received)
        idle_s += sum(float(idle) for idle in record.idle_s)

    # Each worker's clock only moves forward, so the latest timestamp of any kind is when the arm finished.
    time_s = max((float(r.time_s) for r in steps + comms + evals), default=0.0)
    compute_s = sum(float(r.compute_s) for r in steps)
    losses = [_finite(r.loss) for r in evals]
    reached = next((r for r, loss in zip(evals, losses) if target is not None and loss is not None and loss <= target),
                   None)

    summary = {
        "algorithm": arm["algorithm"],
        "network": arm["network"],
        "device": arm["device"],
        "codec": arm["codec"],
        "workers": workers,
        "final_loss": losses[-1] if losses else None,
        "best_loss": min((loss for loss in losses if loss is not None), default=None),
        # Diverged: the last held-out loss is not a number, or training left the model worse than it started (above
        # the first evaluation's, the untrained model's at step 0), as a poisoned average can.
        "diverged": bool(evals) and (losses[-1] is None or (len(losses) > 1 and losses[0] is not None
                                                             and losses[-1] > losses[0])),
        "tokens": max((int(r.tokens) for r in steps), default=0),
        "time_s": time_s,
        "bytes_sent": sum(sent_per_worker),
        "bytes_received": sum(received_per_worker),
        "bytes_sent_per_worker": sent_per_worker,
        "rounds": len({r.round for r in comms}),
        # Contributions the reducers refused (wrong shape or dtype, non-finite: `cluster.hostile.screen`).
        "rejected_contributions": sum(len(r.rejected or ()) for r in comms),
        # Groups exchanging at once overlap in time: count each record's time once per participant.
        "comm_s": sum(float(r.comm_s) * len(r.participants) for r in comms) / max(1, workers),
        "compression_ratio": _ratio(sum(r.raw_bytes for r in comms), sum(r.message_bytes for r in comms)),
        "idle_s": idle_s,
        "compute_s": compute_s,
        "compute_utilisation": compute_s / (workers * time_s) if workers > 0 and time_s > 0 else None,
        "time_to_target_s": float(reached.time_s) if reached else None,
        "tokens_to_target": int(reached.tokens) if reached else None,
    }
    if any(isinstance(r, FaultRecord) or (isinstance(r, CommRecord) and r.absent) for r in records):
        summary["faults"] = fault_summary(records, workers, time_s)
    return summary


def _finite(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference == 0:
        return None
    return float(value) / float(reference)
