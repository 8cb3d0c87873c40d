"""The simulator's driver for one arm: real training on the replicas, modelled time on a virtual clock.

Exchanges are carried out exactly (decoded tensors are averaged in worker order, so a run is
bit-for-bit repeatable) while their duration and bytes come from the network model. Workers move
in lockstep from one request to the next. A blocking exchange waits for the slowest member of its
group; a non-blocking one runs in the background from when its last member starts it (and the
members' links are free) and is waited for only where the strategy awaits it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cluster.clock import VirtualClock
from cluster.collectives import allgather, butterfly_allreduce, butterfly_average, ring_allreduce
from cluster.devices import DeviceProfile
from cluster.network import Network
from trainer.compression import transmit
from trainer.replica import AwaitRequest, ExchangeRequest, StepDone


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
    client_mode: tuple[bool, ...] = ()  # per worker: no inbound connections, reduces no butterfly part

    def flops_per_second(self, worker: int) -> float:
        return self.devices[worker].effective_flops * self.speed_factors[worker]


def eval_points(total_steps: int, every: int) -> list[int]:
    """Step counts after which a run pauses to evaluate; the last is the end of the run."""
    return [min(total_steps, s) for s in range(every, total_steps + every, every)]


def average(tensors: Sequence[np.ndarray], weights: Sequence[float] | None = None) -> np.ndarray:
    """The exact (weighted) mean, summed in worker order so that repeated runs agree to the bit."""
    if weights is None or len(set(weights)) == 1:
        total = np.array(tensors[0], dtype=np.float32, copy=True)
        for t in tensors[1:]:
            total += t
        total /= np.float32(len(tensors))
        return total
    total = np.zeros_like(tensors[0], dtype=np.float32)
    for t, w in zip(tensors, weights):
        total += np.float32(w) * t
    total /= np.float32(sum(weights))
    return total


@dataclass
class _InFlight:
    """A non-blocking exchange between its start and the members' awaits."""

    record: dict
    result: np.ndarray
    end_s: float
    started_at_step: int
    waits: dict[int, float]


