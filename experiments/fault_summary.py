"""The churn figures of one arm's records (`cluster.churn`): who left, who came back, and what it cost."""

from __future__ import annotations

from cluster.records import CommRecord, FaultRecord, StepRecord


def fault_summary(records: list, workers: int, time_s: float) -> dict:
    """failures (peers that left), joins (state loaded), rounds that proceeded without someone (a member gone, cut
    off or failing in it), worker-seconds lost to faults (peers away until they had the state again, compute thrown
    away, timeouts waited) and to state downloads, and goodput: the compute that reached a round over workers x
    simulated time (compute utilisation, less what faults threw away)."""
    faults = [r for r in records if isinstance(r, FaultRecord)]
    comms = [r for r in records if isinstance(r, CommRecord)]
    leaves = [r for r in faults if r.event == "leave"]
    joins = [r for r in faults if r.event == "join"]
    away_s = 0.0
    for w in range(workers):
        gone = None
        for r in (r for r in faults if r.worker == w):
            if r.event == "leave" and gone is None:
                gone = r.time_s
            elif r.event == "join" and gone is not None:
                away_s += r.time_s - gone
                gone = None
        if gone is not None:
            away_s += max(0.0, time_s - gone)
    lost_compute = sum(r.lost_s or 0.0 for r in leaves)
    timeouts = sum(r.timeout_s or 0.0 for r in faults)
    downloads = sum(r.download_s or 0.0 for r in joins)
    compute = sum(float(r.compute_s) for r in records if isinstance(r, StepRecord))
    without = {r.round for r in comms if r.absent or r.missing_peers}
    return {
        "failures": len(leaves),
        "joins": len(joins),
        "cancels": sum(r.event == "cancel" for r in faults),
        "rounds_without_someone": len(without),
        "time_lost_to_faults_s": away_s + lost_compute + timeouts,
        "time_in_state_downloads_s": downloads,
        "state_bytes_downloaded": sum(r.state_bytes or 0 for r in joins),
        "goodput": (compute - lost_compute) / (workers * time_s) if workers and time_s > 0 else None,
    }
