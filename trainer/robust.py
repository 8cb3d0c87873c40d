"""Robust aggregation: how a reducer combines its peers' contributions when some of them may be hostile.

`mean` is the plain (weighted) average every strategy assumes. The robust rules replace it at each reducer:

- `centered_clip`: CenteredClip (Karimireddy, He and Jaggi, "Learning from History for Byzantine Robust
  Optimization", ICML 2021; used per butterfly part by Gorbunov et al., "Secure Distributed Training at Scale",
  ICML 2022): v_{l+1} = v_l + sum_i w_i (x_i - v_l) min(1, tau / ||x_i - v_l||) / sum_i w_i, iterated
  `clip_iters` times. The paper starts from the previous aggregate (momentum); a single exchange has no history
  here, so v_0 is the coordinate-wise median, a start no minority of peers can move far.
- `median`: the coordinate-wise median (Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal
  Statistical Rates", ICML 2018); for an even count, the mean of the two middle values (numpy's convention).
- `trimmed_mean`: the coordinate-wise trimmed mean of the same paper: at every coordinate the floor(trim_fraction
  x n) largest and smallest values are dropped and the rest averaged.

Median and trimmed mean are coordinate-wise and ignore the weights (every lockstep strategy sends equal weights).
CenteredClip's norms are taken over what one reducer holds: a butterfly part (`parts`), as in Gorbunov et al.
Everything is float32 and summed in peer order, so a run repeats to the bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from trainer.settings import setting

AGGREGATIONS = ("mean", "centered_clip", "median", "trimmed_mean")


@dataclass(frozen=True)
class Aggregation:
    """How an arm's reducers combine contributions (keys of the `algorithm` table of a strategy that averages)."""

    aggregation: str = setting("mean", "simulator: how each reducer combines its peers' contributions",
                              choices=AGGREGATIONS)
    clip_tau: float = setting(1.0, "centered_clip: the clipping radius tau (an L2 norm, per butterfly part)",
                              low=0.0, high=1e12, low_open=True)
    clip_iters: int = setting(5, "centered_clip: iterations from the coordinate-wise median", low=1, high=1000)
    trim_fraction: float = setting(0.125, "trimmed_mean: the share of values dropped at each end of every coordinate",
                                   low=0.0, high=0.5, high_open=True)

    @property
    def robust(self) -> bool:
        return self.aggregation != "mean"


def median(stack: np.ndarray) -> np.ndarray:
    """The coordinate-wise median of the rows of `stack` (peers x elements)."""
    return np.median(stack, axis=0).astype(np.float32, copy=False)


def trimmed_mean(stack: np.ndarray, trim_fraction: float) -> np.ndarray:
    """The coordinate-wise mean of the rows of `stack` without the k = floor(trim_fraction x n) largest and smallest."""
    n = stack.shape[0]
    k = int(np.floor(trim_fraction * n))
    if 2 * k >= n:  # at least one value must remain (only reachable with trim_fraction near 0.5 and few peers)
        k = (n - 1) // 2
    kept = np.sort(stack, axis=0)[k:n - k]
    total = np.array(kept[0], dtype=np.float32, copy=True)
    for row in kept[1:]:
        total += row
    return total / np.float32(kept.shape[0])


def centered_clip(stack: np.ndarray, weights: Sequence[float], tau: float, iters: int) -> np.ndarray:
    """CenteredClip of the rows of `stack` (peers x elements), `iters` iterations from the coordinate-wise median."""
    w = np.asarray(weights, dtype=np.float32)
    v = median(stack).copy()
    for _ in range(iters):
        step = np.zeros_like(v)
        for x, wi in zip(stack, w):
            diff = x - v
            norm = float(np.linalg.norm(diff))
            scale = 1.0 if norm <= tau else tau / norm
            step += np.float32(wi * scale) * diff
        v = v + step / np.float32(w.sum())
    return v


def aggregate(tensors: Sequence[np.ndarray], weights: Sequence[float], rule: Aggregation,
              parts: Sequence[int] | None = None) -> np.ndarray:
    """Combine `tensors` by a robust `rule`, part by part (`parts`: each reducer's share of the flat vector; None: one
    reducer holds it all). The plain mean is `cluster.driver.average`, not this."""
    assert rule.robust, "the plain mean is cluster.driver.average"
    flat = np.stack([np.asarray(t, dtype=np.float32).reshape(-1) for t in tensors])
    size = flat.shape[1]
    parts = [size] if parts is None else list(parts)
    assert sum(parts) == size, f"parts {parts} do not cut {size}"
    out = np.empty(size, dtype=np.float32)
    start = 0
    for part in parts:
        piece = flat[:, start:start + part]
        if part == 0:
            continue
        if rule.aggregation == "median":
            out[start:start + part] = median(piece)
        elif rule.aggregation == "trimmed_mean":
            out[start:start + part] = trimmed_mean(piece, rule.trim_fraction)
        else:
            out[start:start + part] = centered_clip(piece, weights, rule.clip_tau, rule.clip_iters)
        start += part
    return out.reshape(np.shape(tensors[0]))
