"""hivemind's collaborative large batch (hivemind.Optimizer's default mode).

Peers train at their own speeds and report the samples they have accumulated; when the swarm's
samples reach `target_batch_size` the epoch closes, the peers average their accumulated gradients
(hivemind's butterfly all-reduce, each peer weighted by its samples) and all take the optimizer
step for that epoch. A fast peer contributes more samples; a microbatch still running when the
peers stop to average belongs to the next epoch (it was computed on the old parameters: one step
stale).

The strategy only accumulates and answers the cluster's questions; when an epoch closes, how long
the progress reports and matchmaking take, and who is still computing, are decided in
`cluster.collaborative` from the links and the peers' speeds.

`matchmaking_time` binds: with hivemind's default `target_group_size` (None, here 0) a leader gathers
its group for `matchmaking_time` from when it began looking, and hivemind.Optimizer begins looking
once the epoch is due within `matchmaking_time`. An epoch shorter than that lasts its first
microbatch, then `matchmaking_time`, then the all-reduce. A `target_group_size` the whole swarm fits
lets the leader start as soon as every peer has joined.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.strategies.base import Await, Exchange, Report, Settings, StepGenerator, Strategy, number_in, positive_int


@dataclass(frozen=True)
class CollaborativeSettings(Settings):
    target_batch_size: int = 256  # samples (sequences) per epoch over the whole swarm
    # hivemind.Optimizer's defaults: how long a leader gathers its group (the averagers' min_matchmaking_time),
    # and how long a peer waits for the round once it has noticed the epoch's end.
    matchmaking_time: float = 15.0
    averaging_timeout: float = 60.0
    # The averager's target_group_size: a leader starts as soon as its group has this many peers. 0 stands for
    # hivemind's default None (no target: the leader gathers for matchmaking_time); else at least run.workers.
    target_group_size: int = 0
    # How often peers refresh the swarm's progress from the DHT (hivemind's ProgressTracker
    # min_refresh_period): the epoch is noticed up to this late, plus one DHT lookup.
    progress_refresh_s: float = 0.5

    def check(self) -> None:
        positive_int("target_batch_size", self.target_batch_size)
        number_in("matchmaking_time", self.matchmaking_time, 0.0, 3600.0)
        number_in("averaging_timeout", self.averaging_timeout, 0.0, 86400.0, low_open=True)
        number_in("progress_refresh_s", self.progress_refresh_s, 0.0, 3600.0)
        if isinstance(self.target_group_size, bool) or not isinstance(self.target_group_size, int) or (
            self.target_group_size < 0
        ):
            raise ValueError(f"target_group_size: must be an integer >= 0 (0: hivemind's default None), "
                             f"got {self.target_group_size!r}")


class Collaborative(Strategy):
    name = "collaborative"
    Settings = CollaborativeSettings
    schedule = "collaborative"

    @classmethod
    def check_arm(cls, settings: CollaborativeSettings, n_workers: int, codec: str) -> None:
        if 0 < settings.target_group_size < n_workers:
            raise ValueError(
                f"target_group_size: {settings.target_group_size} would split the {n_workers} peers into several "
                "groups, each averaging on its own, and the simulator forms one group per epoch; set it to "
                f"{n_workers} or more (the leader starts once everyone has joined) or leave it at 0 (hivemind's "
                "default: the leader gathers for matchmaking_time)"
            )

    def __init__(self, settings: CollaborativeSettings, replica):
        super().__init__(settings, replica)
        self.check_arm(settings, replica.spec.n_workers, replica.spec.codec)
        self.accumulated = torch.zeros_like(replica.flat_params())  # sum of per-sample gradients
        self.samples = 0
        self.carried_losses: list[float] = []

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
        # The round returns the averaged gradients followed by the swarm's samples before this epoch
        # (hivemind's progress tracker knows them), which place the epoch on the learning-rate schedule.
        reply = yield Await("gradients")
        gradients, swarm_samples = reply[:-1], int(reply[-1].item())
        late_gradients = self.accumulated
        self.replica.set_flat_grads(gradients)
        spec = self.replica.spec
        # Every arm follows one schedule in tokens: this epoch sits where DDP would be after as many samples.
        self.replica.optimizer_step(swarm_samples // (spec.n_workers * spec.batch_size))
        self.accumulated = late_gradients
        return sum(losses) / len(losses) if losses else float("nan")
