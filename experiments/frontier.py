"""The feasibility frontier: for each algorithm and latency, the least bandwidth at which it is competitive.

"Competitive" is what the experiment file's `[frontier]` table says, against the baseline arm of the same point:
final held-out loss within `loss_tolerance` of the baseline's, the target loss reached within `time_factor` times
the baseline's simulated time to it, and/or a compute utilisation of at least `utilisation`. Every criterion set must
hold. For each arm and latency the frontier is the lowest swept bandwidth from which the arm is competitive at every
higher one, interpolated on the log-bandwidth axis between that grid point and the one below it (where it was not),
linearly in the criteria's margin; both bracketing points are stated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from trainer.settings import parse_settings, setting

BANDWIDTH_SUFFIXES = (".bandwidth", ".uplink")
LATENCY_SUFFIXES = (".latency",)


@dataclass(frozen=True)
class FrontierCriteria:
    loss_tolerance: float | None = setting(None, "competitive: final held-out loss within this fraction of the "
                                           "baseline's (0.05: 5 %)", low=0.0, high=10.0)
    time_factor: float | None = setting(None, "competitive: the target loss reached within this many times the "
                                        "baseline's simulated time to it", low=1.0, high=1e6)
    utilisation: float | None = setting(None, "competitive: compute utilisation at least this (0-1)", low=0.0,
                                        high=1.0, low_open=True)

    def check(self) -> None:
        if self.loss_tolerance is None and self.time_factor is None and self.utilisation is None:
            raise ValueError("loss_tolerance: set at least one of loss_tolerance, time_factor, utilisation")

    @classmethod
    def parse(cls, table) -> FrontierCriteria:
        return parse_settings("frontier", cls, table if table is not None else {"loss_tolerance": 0.05})


def margin(row: dict, baseline: dict, criteria: FrontierCriteria) -> float:
    """How far from competitive a point is: <= 0 competitive, > 0 not (the largest relative shortfall)."""
    shortfalls = []
    if criteria.loss_tolerance is not None:
        ratio = _ratio(row["final_loss"], baseline["final_loss"])
        shortfalls.append(math.inf if ratio is None else ratio / (1.0 + criteria.loss_tolerance) - 1.0)
    if criteria.time_factor is not None:
        ratio = _ratio(row["time_to_target_s"], baseline["time_to_target_s"])
        shortfalls.append(math.inf if ratio is None else ratio / criteria.time_factor - 1.0)
    if criteria.utilisation is not None:
        u = row["compute_utilisation"]
        shortfalls.append(math.inf if not u else criteria.utilisation / u - 1.0)
    return max(shortfalls)


def axes_of(keys: list[str]) -> tuple[str | None, str | None]:
    """The swept bandwidth key and latency key, if the sweep has one of each."""
    bandwidth = [k for k in keys if k.endswith(BANDWIDTH_SUFFIXES)]
    latency = [k for k in keys if k.endswith(LATENCY_SUFFIXES)]
    return (bandwidth[0] if len(bandwidth) == 1 else None), (latency[0] if len(latency) == 1 else None)


def frontier(rows: list[dict], bandwidth_key: str, latency_key: str, baseline: str,
             criteria: FrontierCriteria) -> list[dict]:
    """One entry per non-baseline arm and latency: the frontier bandwidth (bit/s; None if never competitive) and the
    grid points that bracket it."""
    base = {r["point"]: r for r in rows if r["arm"] == baseline}
    out = []
    arms = list(dict.fromkeys(r["arm"] for r in rows if r["arm"] != baseline))
    latencies = sorted({r[latency_key] for r in rows}, key=_seconds)
    for arm in arms:
        for latency in latencies:
            points = sorted(((float(r[bandwidth_key]), margin(r, base[r["point"]], criteria), r)
                             for r in rows if r["arm"] == arm and r[latency_key] == latency), key=lambda p: p[0])
            if not points:
                continue
            entry = {"arm": arm, "algorithm": points[0][2]["algorithm"], "latency": latency,
                     "latency_s": _seconds(latency), "frontier_bps": None, "below_bps": None, "above_bps": None}
            # The lowest bandwidth from which every higher one is competitive too.
            first = len(points)
            while first > 0 and points[first - 1][1] <= 0:
                first -= 1
            if first < len(points):
                b_hi, m_hi, _ = points[first]
                entry["above_bps"] = b_hi
                if first == 0:
                    entry["frontier_bps"] = b_hi  # competitive over the whole swept range: at most this
                else:
                    b_lo, m_lo, _ = points[first - 1]
                    entry["below_bps"] = b_lo
                    t = 1.0 if math.isinf(m_lo) else m_lo / (m_lo - m_hi)
                    entry["frontier_bps"] = 10 ** (math.log10(b_lo) + t * (math.log10(b_hi) - math.log10(b_lo)))
            out.append(entry)
    return out


def _seconds(latency) -> float:
    from cluster.network import parse_duration

    return parse_duration(latency)


def _ratio(value, reference) -> float | None:
    if value is None or reference is None or reference == 0:
        return None
    return float(value) / float(reference)
