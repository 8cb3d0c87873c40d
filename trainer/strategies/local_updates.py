"""hivemind's local updates: `hivemind.Optimizer(use_local_updates=True)`.

Every worker applies its own AdamW step to its own gradients at every step, and every
`average_state_every` steps the workers average their parameters with hivemind's butterfly
all-reduce (payload "parameters"). Only the parameters are averaged, as with hivemind's default
`average_opt_statistics=()`: each worker keeps its own Adam moments.

`average_state_every` counts local steps here. hivemind counts epochs (its default is 1), and an
epoch closes when the swarm has accumulated `target_batch_size` samples; with local updates that
is target_batch_size / (workers x per-worker batch) local steps. The default of 16 is hivemind's
default of one epoch for a target batch 16 times the swarm's per-step batch (e.g. 8 peers of
batch 32 and target_batch_size 4096).

`delay_state_averaging` (hivemind's option of that name; hivemind defaults it to True, this
setting to False so that the plain, blocking form is what a bare `local-updates` arm runs):
the average runs in the background while the worker trains on. hivemind then applies it with the
delta rule of `TrainingStateAverager(delta_rule_averaging=True)`, which `Optimizer` enables for
exactly this combination: `params := params + (average - params_sent)`. Here the round started
after step t's local update is awaited at step t+1, after that step's forward/backward and local
AdamW update, so the update u_{t+1} survives: params = average + u_{t+1}. (hivemind 1.1.12 waits
for the round at the start of its next optimizer step, i.e. after the same forward/backward but
before the AdamW update; the two differ only by AdamW's weight-decay term lr * wd * (average -
params_sent), and their time accounting is the same: one forward/backward of overlap.)

`finish` awaits a round still in flight and, if the replicas may differ, averages the parameters
once more (blocking), so that every replica ends on one model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.settings import setting
from trainer.strategies.base import Await, Exchange, Settings, StepGenerator, Strategy, SwarmMapping


@dataclass(frozen=True)
class LocalUpdatesSettings(Settings):
    average_state_every: int = setting(16, "local steps between parameter averages", low=1)
    delay_state_averaging: bool = setting(False, "average in the background, apply by the delta rule")


class LocalUpdates(Strategy):
    name = "local-updates"
    summary = ("hivemind's `use_local_updates`: own AdamW every step, parameters butterfly-averaged every "
               "`average_state_every` steps")
    Settings = LocalUpdatesSettings
    robust_aggregation = True
    real_mode = "swarm"

    @classmethod
    def swarm_mapping(cls, settings: LocalUpdatesSettings, n_workers: int, batch_size: int) -> SwarmMapping:
        # One hivemind epoch is `average_state_every` steps of every peer; the state is averaged at each epoch.
        return SwarmMapping(
            target_batch_size=settings.average_state_every * n_workers * batch_size, use_local_updates=True,
            delay_state_averaging=settings.delay_state_averaging, average_state_every=1,
            lockstep_steps_per_epoch=float(settings.average_state_every),
        )

    def __init__(self, settings: LocalUpdatesSettings, replica):
        super().__init__(settings, replica)
        self.sent: torch.Tensor | None = None  # parameters of the round in flight (delayed averaging)
        self.diverged = False  # whether replicas may differ since their last exact average

    def state_dict(self) -> dict:
        return {"sent": None if self.sent is None else self.sent.clone(), "diverged": self.diverged}

    def load_state_dict(self, state: dict) -> None:
        self.sent = None if state["sent"] is None else state["sent"].clone()
        self.diverged = state["diverged"]

    def train_step(self, step: int) -> StepGenerator:
        replica = self.replica
        loss = replica.forward_backward()
        replica.optimizer_step(step)
        self.diverged = True
        if self.sent is not None:
            yield from self.apply_delayed_average()
        if (step + 1) % self.settings.average_state_every == 0:
            if self.settings.delay_state_averaging:
                self.sent = replica.flat_params().clone()
                yield Exchange("parameters", self.sent, collective="butterfly", blocking=False)
            else:
                yield from self.average_now()
        return loss

    def apply_delayed_average(self) -> StepGenerator:
        """Await the round started a step ago and apply it by the delta rule."""
        average = yield Await("parameters")
        current = self.replica.flat_params()
        self.replica.set_flat_params(current + (average - self.sent))
        self.sent = None

    def average_now(self) -> StepGenerator:
        params = self.replica.flat_params().clone()
        average = yield Exchange("parameters", params, collective="butterfly")
        self.replica.set_flat_params(average)
        self.diverged = False

    def finish(self) -> StepGenerator:
        if self.sent is not None:
            # Started at the last step, with nothing trained since: the delta rule would give the
            # average up to rounding, so take it as it is and the replicas end bit-for-bit equal.
            average = yield Await("parameters")
            self.replica.set_flat_params(average)
            self.sent, self.diverged = None, False
        if self.diverged:
            yield from self.average_now()