class ArmSimulation:
    def __init__(self, runtime, plan: ArmPlan, emit: Callable[[dict], None], on_step: Callable[[], None] = lambda: None):
        self.runtime, self.plan, self.emit, self.on_step = runtime, plan, emit, on_step
        self.clock = VirtualClock(plan.n_workers)
        self.round = 0
        self.steps_completed = 0
        self.step_compute_s = [0.0] * plan.n_workers  # compute of the step in progress, per worker
        self.link_free_s = [0.0] * plan.n_workers  # a worker's link carries one exchange at a time
        self.in_flight: dict[tuple[str, int], _InFlight] = {}
        self.jitter_rng = np.random.default_rng([plan.seed, 0x7177])

    def run(self) -> None:
        plan = self.plan
        self.evaluate(step=0)
        for until in eval_points(plan.total_steps, plan.eval_every_steps):
            self.advance(until, finish=until == plan.total_steps)
            self.evaluate(until)
        assert not self.in_flight, f"exchanges never awaited: {sorted(self.in_flight)}"

    def advance(self, until_step: int, finish: bool) -> None:
        replies: list = [None] * self.plan.n_workers
        while True:
            events = self.runtime.call("advance", [(until_step, r, finish) for r in replies])
            requests = self.account_compute(events)
            if requests is None:
                return
            if isinstance(requests[0], AwaitRequest):
                replies = self.await_exchanges(requests)
            else:
                replies = self.exchange(requests)

    def account_compute(self, events: list[list]) -> list | None:
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
        tails = [evs[-1] if evs and not isinstance(evs[-1], StepDone) else None for evs in events]
        if all(t is None for t in tails):
            return None
        assert all(t is not None for t in tails), "only some workers made a request"
        assert len({type(t) for t in tails}) == 1, "workers made different kinds of request"
        for w, t in enumerate(tails):
            compute_s = t.flops / plan.flops_per_second(w)
            self.clock.compute(w, compute_s)
            self.step_compute_s[w] += compute_s
        return tails

    def exchange(self, requests: list[ExchangeRequest]) -> list:
        replies: list = [None] * self.plan.n_workers
        groups: dict[tuple[int, ...], list[int]] = {}
        for w, r in enumerate(requests):
            group = tuple(range(self.plan.n_workers)) if r.group is None else tuple(sorted(r.group))
            assert w in group, f"worker {w} asked for an exchange in a group without it: {group}"
            groups.setdefault(group, []).append(w)
        for index, (group, members) in enumerate(sorted(groups.items())):
            assert list(group) == members, f"group {group} was asked for by workers {members}"
            result, record = self.reduce(group, [requests[w] for w in group], index)
            if requests[group[0]].blocking:
                not_before = max(self.link_free_s[w] for w in group)
                sync = self.clock.synchronise(group, record["comm_s"], not_before)
                self.emit({**record, "idle_s": list(sync.idle_s), "time_s": sync.end_s, "staleness": 0})
                for w in group:
                    replies[w] = result
                    self.link_free_s[w] = sync.end_s
            else:
                start = max(max(self.clock.now_s[w] for w in group), *(self.link_free_s[w] for w in group))
                end = start + record["comm_s"]
                self.clock.overlap(group, record["comm_s"])
                flight = _InFlight(record, result, end, self.steps_completed, {})
                for w in group:
                    self.link_free_s[w] = end
                    key = (record["payload"], w)
                    assert key not in self.in_flight, f"{key[0]!r} started again before it was awaited"
                    self.in_flight[key] = flight
        self.round += 1  # groups exchanging at the same time are one round
        return replies

    def await_exchanges(self, requests: list[AwaitRequest]) -> list:
        replies: list = []
        for w, r in enumerate(requests):
            flight = self.in_flight.pop((r.payload, w), None)
            assert flight is not None, f"worker {w} awaits {r.payload!r}, which it never started"
            flight.waits[w] = self.clock.wait_until(w, flight.end_s)
            replies.append(flight.result)
            participants = flight.record["participants"]
            if len(flight.waits) == len(participants):
                self.emit(
                    {
                        **flight.record, "idle_s": [flight.waits[p] for p in participants], "time_s": flight.end_s,
                        "staleness": self.steps_completed - flight.started_at_step,
                    }
                )
        return replies

    def reduce(self, group: tuple[int, ...], requests: list[ExchangeRequest], index: int = 0) -> tuple[np.ndarray, dict]:
        """Carry out one group's exchange exactly; return the average every member receives and its record."""
        plan, first = self.plan, requests[0]
        assert all(
            (r.payload, r.collective, r.blocking, r.sparse) == (first.payload, first.collective, first.blocking, first.sparse)
            for r in requests
        ), f"members of group {group} asked for different exchanges"
        participants = list(group)
        tensors = [r.tensor for r in requests]
        weights = [r.weight for r in requests]
        nbytes = max(r.nbytes for r in requests)
        if first.sparse:
            # Sparse messages cannot be summed on the way: every peer gathers all and averages locally.
            collective = "allgather"
            cost = allgather(plan.network, participants, [r.nbytes for r in requests], rng=self.jitter_rng)
            reduced = average(tensors, weights)
        elif first.collective == "butterfly":
            collective = "butterfly"
            client = [plan.client_mode[w] for w in group] if plan.client_mode else None
            cost = butterfly_allreduce(
                plan.network, participants, nbytes, client_mode=client, rng=self.jitter_rng, vector_size=tensors[0].size
            )
            reduced = transmit(torch.from_numpy(butterfly_average(tensors, weights, cost.part_sizes)), plan.codec)
            reduced = reduced.tensor.numpy()
        else:
            assert first.collective == "ring_allreduce", f"unknown collective {first.collective!r}"
            collective = "ring_allreduce"
            cost = ring_allreduce(plan.network, participants, nbytes, rng=self.jitter_rng)
            # The reduced parts travel back through the same codec (the all-gather half of the exchange).
            reduced = transmit(torch.from_numpy(average(tensors, weights)), plan.codec).tensor.numpy()
        record = {
            "kind": "comm", "arm": plan.name, "round": self.round, "group": index, "step": self.steps_completed,
            "collective": collective, "payload": first.payload, "participants": participants,
            "message_bytes": nbytes, "raw_bytes": max(r.raw_nbytes for r in requests), "bytes_sent": list(cost.bytes_sent),
            "bytes_received": list(cost.bytes_received), "comm_s": cost.time_s, "blocking": first.blocking,
        }
        return reduced, record

    def evaluate(self, step: int, tokens: int | None = None) -> None:
        params = self.runtime.call("params")
        identical = all(np.array_equal(params[0], p) for p in params[1:])
        # An observer's measurement of the replicas' consensus, free of charge: identical replicas
        # are evaluated as they are, diverged ones (between synchronisations) at their exact mean.
        consensus = params[0] if identical else average(params)
        loss = self.runtime.call("evaluate", [(consensus,)], workers=[0])[0]
        norm = float(np.linalg.norm(consensus)) or 1.0
        spread = 0.0 if identical else float(np.mean([np.linalg.norm(p - consensus) for p in params])) / norm
        self.emit(
            {
                "kind": "eval", "arm": self.plan.name, "step": step,
                "tokens": step * self.plan.tokens_per_step if tokens is None else tokens,
                "time_s": self.clock.elapsed_s, "loss": loss,
                # How far replicas have drifted apart: mean distance to their mean, relative to its norm.
                "param_spread": spread,
            }
        )


def simulation_for(schedule: str) -> type[ArmSimulation]:
    """The driver for a strategy's schedule ("lockstep" or "collaborative")."""
    if schedule == "collaborative":
        from cluster.collaborative import CollaborativeSimulation

        return CollaborativeSimulation
    assert schedule == "lockstep", f"unknown schedule {schedule!r}"
    return ArmSimulation
