"""Data parallelism with delayed updates (hivemind's `delay_grad_averaging` + `delay_optimizer_step`).

Step t computes the gradients g_t and starts their all-reduce in the background; the optimizer step
that uses them is taken one step later, once their average has arrived. So the parameters lag one
step behind the gradients (every exchange is awaited with staleness 1), and each all-reduce
overlaps the next step's forward/backward instead of stalling it: a step costs max(compute, comm)
rather than compute + comm, as long as the link keeps up.

Within step t the average of g_{t-1} is awaited, and applied, before g_t is sent: the simulator
keeps one exchange per payload in flight, and a worker's link carries one exchange at a time
anyway, so g_t could not start earlier either. The optimizer step for g_{t-1} uses step t-1's
learning rate, so the schedule is DDP's, shifted by one step. `finish` applies the last average,
so every replica ends on the same parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.strategies.base import Await, Exchange, Settings, StepGenerator, Strategy


@dataclass(frozen=True)
class DelayedDDPSettings(Settings):
    pass


class DelayedDDP(Strategy):
    name = "ddp-delayed"
    summary = "gradients every step, overlapped with the next step's compute (one step stale)"
    Settings = DelayedDDPSettings
    robust_aggregation = True

    def __init__(self, settings: DelayedDDPSettings, replica):
        super().__init__(settings, replica)
        self.in_flight_step: int | None = None  # the step whose gradients are being averaged

    def state_dict(self) -> dict:
        return {"in_flight_step": self.in_flight_step}

    def load_state_dict(self, state: dict) -> None:
        self.in_flight_step = state["in_flight_step"]

    def train_step(self, step: int) -> StepGenerator:
        replica = self.replica
        loss = replica.forward_backward()
        gradients = replica.flat_grads()  # a copy: applying the previous average overwrites .grad
        yield from self.apply_in_flight()
        yield Exchange("gradients", gradients, blocking=False)
        self.in_flight_step = step
        return loss

    def finish(self) -> StepGenerator:
        yield from self.apply_in_flight()

    def apply_in_flight(self) -> StepGenerator:
        if self.in_flight_step is None:
            return
        gradients = yield Await("gradients")
        self.replica.set_flat_grads(gradients)
        self.replica.optimizer_step(self.in_flight_step)
        self.in_flight_step = None
