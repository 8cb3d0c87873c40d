"""hivemind's collaborative large batch (hivemind.Optimizer's default mode).

Peers train at their own speeds and report the samples they have accumulated; when the swarm's
samples reach `target_batch_size` the epoch closes, the peers average their accumulated gradients
(hivemind's butterfly all-reduce, each peer weighted by its samples) and all take the optimizer
step for that epoch. A fast peer contributes more samples; a microbatch still running when the
peers stop to average belongs to the next epoch (it was computed on the old parameters: one step
stale).

The strategy only accumulates and answers the cluster's questions; when an epoch closes, how long
the progress reports and matchmaking take, and who is still computing, are decided in
`cluster.collaborative` from the links, the peers' speeds and the arm's swarm timing
(`cluster.swarm_timing.SwarmTiming`: `matchmaking_time`, `averaging_timeout`, `target_group_size`,
`progress_refresh_s`, set in the same `algorithm` table of the experiment file). The real mode runs
the same settings as `hivemind.Optimizer` (`swarm_mapping`).

Every `average_state_every` epochs (hivemind.Optimizer's default: 1), after its optimizer step, each peer also
averages its parameters with the others (hivemind's state averager: a butterfly all-reduce, equal weights, blocking
unless `delay_state_averaging`, which a collaborative arm leaves off). Optimizer statistics are not averaged, as
with hivemind's default `average_opt_statistics=()`. The peers already hold the same parameters after a complete
gradient round; the state average is what brings them back together after one that was partial or failed (each
peer then stepped on its own gradients), as it does on real peers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.settings import setting
from trainer.strategies.base import (Await, EpochAverage, Exchange, Report, Settings, StepGenerator, Strategy,
                                     SwarmMapping)


@dataclass(frozen=True)
class CollaborativeSettings(Settings):
    target_batch_size: int = setting(256, "samples (sequences) per epoch over the whole swarm", low=1)
    average_state_every: int = setting(1, "epochs between averages of the parameters (hivemind.Optimizer's "
                                       "average_state_every)", low=1)


class Collaborative(Strategy):
    name = "collaborative"
    summary = ("hivemind.Optimizer's collaborative large batch: peers accumulate at their own speeds until the swarm "
               "reaches `target_batch_size` samples, then a butterfly all-reduce weighted by samples; every "
               "`average_state_every` epochs the parameters are averaged too (hivemind's state averager)")
    Settings = CollaborativeSettings
    schedule = "collaborative"
    retimable = False  # when an epoch closes depends on the peers' speeds and the links
    real_mode = "swarm"

    @classmethod
    def swarm_mapping(cls, settings: CollaborativeSettings, n_workers: int, batch_size: int) -> SwarmMapping:
        return SwarmMapping(
            target_batch_size=settings.target_batch_size, use_local_updates=False, delay_state_averaging=False,
            average_state_every=settings.average_state_every, lockstep_steps_per_epoch=settings.target_batch_size / (n_workers * batch_size),
        )

    def __init__(self, settings: CollaborativeSettings, replica):
        super().__init__(settings, replica)
        self.accumulated = torch.zeros_like(replica.flat_params())  # sum of per-sample gradients
        self.samples = 0
        self.carried_losses: list[float] = []

    def state_dict(self) -> dict:
        # A late microbatch of the epoch just closed is already in `accumulated`, its loss in `carried_losses`.
        return {"accumulated": self.accumulated.clone(), "samples": self.samples,
                "carried_losses": list(self.carried_losses)}

    def load_state_dict(self, state: dict) -> None:
        self.accumulated = state["accumulated"].clone()
        self.samples, self.carried_losses = state["samples"], list(state["carried_losses"])

    def state_loaded(self) -> None:
        """hivemind.Optimizer.load_state_from_peers resets the accumulated gradients (the sender's late microbatch
        is the sender's contribution, not the joiner's): the joiner accumulates its own from zero."""
        self.accumulated = torch.zeros_like(self.accumulated)
        self.samples, self.carried_losses = 0, []

    def averages_state_after(self, epoch: int) -> bool:
        """hivemind.Optimizer averages the state when the epoch it moves to is a multiple of average_state_every,
        and only with someone to average with."""
        return self.replica.spec.n_workers > 1 and (epoch + 1) % self.settings.average_state_every == 0

    def microbatch(self) -> float:
        loss = self.replica.forward_backward()
        batch = self.replica.spec.batch_size
        # Gradients are batch means: weight by the batch so the epoch's average is per sample.
        self.accumulated += self.replica.flat_grads() * batch
        self.samples += batch
        return loss

    def train_step(self, epoch: int) -> StepGenerator:
        losses, self.carried_losses = self.carried_losses, []
        while (yield Report(self.samples)):
            losses.append(self.microbatch())
        samples = self.samples
        mean_gradient = self.accumulated / samples if samples else torch.zeros_like(self.accumulated)
        yield Exchange("gradients", mean_gradient, collective="butterfly", weight=float(samples), blocking=False)
        self.accumulated, self.samples = torch.zeros_like(self.accumulated), 0
        # A microbatch under way when the round began finishes on the old parameters, into the next epoch.
        if (yield Report(0)):
            self.carried_losses.append(self.microbatch())
        average: EpochAverage = yield Await("gradients")
        late_gradients = self.accumulated
        self.replica.set_flat_grads(average.tensor)
        spec = self.replica.spec
        # Every arm follows one schedule in tokens: this epoch sits where DDP would be after as many samples.
        self.replica.optimizer_step(average.samples_before // (spec.n_workers * spec.batch_size))
        self.accumulated = late_gradients
        if self.averages_state_after(epoch):
            params = yield Exchange("parameters", self.replica.flat_params().clone(), collective="butterfly")
            self.replica.set_flat_params(params)
        return sum(losses) / len(losses) if losses else float("nan")
