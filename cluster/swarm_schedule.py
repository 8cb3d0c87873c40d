"""When a swarm's epoch closes over the peers that take part in it, each at its own (possibly changing) speed.

`cluster.collaborative` plans an epoch for every peer from one start and one microbatch time. With faults
(`cluster.swarm_churn`) only some peers take part, joiners start late, and a straggler's microbatches slow down over
an interval, so each peer's completions are a list: c_0 = its start, c_{k+1} = c_k + the microbatch's seconds at
c_k (the clock charges a microbatch at the speed in force when it begins, as `ChurnExchanges.compute_seconds` does).
`plan_epoch` applies the collaborative driver's rules (its docstring) to those lists: the target, the notice, the
budget's cap, late microbatches, and per group the leader's matchmaking window: one group, or one per side of a
partition in force when the whole swarm's round would begin.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cluster.swarm_timing import SwarmTiming


class Completions:
    """Each peer's microbatch completion times from its start, extended as far as they are asked for."""

    def __init__(self, start: dict[int, float], seconds: Callable[[int, float], float]):
        self.seconds = seconds  # (worker, time a microbatch begins) -> its compute seconds
        self.times = {w: [s] for w, s in start.items()}

    def at(self, w: int, k: int) -> float:
        """The k-th completion (k = 0: the start)."""
        times = self.times[w]
        while len(times) <= k:
            times.append(times[-1] + self.seconds(w, times[-1]))
        return times[k]

    def count_by(self, w: int, t: float) -> int:
        """Microbatches finished by time t."""
        assert math.isfinite(t)
        times = self.times[w]
        while times[-1] <= t:
            self.at(w, len(times))
        return bisect.bisect_right(times, t) - 1

    def first_from(self, w: int, t: float) -> float:
        """The first completion at or after t (the first, if t comes before it)."""
        k = self.count_by(w, t)
        if k == 0 or self.at(w, k) < t:
            k += 1
        return self.at(w, k)


@dataclass(frozen=True)
class Group:
    members: tuple[int, ...]
    matchmaking_start_s: float  # when its first peer began looking for a group
    round_start_s: float  # when its all-reduce begins


@dataclass(frozen=True)
class EpochPlan:
    members: tuple[int, ...]
    target_s: float  # the swarm's counted samples reach the target
    ready_s: float  # every peer has noticed and stopped accumulating (or the budget's last microbatch is done)
    completed: dict[int, int]  # microbatches in this epoch, per member
    late: dict[int, bool]  # a microbatch under way at ready_s, carried into the next epoch
    groups: tuple[Group, ...]

    def group_of(self, w: int) -> Group:
        return next(g for g in self.groups if w in g.members)


def target_time(c: Completions, members: Sequence[int], carried: Sequence[int], target: int, batch: int) -> float:
    samples = sum(carried[w] for w in members)
    if samples >= target:
        return max(c.at(w, 0) for w in members)
    heap = [(c.at(w, 1), w, 1) for w in members]
    heapq.heapify(heap)
    while True:
        t, w, k = heapq.heappop(heap)
        samples += batch
        if samples >= target:
            return t
        heapq.heappush(heap, (c.at(w, k + 1), w, k + 1))


def first_completions(c: Completions, members: Sequence[int], count: int) -> tuple[dict[int, int], float]:
    """The first `count` completions over the members: how many each made, and when the last ended."""
    heap = [(c.at(w, 1), w, 1) for w in members]
    heapq.heapify(heap)
    made = {w: 0 for w in members}
    t = max(c.at(w, 0) for w in members)
    for _ in range(count):
        t, w, k = heapq.heappop(heap)
        made[w] = k
        heapq.heappush(heap, (c.at(w, k + 1), w, k + 1))
    return made, t


def plan_epoch(c: Completions, members: Sequence[int], *, carried: Sequence[int], target: int, batch: int,
               left: int, allow_late: bool, notice_s: float, timing: SwarmTiming, n_workers: int,
               sides: Callable[[float], list[tuple[int, ...]] | None], link_free_s: Sequence[float]) -> EpochPlan:
    """The epoch over `members` (`left`: microbatches the token budget still allows). A group is full, so that its
    leader need not wait out matchmaking_time, only with a target_group_size and every peer of the swarm in it."""
    t_target = target_time(c, members, carried, target, batch)
    t_ready = t_target + notice_s
    completed = {w: c.count_by(w, t_ready) for w in members}
    if sum(completed.values()) >= left:
        completed, t_ready = first_completions(c, members, max(left, 1))
        allow_late = False
    late = {w: allow_late and c.at(w, completed[w]) < t_ready for w in members}
    due = min(t_target, t_ready) - timing.matchmaking_time

    def group(part: tuple[int, ...]) -> Group:
        t_match = min(c.first_from(w, due) for w in part)
        full = timing.target_group_size and len(part) == n_workers
        assembled = -math.inf if full else t_match + min(timing.matchmaking_time, timing.averaging_timeout)
        return Group(part, t_match, max(t_ready, assembled, *(link_free_s[w] for w in part)))

    whole = group(tuple(members))
    cut = sides(whole.round_start_s)  # the sides in force when the swarm's round would begin
    parts = [tuple(w for w in side if w in members) for side in cut] if cut else []
    groups = tuple(group(p) for p in parts if p) if cut else (whole,)
    return EpochPlan(tuple(members), t_target, t_ready, completed, late, groups)
