"""SPARTA (Baioumy & Cheema, exo 2025, "SPARTA: Sparse Parameter Averaging for Asynchronous Training").

Every worker trains alone with its own AdamW; after every `every` steps, a random fraction p of the
parameters is replaced by its mean across workers. The indices are drawn from a generator seeded by
(run seed, step), so every worker picks the same ones without sending them: the message is the k
selected values alone, k = max(1, round(p * n_params)) (Python's round, half to even).

Defaults follow exo gym's `SPARTAStrategy(p_sparta=0.005)`, averaging after every inner step
(its `SparseCommunicator` runs after each `optim.step()`). exo gym draws a Bernoulli(p) mask per
tensor, so its count varies from step to step; here exactly k indices are drawn over the flat
vector, which keeps the message size fixed and the byte count exact.

With p = 1 this is local AdamW followed by a full parameter average after every step. `finish`
averages all parameters once more (a dense message) so that every replica ends on one model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trainer.settings import setting
from trainer.strategies.base import Exchange, Settings, StepGenerator, Strategy

_INDEX_STREAM = 0x5BA27A  # separates SPARTA's draws from other users of the run seed


@dataclass(frozen=True)
class SPARTASettings(Settings):
    fraction: float = setting(0.005, "p: share of the parameters averaged per round (exo gym's p_sparta)", low=0.0,
                              high=1.0, low_open=True)
    every: int = setting(1, "local steps between sparse averaging rounds", low=1)


def selected_count(fraction: float, n_params: int) -> int:
    """How many parameters one round averages."""
    return min(n_params, max(1, round(fraction * n_params)))


def selected_indices(seed: int, step: int, n_params: int, k: int) -> torch.Tensor:
    """The sorted indices averaged after `step`; every worker draws the same ones from (seed, step)."""
    if k >= n_params:
        return torch.arange(n_params)
    rng = np.random.default_rng([seed, step, _INDEX_STREAM])
    chosen = np.sort(rng.choice(n_params, size=k, replace=False))
    return torch.from_numpy(chosen.astype(np.int64))


class SPARTA(Strategy):
    name = "sparta"
    summary = "a random `fraction` of the parameters averaged every step"
    Settings = SPARTASettings
    robust_aggregation = True

    def __init__(self, settings: SPARTASettings, replica):
        super().__init__(settings, replica)
        self.n_params = replica.flat_params().numel()
        self.k = selected_count(settings.fraction, self.n_params)
        self.diverged = False  # whether replicas may differ since the last full average

    def state_dict(self) -> dict:
        return {"diverged": self.diverged}

    def load_state_dict(self, state: dict) -> None:
        self.diverged = state["diverged"]

    def train_step(self, step: int) -> StepGenerator:
        replica = self.replica
        loss = replica.forward_backward()
        replica.optimizer_step(step)
        self.diverged = True
        if (step + 1) % self.settings.every == 0:
            yield from self.sparse_average(step)
        return loss

    def sparse_average(self, step: int) -> StepGenerator:
        replica = self.replica
        params = replica.flat_params().clone()
        if self.k == self.n_params:
            params = yield Exchange("sparse_parameters", params)
            self.diverged = False
        else:
            indices = selected_indices(self.replica.spec.seed, step, self.n_params, self.k)
            params[indices] = (yield Exchange("sparse_parameters", params[indices].contiguous()))
        replica.set_flat_params(params)

    def finish(self) -> StepGenerator:
        if self.diverged:
            mean = yield Exchange("parameters", self.replica.flat_params().clone())
            self.replica.set_flat_params(mean)
            self.diverged = False
