"""The `faults` table: which peers leave and return, fail mid-exchange, straggle or are cut off, and when.

    [faults]                                   # every arm; or [arm.faults] (a table in the [[arm]]) for one arm
    mtbf = "10min"                             # a seeded trace: each peer fails after Exp(mtbf) of uptime ...
    mttr = "2min"                              # ... and returns after Exp(mttr)
    events = [{ worker = 3, leave_step = 40, return_step = 80 }, { worker = 1, leave_s = 30, return_s = 90 }]
    exchange = [{ worker = 2, round = 5, phase = "sending", down = "1min" }]   # before | sending | reducing | cancel
    stragglers = [{ worker = 1, from_s = 10, to_s = 60, speed = 0.3 }]
    partition = [{ groups = [[0, 1, 2, 3], [4, 5, 6, 7]], from_s = 100, to_s = 160 }]
    sender_timeout = 15                        # seconds; reducer_timeout defaults to twice it, as in hivemind

Everything random is drawn from the run's seed (`FaultTrace`), so a file and a seed give one trace, the same on every
machine. `cluster.churn` plays the trace in the simulator's lockstep arms, `cluster.swarm_churn` in its collaborative
ones. Parsing errors name the field (`faults.events[0].worker`).
"""

from __future__ import annotations

import math
import re
from dataclasses import astuple, dataclass, field
from typing import Any

import numpy as np

from trainer.settings import ConfigError

PHASES = ("before", "sending", "reducing", "cancel")
# hivemind.Optimizer's defaults: next_chunk_timeout falls back to matchmaking_time = 15 s (hivemind/optim/
# optimizer.py), and the averager's reducer_timeout to 2 x sender_timeout (hivemind/averaging/averager.py).
HIVEMIND_SENDER_TIMEOUT_S = 15.0
KEYS = ("mtbf", "mttr", "events", "exchange", "stragglers", "partition", "sender_timeout", "reducer_timeout",
        "state_sources")
_UNITS = {"": 1.0, "s": 1.0, "ms": 1e-3, "min": 60.0, "h": 3600.0}
_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ms|s|min|h)?\s*$")


@dataclass(frozen=True)
class Outage:
    """A peer gone from `leave` until `back` (None: for the rest of the run), in seconds or in steps."""

    worker: int
    leave: float
    back: float | None
    by_step: bool  # leave/back are step numbers, else simulated seconds
    cause: str = "event"  # event | mtbf | exchange


@dataclass(frozen=True)
class ExchangeFault:
    worker: int
    round: int
    phase: str
    down_s: float | None  # how long it stays gone (None: for good); cancel keeps the peer


@dataclass(frozen=True)
class Straggler:
    worker: int
    from_s: float
    to_s: float
    speed: float  # multiplies the worker's FLOP/s over [from_s, to_s)


@dataclass(frozen=True)
class Partition:
    groups: tuple[tuple[int, ...], ...]  # workers listed in no group form one more side together
    from_s: float
    to_s: float


@dataclass(frozen=True)
class FaultsConfig:
    mtbf_s: float | None = None
    mttr_s: float | None = None
    events: tuple[Outage, ...] = ()
    exchange: tuple[ExchangeFault, ...] = ()
    stragglers: tuple[Straggler, ...] = ()
    partition: tuple[Partition, ...] = ()
    sender_timeout_s: float = HIVEMIND_SENDER_TIMEOUT_S
    reducer_timeout_s: float = 2 * HIVEMIND_SENDER_TIMEOUT_S
    state_sources: int = 1  # hivemind's load_state_from_peers downloads from one peer, the highest priority first
    raw: dict = field(default_factory=dict, compare=False)  # the table as written, for the resolved config

    def speed(self, worker: int, time_s: float) -> float:
        """The straggler factor on this worker's FLOP/s at `time_s` (intervals multiply where they overlap)."""
        factor = 1.0
        for s in self.stragglers:
            if s.worker == worker and s.from_s <= time_s < s.to_s:
                factor *= s.speed
        return factor

    def sides(self, time_s: float, n_workers: int) -> list[tuple[int, ...]] | None:
        """The sides of the partition in force at `time_s`, or None when the network is whole."""
        for p in self.partition:
            if p.from_s <= time_s < p.to_s:
                listed = {w for g in p.groups for w in g}
                rest = tuple(w for w in range(n_workers) if w not in listed)
                return [g for g in p.groups] + ([rest] if rest else [])
        return None

    def exchange_fault(self, worker: int, round_: int) -> ExchangeFault | None:
        return next((f for f in self.exchange if f.worker == worker and f.round == round_), None)


