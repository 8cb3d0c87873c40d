"""Stragglers: how much of its device's effective FLOP/s each worker delivers (a speed factor per worker).

A factor multiplies the device profile's effective FLOP/s, so 0.5 is a worker that takes twice as long per step.
`speed_factors` accepts either an explicit list or a distribution table:

- `{distribution = "lognormal", sigma = 0.3}`: exp(N(0, sigma)) per worker, divided by their median;
- `{distribution = "stragglers", fraction = 0.25, slowdown = 2.0}`: the last round(fraction * N) workers run at
  1/slowdown, the rest at 1;
- `{distribution = "uniform", low = 0.5, high = 1.0}`: U(low, high) per worker.

Lognormal factors are divided by their sample median, so the median worker runs exactly at the device profile and
the draw only spreads workers around it, instead of also making the whole cluster faster or slower by luck (which
would mix heterogeneity with a change of device). Stragglers round half up (a quarter of 2 workers is 1 straggler) and
take no randomness. Random draws use their own stream seeded by `seed`, so the same seed gives the same factors and
adding a distribution leaves every other random stream of a run alone.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

_KEYS = {
    "lognormal": ("distribution", "sigma"),
    "stragglers": ("distribution", "fraction", "slowdown"),
    "uniform": ("distribution", "high", "low"),
}
_STREAM = 0x5EED  # keeps these draws apart from the run's other seeded streams


def _number(path: str, value: Any, low: float, *, low_open: bool, high: float = math.inf, what: str) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and value <= high
    if not ok:
        raise ValueError(f"{path}: expected {what}, got {value!r}")
    return float(value)


def speed_factors(spec: Any, n_workers: int, seed: int) -> tuple[float, ...]:
    """One speed factor per worker from a list of numbers or a distribution table (see the module docstring).

    Errors are `ValueError`s whose message starts with the key path inside the spec: `[2]` for an item of a list,
    `distribution`, `sigma`, ... for a table.
    """
    assert n_workers >= 1
    if isinstance(spec, (list, tuple)):
        if len(spec) != n_workers:
            raise ValueError(f"expected {n_workers} speed factors (one per worker), got a list of {len(spec)}")
        return tuple(_number(f"[{i}]", s, 0.0, low_open=True, what="a speed factor above 0 (1 = the device's speed)")
                     for i, s in enumerate(spec))
    if not isinstance(spec, dict):
        raise ValueError(f"expected a list of {n_workers} speed factors or a table such as "
                         f"{{distribution = \"lognormal\", sigma = 0.3}}, got {spec!r}")
    name = spec.get("distribution")
    if name not in _KEYS:
        raise ValueError(f"distribution: must be one of {', '.join(_KEYS)}; got {name!r}")
    for key in spec:
        if key not in _KEYS[name]:
            raise ValueError(f"{key}: unknown key for distribution {name!r}; allowed: {', '.join(_KEYS[name])}")
    for key in _KEYS[name][1:]:
        if key not in spec:
            raise ValueError(f"{key}: required for distribution {name!r} (keys: {', '.join(_KEYS[name][1:])})")
    rng = np.random.default_rng([seed, _STREAM])

    if name == "lognormal":
        sigma = _number("sigma", spec["sigma"], 0.0, low_open=False, what="a standard deviation of log speed >= 0")
        factors = np.exp(rng.normal(0.0, sigma, n_workers))
        return tuple(float(f) for f in factors / np.median(factors))
    if name == "stragglers":
        fraction = _number("fraction", spec["fraction"], 0.0, low_open=False, high=1.0,
                           what="the fraction of workers that straggle, between 0 and 1")
        slowdown = _number("slowdown", spec["slowdown"], 1.0, low_open=False,
                           what="how many times slower a straggler is, at least 1 (2.0 = half speed)")
        n_slow = math.floor(fraction * n_workers + 0.5)
        return (1.0,) * (n_workers - n_slow) + (1.0 / slowdown,) * n_slow
    low = _number("low", spec["low"], 0.0, low_open=True, what="the slowest factor, above 0")
    high = _number("high", spec["high"], low, low_open=False, what=f"the fastest factor, at least low = {low}")
    return tuple(float(f) for f in rng.uniform(low, high, n_workers))
