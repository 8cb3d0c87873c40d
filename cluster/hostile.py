"""Hostile peers: poisoned contributions from chosen peers, and the checks a reducer makes on what it receives.

An arm's (or the run's) `faults` table declares them under `hostile`, a list of tables:

    faults = { hostile = [{ peers = [3], from_step = 20, kind = "sign_flip", scale = -1000.0 }] }

From the exchange at step `from_step` on, every contribution those peers send is replaced by the poison of `kind`:

- `non_finite`: every element NaN (a peer whose training blew up, or one that wants the average to);
- `scale`: the honest update times `scale` (default 100);
- `sign_flip`: the honest update times a negative `scale` (default -1000);
- `noise`: Gaussian noise with `scale` (default 100) times the honest update's RMS as its standard deviation;
- `constant`: one fixed unit direction (drawn once from the seed) times `scale` (default 100) times the honest
  update's norm;
- `stale`: what the peer honestly sent `stale_rounds` exchanges of the same payload before (its oldest while it has
  fewer).

The poison touches only what the peer sends: it still trains honestly, receives the average like every member, and
reduces its butterfly part honestly (a hostile reducer, which BTARD counters with verification, is not modelled).
Every random draw comes from the run's seed, the fault, the peer and the round, so a replay is bit-exact.

A reducer refuses a contribution whose shape or dtype differs from the group's or that holds a non-finite value
(`refused`): the average is over the rest, and the `comm` record lists the refused senders in `rejected`.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from trainer.settings import ConfigError, check_keys, parse_values, setting

KINDS = ("non_finite", "scale", "sign_flip", "noise", "constant", "stale")
DEFAULT_SCALE = {"scale": 100.0, "sign_flip": -1000.0, "noise": 100.0, "constant": 100.0}
_STREAM = 0x4057113  # keeps the poison's random draws apart from every other stream of the seed


@dataclass(frozen=True)
class HostileFault:
    """One set of hostile peers and how they poison what they send (an entry of `faults.hostile`)."""

    kind: str = setting(help="how the peers poison what they send", choices=KINDS)
    peers: tuple[int, ...] = ()  # worker indices, parsed by hand (a list)
    from_step: int = setting(0, "the first step whose exchanges are poisoned", low=0)
    scale: float | None = setting(None, "the poison's size relative to the honest update (default per kind: "
                                        "scale 100, sign_flip -1000, noise 100, constant 100)", low=-1e30, high=1e30)
    stale_rounds: int | None = setting(None, "stale: exchanges of the same payload between the update made and "
                                             "the one resent (default 10)", low=1, high=100_000)

    def factor(self) -> float:
        return DEFAULT_SCALE[self.kind] if self.scale is None else self.scale

    def lag(self) -> int:
        return 10 if self.stale_rounds is None else self.stale_rounds


def parse_hostile(path: str, value: Any, n_workers: int) -> tuple[HostileFault, ...]:
    """`faults.hostile` as written: a list of tables, each checked; ConfigError naming the field and the fix."""
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ConfigError(f"{path}: must be a list of tables such as [{{ peers = [3], kind = \"sign_flip\" }}], "
                          f"got {value!r}")
    faults, starts = [], {}
    for i, table in enumerate(value):
        where = f"{path}[{i}]"
        check_keys(where, table, ["peers", "kind", "from_step", "scale", "stale_rounds"])
        if "kind" not in table:
            raise ConfigError(f"{where}.kind: required; one of {', '.join(KINDS)}")
        peers = table.get("peers")
        if not isinstance(peers, list) or not peers or not all(
                isinstance(p, int) and not isinstance(p, bool) and 0 <= p < n_workers for p in peers):
            raise ConfigError(f"{where}.peers: must be a non-empty list of worker indices in 0..{n_workers - 1}, "
                              f"got {peers!r}")
        fault = HostileFault(peers=tuple(sorted(set(peers))),
                             **parse_values(where, HostileFault, {k: v for k, v in table.items() if k != "peers"}))
        if fault.scale is not None and fault.kind in ("non_finite", "stale"):
            raise ConfigError(f"{where}.scale: kind {fault.kind!r} takes no scale; remove it")
        if fault.stale_rounds is not None and fault.kind != "stale":
            raise ConfigError(f"{where}.stale_rounds: only kind \"stale\" takes it; remove it")
        if fault.kind == "sign_flip" and not fault.factor() < 0:
            raise ConfigError(f"{where}.scale: a sign flip multiplies by a negative number, got {fault.scale!r}; "
                              f"e.g. scale = -1000.0, or use kind = \"scale\"")
        if fault.kind in ("scale", "noise", "constant") and fault.factor() == 0:
            raise ConfigError(f"{where}.scale: must not be 0 (a peer sending zeros is kind \"scale\" x 0: "
                              f"use a small number instead)")
        for p in fault.peers:
            if starts.get((p, fault.from_step)) is not None:
                raise ConfigError(f"{where}.from_step: peer {p} is already hostile from step {fault.from_step} "
                                  f"({path}[{starts[(p, fault.from_step)]}]); give one kind per peer and step")
            starts[(p, fault.from_step)] = i
        faults.append(fault)
    return tuple(faults)


def hostile_table(faults: Sequence[HostileFault]) -> list[dict]:
    """The faults as `parse_hostile` reads them back (the resolved config)."""
    return [{k: list(v) if k == "peers" else v for k, v in asdict(f).items() if v is not None} for f in faults]


def refused(tensor: Any, shape: tuple[int, ...], dtype: np.dtype) -> bool:
    """Whether a reducer refuses a received contribution: wrong shape or dtype, or a non-finite value."""
    if not isinstance(tensor, np.ndarray) or tensor.shape != shape or tensor.dtype != dtype:
        return True
    return not bool(np.isfinite(tensor).all())


def screen(tensors: Sequence[Any]) -> list[int]:
    """Indices of the contributions a reducer refuses, against the shape and dtype most of the group sends."""
    (shape, dtype), _ = Counter((np.shape(t), getattr(t, "dtype", None)) for t in tensors).most_common(1)[0]
    return [i for i, t in enumerate(tensors) if refused(t, shape, dtype)]


class HostileSenders:
    """What each peer sends at the exchange seam: its honest contribution, or the poison its fault says."""

    def __init__(self, faults: Sequence[HostileFault], seed: int):
        self.faults, self.seed = tuple(faults), seed
        self.peers = {p for f in self.faults for p in f.peers}
        lags = [f.lag() for f in self.faults if f.kind == "stale"]
        self.history: dict[tuple[int, str], deque] = {}
        self.keep = max(lags) + 1 if lags else 0
        self.directions: dict[tuple[int, int, int], np.ndarray] = {}

    def __bool__(self) -> bool:
        return bool(self.faults)

    def state_dict(self) -> dict:
        """The contributions a stale peer replays later (the directions are drawn again from the seed)."""
        return {"history": [(w, payload, [torch.from_numpy(np.array(t)) for t in past])
                            for (w, payload), past in self.history.items()]}

    def load_state_dict(self, state: dict) -> None:
        self.history = {(w, payload): deque((t.numpy() for t in past), maxlen=self.keep)
                        for w, payload, past in state["history"]}

    def active(self, worker: int, step: int) -> tuple[int, HostileFault] | None:
        """The fault (and its index) poisoning `worker` at `step`: the one that started latest, if any."""
        found = None
        for i, f in enumerate(self.faults):
            if worker in f.peers and f.from_step <= step and (found is None or f.from_step >= found[1].from_step):
                found = (i, f)
        return found

    def sent(self, worker: int, payload: str, tensor: np.ndarray, step: int, round_: int) -> np.ndarray:
        """What `worker` sends in this exchange instead of `tensor` (its honest contribution)."""
        if worker not in self.peers:
            return tensor
        past = None
        if self.keep:
            past = self.history.setdefault((worker, payload), deque(maxlen=self.keep))
            past.append(np.array(tensor, copy=True))
        found = self.active(worker, step)
        if found is None:
            return tensor
        index, fault = found
        if fault.kind == "non_finite":
            return np.full_like(tensor, np.nan)
        if fault.kind in ("scale", "sign_flip"):
            return tensor * np.float32(fault.factor())
        if fault.kind == "noise":
            rng = np.random.default_rng([self.seed, _STREAM, index, worker, round_])
            rms = np.float32(np.sqrt(np.mean(np.square(tensor, dtype=np.float64))))
            return rng.standard_normal(tensor.shape, dtype=np.float32) * (np.float32(fault.factor()) * rms)
        if fault.kind == "constant":
            key = (index, worker, tensor.size)
            if key not in self.directions:
                d = np.random.default_rng([self.seed, _STREAM, index, worker, tensor.size]).standard_normal(
                    tensor.size, dtype=np.float32)
                self.directions[key] = (d / np.float32(np.linalg.norm(d))).reshape(tensor.shape)
            return self.directions[key] * np.float32(fault.factor() * float(np.linalg.norm(tensor)))
        assert fault.kind == "stale", fault.kind
        lag = fault.lag()
        return past[-1 - lag] if len(past) > lag else past[0]
