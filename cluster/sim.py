"""The simulator's exchanges: carried out exactly in this process, timed by the network model on a virtual clock.

Exchanges are carried out exactly (decoded tensors are averaged in worker order, so a run is bit-for-bit repeatable)
while their duration and bytes come from the network model (`cluster.collectives`). `cluster.driver.LockstepDriver`
moves the workers from one request to the next; `ModelledExchanges` answers the requests. A blocking exchange waits
for the slowest member of its group; a non-blocking one runs in the background from when its last member starts it
(and the members' links are free) and is waited for only where the strategy awaits it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from cluster import collectives
from cluster.clock import VirtualClock
from cluster.collectives import CollectiveCost, allgather, butterfly_allreduce, butterfly_average, ring_allreduce
from cluster.driver import ArmPlan, average
from cluster.hostile import HostileSenders, screen
from cluster.records import CommRecord
from trainer.compression import transmit
from trainer.robust import aggregate
from trainer.replica import AwaitRequest, ExchangeRequest, StepDone


@dataclass(frozen=True)
class Reduced:
    """One group's exchange carried out: what every member receives, what it cost, and what the record says of it."""

    result: np.ndarray | None  # None when only timed (`exact=False`)
    cost: CollectiveCost
    collective: str
    group: tuple[int, ...]
    index: int  # the group's number within its round
    payload: str
    message_bytes: int
    raw_bytes: int
    blocking: bool
    rejected: tuple[int, ...] = ()  # members whose contribution the reducers refused

    def record(self, arm: str, round_: int, step: int, *, idle_s: list[float], time_s: float, staleness: int,
               **extra) -> CommRecord:
        return CommRecord(
            arm=arm, round=round_, group=self.index, step=step, collective=self.collective, payload=self.payload,
            participants=list(self.group), message_bytes=self.message_bytes, raw_bytes=self.raw_bytes,
            bytes_sent=list(self.cost.bytes_sent), bytes_received=list(self.cost.bytes_received),
            comm_s=self.cost.time_s, blocking=self.blocking, idle_s=idle_s, time_s=time_s, staleness=staleness,
            rejected=list(self.rejected) or None, **extra,
        )


@dataclass
class _InFlight:
    """A non-blocking exchange between its start and the members' awaits."""

    reduced: Reduced
    round: int
    step: int  # when it started
    end_s: float
    waits: dict[int, float]


