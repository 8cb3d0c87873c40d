"""Synchronous data parallelism: gradients are all-reduced after every backward pass.

On a tight interconnect this is the baseline every far-flung arm is measured against; with N
workers of batch b it is the same computation as one replica training on batch N*b.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.strategies.base import Exchange, Settings, StepGenerator, Strategy


@dataclass(frozen=True)
class DDPSettings(Settings):
    pass


class DDP(Strategy):
    name = "ddp"
    summary = "gradients, ring all-reduce every step (the baseline)"
    Settings = DDPSettings
    robust_aggregation = True
    real_mode = "lockstep"

    def train_step(self, step: int) -> StepGenerator:
        replica = self.replica
        loss = replica.forward_backward()
        gradients = yield Exchange("gradients", replica.flat_grads())
        replica.set_flat_grads(gradients)
        replica.optimizer_step(step)
        return loss