def parse_duration(path: str, value: Any) -> float:
    """Seconds from a number or a string such as '90', '40ms', '1.5s', '10min', '2h'."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2) or ""]
    else:
        raise ConfigError(f"{path}: must be a duration such as 90, '40ms', '10min' or '2h', got {value!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(f"{path}: must be a duration of at least 0, got {value!r}")
    return seconds


def _worker(path: str, value: Any, n_workers: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n_workers:
        raise ConfigError(f"{path}: must be a worker index in 0..{n_workers - 1}, got {value!r}")
    return value


def _table(path: str, value: Any, keys: tuple[str, ...], required: tuple[str, ...]) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: must be a table such as {{ {', '.join(f'{k} = ...' for k in required)} }}, "
                          f"got {value!r}")
    for k in value:
        if k not in keys:
            raise ConfigError(f"{path}.{k}: unknown key; allowed: {', '.join(keys)}")
    for k in required:
        if k not in value:
            raise ConfigError(f"{path}.{k}: required")
    return value


def _list(path: str, value: Any) -> list:
    if not isinstance(value, list):
        raise ConfigError(f"{path}: must be a list of tables, got {value!r}")
    return value


def _interval(path: str, t: dict) -> tuple[float, float]:
    start, stop = parse_duration(f"{path}.from_s", t["from_s"]), parse_duration(f"{path}.to_s", t["to_s"])
    if stop <= start:
        raise ConfigError(f"{path}.to_s: must be later than from_s ({start:g} s), got {stop:g} s")
    return start, stop


def _event(path: str, t: Any, n_workers: int) -> Outage:
    t = _table(path, t, ("worker", "leave_step", "return_step", "leave_s", "return_s"), ("worker",))
    worker = _worker(f"{path}.worker", t["worker"], n_workers)
    by_step = "leave_step" in t
    if by_step == ("leave_s" in t):
        raise ConfigError(f"{path}: give one of leave_step (a step number) or leave_s (simulated seconds)")
    back_key, other = ("return_step", "return_s") if by_step else ("return_s", "return_step")
    if other in t:
        raise ConfigError(f"{path}.{other}: a peer that leaves by {'step' if by_step else 'time'} returns by "
                          f"{back_key}")
    if by_step:
        leave = t["leave_step"]
        if isinstance(leave, bool) or not isinstance(leave, int) or leave < 0:
            raise ConfigError(f"{path}.leave_step: must be a step number >= 0, got {leave!r}")
        back = t.get("return_step")
        if back is not None and (isinstance(back, bool) or not isinstance(back, int) or back <= leave):
            raise ConfigError(f"{path}.return_step: must be a step number after leave_step ({leave}), got {back!r}")
    else:
        leave = parse_duration(f"{path}.leave_s", t["leave_s"])
        back = t.get("return_s")
        if back is not None:
            back = parse_duration(f"{path}.return_s", back)
            if back <= leave:
                raise ConfigError(f"{path}.return_s: must be later than leave_s ({leave:g} s), got {back:g} s")
    return Outage(worker, float(leave), None if back is None else float(back), by_step)


def parse_faults(path: str, table: Any, n_workers: int) -> FaultsConfig:
    """The `faults` table of a run or an arm; ConfigError naming the field and the fix."""
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: must be a table (keys: {', '.join(KEYS)}), got {table!r}")
    for k in table:
        if k not in KEYS:
            raise ConfigError(f"{path}.{k}: unknown key; allowed: {', '.join(KEYS)}")
    mtbf = parse_duration(f"{path}.mtbf", table["mtbf"]) if "mtbf" in table else None
    mttr = parse_duration(f"{path}.mttr", table["mttr"]) if "mttr" in table else None
    if (mtbf is None) != (mttr is None):
        raise ConfigError(f"{path}.{'mttr' if mttr is None else 'mtbf'}: a random trace needs both mtbf (mean time "
                          f"between failures) and mttr (mean time to return)")
    if mtbf is not None and mtbf <= 0:
        raise ConfigError(f"{path}.mtbf: must be a duration above 0, got {table['mtbf']!r}")
    events = tuple(_event(f"{path}.events[{i}]", t, n_workers) for i, t in enumerate(_list(f"{path}.events",
                                                                                           table.get("events", []))))
    if events and mtbf is not None:
        raise ConfigError(f"{path}.events: contradictory faults: give either events (a written trace) or mtbf/mttr "
                          f"(a seeded one), not both")
    for w in range(n_workers):
        mine = [(i, e) for i, e in enumerate(events) if e.worker == w]
        if len({e.by_step for _, e in mine}) > 1:
            raise ConfigError(f"{path}.events[{mine[-1][0]}]: worker {w}'s events mix steps and seconds; use one")
        mine.sort(key=lambda ie: ie[1].leave)
        for (_, a), (j, b) in zip(mine, mine[1:]):
            if a.back is None or b.leave < a.back:
                raise ConfigError(f"{path}.events[{j}]: worker {w} leaves again before it has returned; "
                                  f"contradictory faults")
    exchange = []
    for i, t in enumerate(_list(f"{path}.exchange", table.get("exchange", []))):
        p = f"{path}.exchange[{i}]"
        t = _table(p, t, ("worker", "round", "phase", "down"), ("worker", "round", "phase"))
        rnd = t["round"]
        if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 0:
            raise ConfigError(f"{p}.round: must be a round number >= 0, got {rnd!r}")
        if t["phase"] not in PHASES:
            raise ConfigError(f"{p}.phase: must be one of {', '.join(PHASES)}, got {t['phase']!r}")
        if t["phase"] == "cancel" and "down" in t:
            raise ConfigError(f"{p}.down: a peer that cancels stays in the swarm; remove down or pick another phase")
        down = parse_duration(f"{p}.down", t["down"]) if "down" in t else None
        exchange.append(ExchangeFault(_worker(f"{p}.worker", t["worker"], n_workers), rnd, t["phase"], down))
    if len({(f.worker, f.round) for f in exchange}) < len(exchange):
        raise ConfigError(f"{path}.exchange: a worker fails twice in one round; contradictory faults")
    stragglers = []
    for i, t in enumerate(_list(f"{path}.stragglers", table.get("stragglers", []))):
        p = f"{path}.stragglers[{i}]"
        t = _table(p, t, ("worker", "from_s", "to_s", "speed"), ("worker", "from_s", "to_s", "speed"))
        speed = t["speed"]
        if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not 0 < speed <= 1e3:
            raise ConfigError(f"{p}.speed: must be a factor in (0, 1000] on the worker's FLOP/s, got {speed!r}")
        stragglers.append(Straggler(_worker(f"{p}.worker", t["worker"], n_workers), *_interval(p, t), float(speed)))
    partitions = []
    for i, t in enumerate(_list(f"{path}.partition", table.get("partition", []))):
        p = f"{path}.partition[{i}]"
        t = _table(p, t, ("groups", "from_s", "to_s"), ("groups", "from_s", "to_s"))
        groups = t["groups"]
        if not isinstance(groups, list) or len(groups) < 1 or not all(isinstance(g, list) and g for g in groups):
            raise ConfigError(f"{p}.groups: must be a list of non-empty lists of workers, e.g. [[0, 1], [2, 3]]")
        parsed = tuple(tuple(sorted(_worker(f"{p}.groups[{j}]", w, n_workers) for w in g))
                       for j, g in enumerate(groups))
        flat = [w for g in parsed for w in g]
        if len(set(flat)) < len(flat):
            raise ConfigError(f"{p}.groups: a worker is on two sides; list each worker once")
        partitions.append(Partition(parsed, *_interval(p, t)))
    spans = sorted((q.from_s, q.to_s) for q in partitions)
    if any(b[0] < a[1] for a, b in zip(spans, spans[1:])):
        raise ConfigError(f"{path}.partition: two partitions overlap in time; contradictory faults")
    sender = parse_duration(f"{path}.sender_timeout", table.get("sender_timeout", HIVEMIND_SENDER_TIMEOUT_S))
    reducer = parse_duration(f"{path}.reducer_timeout", table.get("reducer_timeout", 2 * sender))
    if "reducer_timeout" in table and reducer <= sender:
        # hivemind's own rule (allreduce.py): otherwise reducers are banned while they await senders.
        raise ConfigError(f"{path}.reducer_timeout: must be longer than sender_timeout ({sender:g} s), got {reducer:g}")
    sources = table.get("state_sources", 1)
    if isinstance(sources, bool) or not isinstance(sources, int) or not 1 <= sources < max(2, n_workers):
        raise ConfigError(f"{path}.state_sources: must be an integer in 1..{max(1, n_workers - 1)} (peers a joiner "
                          f"downloads the state from), got {sources!r}")
    return FaultsConfig(mtbf, mttr, events, tuple(exchange), tuple(stragglers), tuple(partitions), sender, reducer,
                        sources, raw=dict(table))


class FaultTrace:
    """Each worker's outages in order: the written events, or a seeded draw from mtbf/mttr (extended as the run
    needs it, from one generator per worker, so the trace never depends on how long the run turns out to be)."""

    def __init__(self, faults: FaultsConfig, n_workers: int, seed: int):
        self.faults = faults
        self._drawn: list[list[Outage]] = [[] for _ in range(n_workers)]
        self._rngs = [np.random.default_rng([seed, 0xFA17, w]) for w in range(n_workers)]
        for w in range(n_workers):
            self._drawn[w] = sorted((e for e in faults.events if e.worker == w), key=lambda e: e.leave)

    def outage(self, worker: int, index: int) -> Outage | None:
        """The worker's `index`-th outage, or None if it has no more."""
        f, drawn = self.faults, self._drawn[worker]
        while f.mtbf_s is not None and len(drawn) <= index:
            start = drawn[-1].back if drawn else 0.0
            leave = start + float(self._rngs[worker].exponential(f.mtbf_s))
            back = leave + float(self._rngs[worker].exponential(f.mttr_s))
            drawn.append(Outage(worker, leave, back, by_step=False, cause="mtbf"))
        return drawn[index] if index < len(drawn) else None

    def state_dict(self) -> dict:
        """The outages drawn so far and where each worker's generator stands: a resumed arm draws on from there."""
        return {"drawn": [[astuple(o) for o in d] for d in self._drawn],
                "rngs": [rng.bit_generator.state for rng in self._rngs]}

    def load_state_dict(self, state: dict) -> None:
        self._drawn = [[Outage(*o) for o in d] for d in state["drawn"]]
        for rng, saved in zip(self._rngs, state["rngs"]):
            rng.bit_generator.state = saved
