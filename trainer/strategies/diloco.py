"""DiLoCo (Douillard et al., 2023): H inner AdamW steps, then an outer Nesterov step.

Each worker trains alone for `inner_steps`; the pseudo-gradient (the shared parameters at the last
synchronisation minus the worker's parameters now) is averaged across workers and applied to the
shared parameters by an outer SGD with Nesterov momentum. Communication drops by a factor of H.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.settings import setting
from trainer.strategies.base import Exchange, Settings, StepGenerator, Strategy


@dataclass(frozen=True)
class DiLoCoSettings(Settings):
    inner_steps: int = setting(50, "H: inner AdamW steps between two outer steps", low=1)
    outer_lr: float = setting(0.7, "the outer Nesterov SGD's learning rate (the paper's value)", low=0.0, high=10.0,
                              low_open=True)
    outer_momentum: float = setting(0.9, "the outer Nesterov momentum (0: plain outer SGD)", low=0.0, high=0.999)


class DiLoCo(Strategy):
    name = "diloco"
    summary = "pseudo-gradient every `inner_steps`, outer Nesterov SGD"
    Settings = DiLoCoSettings
    robust_aggregation = True
    real_mode = "lockstep"

    def __init__(self, settings: DiLoCoSettings, replica):
        super().__init__(settings, replica)
        momentum = settings.outer_momentum
        self.outer_optimizer = torch.optim.SGD(
            replica.model.parameters(), lr=settings.outer_lr, momentum=momentum, nesterov=momentum > 0
        )
        self.shared = replica.flat_params()
        self.steps_since_sync = 0

    def state_dict(self) -> dict:
        return {"shared": self.shared.clone(), "outer_optimizer": self.outer_optimizer.state_dict(),
                "steps_since_sync": self.steps_since_sync}

    def load_state_dict(self, state: dict) -> None:
        self.shared = state["shared"].clone()
        self.outer_optimizer.load_state_dict(state["outer_optimizer"])
        self.steps_since_sync = state["steps_since_sync"]

    def train_step(self, step: int) -> StepGenerator:
        loss = self.replica.forward_backward()
        self.replica.optimizer_step(step)
        self.steps_since_sync += 1
        if self.steps_since_sync == self.settings.inner_steps:
            yield from self.outer_step()
        return loss

    def finish(self) -> StepGenerator:
        if self.steps_since_sync:
            yield from self.outer_step()

    def outer_step(self) -> StepGenerator:
        replica = self.replica
        pseudo_gradient = yield Exchange("pseudo_gradient", self.shared - replica.flat_params())
        # The parameters move into the shared vector and the outer step updates them there; the vector they leave
        # (none before the first outer step) takes the next shared copy. A model-sized vector allocated anew at
        # every outer step, and freed at the next, leaves holes in the heap between the long-lived tensors of the
        # replicas that share a process, which the process then holds as its own.
        spare = replica.params_vector
        replica.set_flat_params(self.shared)
        replica.set_flat_grads(pseudo_gradient)
        self.outer_optimizer.step()
        self.shared = replica.flat_params(out=spare)
        self.steps_since_sync = 0