class ModelledExchanges:
    """The simulator's side of `cluster.driver.Exchanges`: a virtual clock per worker and the network model."""

    def __init__(self, plan: ArmPlan, exact: bool = True):
        """`exact=False` books time and bytes only: the requests carry their tensors' sizes, not their values, and
        every reply is None (`cluster.retime` re-timing a recorded trace)."""
        self.plan, self.exact = plan, exact
        self.clock = VirtualClock(plan.n_workers)
        self.round = 0
        self.step_compute_s = [0.0] * plan.n_workers  # compute of the step in progress, per worker
        self.link_free_s = [0.0] * plan.n_workers  # a worker's link carries one exchange at a time
        self.in_flight: dict[tuple[str, int], _InFlight] = {}
        self.jitter_rng = np.random.default_rng([plan.seed, 0x7177])
        self.hostile = HostileSenders(plan.hostile, plan.seed)

    @property
    def now_s(self) -> float:
        return self.clock.elapsed_s

    def compute_seconds(self, worker: int, flops: float) -> float:
        return flops / self.plan.flops_per_second(worker)

    def step_done(self, worker: int, event: StepDone) -> tuple[float, float]:
        # A step that paused for an exchange was charged its forward/backward before it.
        compute_s = self.compute_seconds(worker, event.flops)
        time_s = self.clock.compute(worker, compute_s)
        compute_s, self.step_compute_s[worker] = compute_s + self.step_compute_s[worker], 0.0
        return time_s, compute_s

    def request_made(self, worker: int, request) -> None:
        compute_s = self.compute_seconds(worker, request.flops)
        self.clock.compute(worker, compute_s)
        self.step_compute_s[worker] += compute_s

    def exchange(self, requests: list[ExchangeRequest], step: int) -> tuple[list, list[CommRecord]]:
        replies: list = [None] * self.plan.n_workers
        records: list[CommRecord] = []
        groups: dict[tuple[int, ...], list[int]] = {}
        for w, r in enumerate(requests):
            group = tuple(range(self.plan.n_workers)) if r.group is None else tuple(sorted(r.group))
            assert w in group, f"worker {w} asked for an exchange in a group without it: {group}"
            groups.setdefault(group, []).append(w)
        for index, (group, members) in enumerate(sorted(groups.items())):
            assert list(group) == members, f"group {group} was asked for by workers {members}"
            reduced = self.reduce(group, [requests[w] for w in group], index, step)
            duration = reduced.cost.time_s
            if reduced.blocking:
                not_before = max(self.link_free_s[w] for w in group)
                sync = self.clock.synchronise(group, duration, not_before)
                records.append(reduced.record(self.plan.name, self.round, step, idle_s=list(sync.idle_s),
                                              time_s=sync.end_s, staleness=0))
                for w in group:
                    replies[w] = reduced.result
                    self.link_free_s[w] = sync.end_s
            else:
                start = max(max(self.clock.now_s[w] for w in group), *(self.link_free_s[w] for w in group))
                end = start + duration
                self.clock.overlap(group, duration)
                flight = _InFlight(reduced, self.round, step, end, {})
                for w in group:
                    self.link_free_s[w] = end
                    key = (reduced.payload, w)
                    assert key not in self.in_flight, f"{key[0]!r} started again before it was awaited"
                    self.in_flight[key] = flight
        self.round += 1  # groups exchanging at the same time are one round
        return replies, records

    def await_exchanges(self, requests: list[AwaitRequest], step: int) -> tuple[list, list[CommRecord]]:
        replies: list = []
        records: list[CommRecord] = []
        for w, r in enumerate(requests):
            flight = self.in_flight.pop((r.payload, w), None)
            assert flight is not None, f"worker {w} awaits {r.payload!r}, which it never started"
            flight.waits[w] = self.clock.wait_until(w, flight.end_s)
            replies.append(flight.reduced.result)
            group = flight.reduced.group
            if len(flight.waits) == len(group):
                records.append(flight.reduced.record(
                    self.plan.name, flight.round, flight.step, idle_s=[flight.waits[p] for p in group],
                    time_s=flight.end_s, staleness=step - flight.step))
        return replies, records

    def close(self) -> None:
        assert not self.in_flight, f"exchanges never awaited: {sorted(self.in_flight)}"

    def state_dict(self) -> dict:
        """Everything that books the rest of the arm's time: clocks, busy links, the round counter, the jitter
        stream, the exchanges in flight (their averages included) and what hostile peers replay later. Plain
        values and tensors only, so a checkpoint loads with `torch.load(weights_only=True)`."""
        assert self.exact, "only an arm that trains is checkpointed; a re-timed one is replayed whole"
        flights = list({id(f): f for f in self.in_flight.values()}.values())  # one per group, shared by its members
        index = {id(f): i for i, f in enumerate(flights)}
        return {
            "clock": self.clock.state_dict(), "round": self.round, "step_compute_s": list(self.step_compute_s),
            "link_free_s": list(self.link_free_s), "jitter_rng": self.jitter_rng.bit_generator.state,
            "flights": [_flight_state(f) for f in flights],
            "in_flight": [(payload, w, index[id(f)]) for (payload, w), f in self.in_flight.items()],
            "hostile": self.hostile.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.clock.load_state_dict(state["clock"])
        self.round = state["round"]
        self.step_compute_s, self.link_free_s = list(state["step_compute_s"]), list(state["link_free_s"])
        self.jitter_rng.bit_generator.state = state["jitter_rng"]
        flights = [_flight_from(f) for f in state["flights"]]
        self.in_flight = {(payload, w): flights[i] for payload, w, i in state["in_flight"]}
        self.hostile.load_state_dict(state["hostile"])

    def robust_rule(self):
        """The arm's robust aggregation, or None for the plain (weighted) mean."""
        aggregation = self.plan.aggregation
        return aggregation if aggregation is not None and aggregation.robust else None

    def contributions(self, group: tuple[int, ...], requests: list[ExchangeRequest], step: int) -> tuple[list, list, list[int]]:
        """What the members send (hostile ones poisoned, each exactly once a round), their weights, and the indices
        of those the reducers refuse."""
        tensors, weights = [r.tensor for r in requests], [r.weight for r in requests]
        if not self.exact:
            return tensors, weights, [i for i, t in enumerate(tensors) if not t.finite]
        if self.hostile:
            payload = requests[0].payload
            tensors = [self.hostile.sent(w, payload, t, step, self.round) for w, t in zip(group, tensors)]
        return tensors, weights, screen(tensors)

    def reduce(self, group: tuple[int, ...], requests: list[ExchangeRequest], index: int = 0, step: int = 0) -> Reduced:
        """Carry out one group's exchange exactly: what every member receives, and its cost on the links.

        Hostile members' contributions are poisoned as they leave them (`cluster.hostile`); the reducers refuse what
        is malformed or non-finite and combine the rest by the arm's aggregation. A robust rule needs every
        contribution to a part at that part's reducer, which a ring's running sum never gathers: it runs as a
        butterfly (the same bytes per peer as a ring, two latencies instead of 2(N-1)), and with sparse messages on
        the all-gather every peer already holds."""
        plan, first = self.plan, requests[0]
        assert all(
            (r.payload, r.collective, r.blocking, r.sparse) == (first.payload, first.collective, first.blocking, first.sparse)
            for r in requests
        ), f"members of group {group} asked for different exchanges"
        participants = list(group)
        nbytes = max(r.nbytes for r in requests)
        size = first.tensor.size
        rule = self.robust_rule()
        tensors, weights, refused = self.contributions(group, requests, step)
        if refused and len(refused) < len(tensors):
            tensors = [t for i, t in enumerate(tensors) if i not in refused]
            weights = [w for i, w in enumerate(weights) if i not in refused]
        reduced = None
        if first.sparse:
            # Sparse messages cannot be summed on the way: every peer gathers all and averages locally.
            collective = "allgather"
            cost = allgather(plan.network, participants, [r.nbytes for r in requests], rng=self.jitter_rng)
            if self.exact:
                reduced = average(tensors, weights) if rule is None else aggregate(tensors, weights, rule)
        elif first.collective == "butterfly" or rule is not None:
            collective = "butterfly"
            client = [plan.client_mode[w] for w in group] if plan.client_mode else None
            cost = butterfly_allreduce(
                plan.network, participants, nbytes, client_mode=client, rng=self.jitter_rng, vector_size=size
            )
            if self.exact:
                # Element by element, the parts' boundaries (the bandwidths) do not change the average's bits.
                combined = (butterfly_average(tensors, weights, cost.part_sizes) if rule is None
                            else aggregate(tensors, weights, rule, cost.part_sizes))
                reduced = transmit(torch.from_numpy(combined), plan.codec).tensor.numpy()
        else:
            assert first.collective == "ring_allreduce", f"unknown collective {first.collective!r}"
            collective = "ring_allreduce"
            cost = ring_allreduce(plan.network, participants, nbytes, rng=self.jitter_rng)
            if self.exact:
                # The reduced parts travel back through the same codec (the all-gather half of the exchange).
                reduced = transmit(torch.from_numpy(average(tensors, weights)), plan.codec).tensor.numpy()
        return Reduced(reduced, cost, collective, group, index, first.payload, nbytes,
                       max(r.raw_nbytes for r in requests), first.blocking, tuple(group[i] for i in refused))


def _flight_state(flight: _InFlight) -> dict:
    reduced = {f.name: getattr(flight.reduced, f.name) for f in dataclasses.fields(flight.reduced)}
    result = reduced["result"]
    reduced["result"] = None if result is None else torch.from_numpy(np.array(result, dtype=np.float32))
    reduced["cost"] = {"type": type(flight.reduced.cost).__name__, **dataclasses.asdict(flight.reduced.cost)}
    return {"reduced": reduced, "round": flight.round, "step": flight.step, "end_s": flight.end_s,
            "waits": dict(flight.waits)}


def _flight_from(state: dict) -> _InFlight:
    reduced = dict(state["reduced"])
    cost = dict(reduced["cost"])
    reduced["cost"] = getattr(collectives, cost.pop("type"))(**cost)
    reduced["result"] = None if reduced["result"] is None else reduced["result"].numpy()
    return _InFlight(Reduced(**reduced), state["round"], state["step"], state["end_s"], dict(state["waits"]))
