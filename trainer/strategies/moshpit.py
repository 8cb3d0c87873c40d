"""Moshpit SGD (Ryabinin et al., NeurIPS 2021): local AdamW, then parameter averaging in small groups.

Every worker trains its replica alone; every `average_every` steps it averages parameters within a
small group of `target_group_size` peers (hivemind's butterfly all-reduce inside the group),
`rounds_per_average` times in a row with new groups each round. There is never a global
all-reduce: the replicas drift apart between rounds and are pulled together group by group, so the
eval's consensus loss and `param_spread` are what to watch.

Groups (`grouping`):
- "grid" (the paper's scheme): the N = M**d peers sit on a d-dimensional grid of side
  M = target_group_size; in averaging round r the peers that share every coordinate except
  coordinate r mod d form a group. After d consecutive rounds every replica holds the exact global
  average of the parameters it started the d rounds with (the Moshpit property), at the cost of d
  small exchanges of M peers instead of one exchange of N.
- "random" (gossip): each round a permutation, drawn from a generator seeded by (run seed, round)
  and so identical on every worker without any coordination, is cut into consecutive groups of
  target_group_size; the last group takes the remainder (so no group is smaller than the target,
  and with fewer workers than the target everyone forms one group).

Only parameters are averaged; each worker keeps its own AdamW moments (hivemind's default,
`average_opt_statistics=()`). Weights are equal: every worker trains on the same batch size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trainer.settings import setting
from trainer.strategies.base import Exchange, Settings, StepGenerator, Strategy

GROUPINGS = ("grid", "random")


@dataclass(frozen=True)
class MoshpitSettings(Settings):
    # Local steps between averaging steps. 5 is this testbed's choice, not the paper's: on thin
    # links a round after every step leaves little time to compute, and on the grid the replicas
    # still mix completely every 5*d steps.
    average_every: int = setting(5, "local steps between averaging steps", low=1)
    # Group rounds run back to back at each averaging step (the T of Moshpit All-Reduce). 1 is one
    # gossip round a step; d on a full grid of M**d peers makes each averaging step an exact
    # global average, still in groups of M.
    rounds_per_average: int = setting(1, "T: group rounds back to back at each averaging step", low=1)
    target_group_size: int = setting(2, "M: peers per group, the grid's side", low=2,
                                     note="a group of one averages nothing")
    grouping: str = setting("grid", "grid: Moshpit's grid of side M; random: fresh random groups each round",
                            choices=GROUPINGS)
    # Moshpit has no final global synchronisation: the replicas end where their last round left
    # them. True adds one butterfly all-reduce over every worker in `finish`, so all replicas end
    # on the same model (at the cost of one global exchange).
    final_sync: bool = setting(False, "one butterfly all-reduce over every worker at the end")


def grid_dimensions(n_workers: int, group_size: int) -> int | None:
    """d such that n_workers == group_size**d, or None when the workers do not fill such a grid."""
    d, size = 0, 1
    while size < n_workers:
        size *= group_size
        d += 1
    return d if size == n_workers else None


def check_grid(n_workers: int, group_size: int) -> None:
    """Raise ValueError naming the fix when `n_workers` peers cannot sit on a grid of side `group_size`."""
    if grid_dimensions(n_workers, group_size) is not None:
        return
    sides = [m for m in range(2, n_workers) if grid_dimensions(n_workers, m) is not None]
    sides = " or ".join(map(str, sides + [n_workers])) + f" ({n_workers} makes one group of every worker)"
    powers = ", ".join(str(group_size**d) for d in range(1, 4))
    raise ValueError(
        f"target_group_size: grouping = \"grid\" puts the peers on a grid of side {group_size}, which needs "
        f"run.workers to be a power of {group_size} (e.g. {powers}), got run.workers = {n_workers}. Either "
        f"(A) set run.workers to such a power, (B) set target_group_size to {sides}, or (C) set "
        f"grouping = \"random\", which takes any number of workers"
    )


def moshpit_groups(n_workers: int, group_size: int, round_index: int) -> list[tuple[int, ...]]:
    """The grid groups of averaging round `round_index`: peers equal in every coordinate but r mod d.

    Worker w sits at the base-`group_size` digits of w (coordinate k = (w // M**k) % M). Groups are
    sorted tuples, listed by their smallest member.
    """
    d = grid_dimensions(n_workers, group_size)
    assert d is not None, f"{n_workers} workers do not fill a grid of side {group_size}"
    if d == 0:  # a single worker
        return [(0,)]
    stride = group_size ** (round_index % d)
    groups = []
    for w in range(n_workers):
        if (w // stride) % group_size == 0:  # the group's member with coordinate 0 lists it
            groups.append(tuple(w + j * stride for j in range(group_size)))
    return groups


def random_groups(n_workers: int, group_size: int, round_index: int, seed: int) -> list[tuple[int, ...]]:
    """Gossip groups of round `round_index`: a seeded permutation cut into groups of `group_size`.

    The generator depends only on (seed, round), so every worker computes the same groups. The last
    group takes the remainder. Groups are sorted tuples, listed by their smallest member.
    """
    order = np.random.default_rng([seed, round_index, 0x6D05]).permutation(n_workers).tolist()
    n_groups = max(1, n_workers // group_size)
    cuts = [i * group_size for i in range(n_groups)] + [n_workers]
    return sorted(tuple(sorted(order[a:b])) for a, b in zip(cuts, cuts[1:]))


class Moshpit(Strategy):
    name = "moshpit"
    summary = ("parameters averaged in groups of `target_group_size` on Moshpit's grid (or random groups); no "
               "global all-reduce")
    Settings = MoshpitSettings
    robust_aggregation = True

    @classmethod
    def check_arm(cls, settings: MoshpitSettings, n_workers: int, codec: str) -> None:
        if settings.grouping == "grid":
            check_grid(n_workers, settings.target_group_size)
        elif settings.target_group_size > n_workers:
            raise ValueError(f"target_group_size: a group of {settings.target_group_size} needs at least that many "
                             f"workers, and run.workers = {n_workers}; set target_group_size to at most {n_workers}")

    @classmethod
    def replicas_agree_at_end(cls, settings: MoshpitSettings) -> bool:
        # No global synchronisation unless asked for: the replicas end where their last group round left them.
        return settings.final_sync

    def __init__(self, settings: MoshpitSettings, replica):
        super().__init__(settings, replica)
        if settings.grouping == "grid":
            check_grid(replica.spec.n_workers, settings.target_group_size)
        self.averaging_round = 0

    def groups(self, round_index: int) -> list[tuple[int, ...]]:
        spec, s = self.replica.spec, self.settings
        if s.grouping == "grid":
            return moshpit_groups(spec.n_workers, s.target_group_size, round_index)
        return random_groups(spec.n_workers, s.target_group_size, round_index, spec.seed)

    def state_dict(self) -> dict:
        return {"averaging_round": self.averaging_round}

    def load_state_dict(self, state: dict) -> None:
        self.averaging_round = state["averaging_round"]

    def train_step(self, step: int) -> StepGenerator:
        loss = self.replica.forward_backward()
        self.replica.optimizer_step(step)
        if (step + 1) % self.settings.average_every == 0:
            for _ in range(self.settings.rounds_per_average):
                yield from self.average_in_group()
        return loss

    def average_in_group(self) -> StepGenerator:
        worker = self.replica.spec.worker
        group = next(g for g in self.groups(self.averaging_round) if worker in g)
        self.averaging_round += 1
        averaged = yield Exchange("parameters", self.replica.flat_params(), collective="butterfly", group=group)
        self.replica.set_flat_params(averaged)

    def finish(self) -> StepGenerator:
        if self.settings.final_sync:
            averaged = yield Exchange("parameters", self.replica.flat_params(), collective="butterfly")
            self.replica.set_flat_params(averaged)
