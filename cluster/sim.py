"""The simulator's driver for one arm: real training on the replicas, modelled time on a virtual clock.

Exchanges are carried out exactly (the decoded tensors are averaged in worker order, so a run is
bit-for-bit repeatable) while their duration and bytes come from the network model. Workers move
in lockstep from one exchange to the next; a blocking exchange waits for the slowest participant.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cluster.clock import VirtualClock
from cluster.collectives import ring_allreduce
from cluster.devices import DeviceProfile
from cluster.network import Network
from trainer.compression import transmit
from trainer.replica import ExchangeRequest, StepDone

COLLECTIVES = {"ring_allreduce": ring_allreduce}


@dataclass(frozen=True)
class ArmPlan:
    name: str
    n_workers: int
    network: Network
    devices: tuple[DeviceProfile, ...]  # per worker
    speed_factors: tuple[float, ...]  # per worker, multiplies the device's effective FLOP/s
    codec: str
    total_steps: int
    tokens_per_step: int  # over all workers
    eval_every_steps: int
    seed: int

    def flops_per_second(self, worker: int) -> float:
        return self.devices[worker].effective_flops * self.speed_factors[worker]


def average(tensors: Sequence[np.ndarray]) -> np.ndarray:
    """The exact mean, summed in worker order so that repeated runs agree to the bit."""
    total = np.array(tensors[0], dtype=np.float32, copy=True)
    for t in tensors[1:]:
        total += t
    total /= np.float32(len(tensors))
    return total


class ArmSimulation:
    def __init__(self, runtime, plan: ArmPlan, emit: Callable[[dict], None], on_step: Callable[[], None] = lambda: None):
        self.runtime, self.plan, self.emit, self.on_step = runtime, plan, emit, on_step
        self.clock = VirtualClock(plan.n_workers)
        self.round = 0
        self.steps_completed = 0
        self.step_compute_s = [0.0] * plan.n_workers  # compute of the step in progress, per worker
        self.jitter_rng = np.random.default_rng([plan.seed, 0x7177])

    def run(self) -> None:
        plan = self.plan
        self.evaluate(step=0)
        step = 0
        while step < plan.total_steps:
            until = min(plan.total_steps, (step // plan.eval_every_steps + 1) * plan.eval_every_steps)
            self.advance(until, finish=until == plan.total_steps)
            step = until
            self.evaluate(step)

    def advance(self, until_step: int, finish: bool) -> None:
        replies: list = [None] * self.plan.n_workers
        while True:
            events = self.runtime.call("advance", [(until_step, r, finish) for r in replies])
            requests = self.account_compute(events)
            if requests is None:
                return
            reply = self.exchange(requests)
            replies = [reply] * self.plan.n_workers

    def account_compute(self, events: list[list]) -> list[ExchangeRequest] | None:
        plan = self.plan
        steps = [[e for e in evs if isinstance(e, StepDone)] for evs in events]
        assert len({len(s) for s in steps}) == 1, "workers left lockstep"
        for done in zip(*steps):
            for w, d in enumerate(done):
                # A step that paused for an exchange was charged its forward/backward before it.
                compute_s = d.flops / plan.flops_per_second(w)
                time_s = self.clock.compute(w, compute_s)
                compute_s, self.step_compute_s[w] = compute_s + self.step_compute_s[w], 0.0
                self.emit(
                    {
                        "kind": "step", "arm": plan.name, "worker": w, "step": d.step,
                        "tokens": (d.step + 1) * plan.tokens_per_step, "loss": d.loss,
                        "time_s": time_s, "compute_s": compute_s,
                    }
                )
            self.on_step()
            self.steps_completed = done[0].step + 1
        tails = [evs[-1] if evs and isinstance(evs[-1], ExchangeRequest) else None for evs in events]
        if all(t is None for t in tails):
            return None
        assert all(t is not None for t in tails), "only some workers asked for an exchange"
        for w, t in enumerate(tails):
            compute_s = t.flops / plan.flops_per_second(w)
            self.clock.compute(w, compute_s)
            self.step_compute_s[w] += compute_s
        return tails

    def exchange(self, requests: list[ExchangeRequest]) -> np.ndarray:
        plan, first = self.plan, requests[0]
        assert all(r.payload == first.payload and r.collective == first.collective for r in requests)
        assert first.group is None, "group exchanges need the event-driven scheduler"
        participants = list(range(plan.n_workers))
        reduced = average([r.tensor for r in requests])
        # The reduced parts travel back through the same codec (the all-gather half of the exchange).
        result = transmit(torch.from_numpy(reduced), plan.codec)
        nbytes = max(r.nbytes for r in requests)
        cost = COLLECTIVES[first.collective](plan.network, participants, nbytes, rng=self.jitter_rng)
        sync = self.clock.synchronise(participants, cost.time_s)
        self.emit(
            {
                "kind": "comm", "arm": plan.name, "round": self.round, "step": self.steps_completed,
                "collective": first.collective, "payload": first.payload, "participants": participants,
                "message_bytes": nbytes, "bytes_sent": list(cost.bytes_sent),
                "bytes_received": list(cost.bytes_received), "comm_s": cost.time_s,
                "idle_s": list(sync.idle_s), "time_s": sync.end_s, "staleness": 0,
            }
        )
        self.round += 1
        return result.tensor.numpy()

    def evaluate(self, step: int) -> None:
        params = self.runtime.call("params")
        # An observer's measurement of the replicas' consensus, free of charge: identical replicas
        # are evaluated as they are, diverged ones (between DiLoCo syncs) at their exact mean.
        consensus = params[0] if all(np.array_equal(params[0], p) for p in params[1:]) else average(params)
        loss = self.runtime.call("evaluate", [(consensus,)], workers=[0])[0]
        self.emit(
            {
                "kind": "eval", "arm": self.plan.name, "step": step,
                "tokens": step * self.plan.tokens_per_step, "time_s": self.clock.elapsed_s, "loss": loss,
            }
        )
