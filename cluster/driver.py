"""The lockstep driver, shared by the simulator and the real mode: workers move together from exchange to exchange.

Every worker trains until its strategy asks for an exchange (or awaits one running in the background); then the
exchange is carried out for all of them and they train on. The driver owns what both modes share: the evaluation
schedule, the step records, the consensus evaluation and the closing synchronisation (the strategy's `finish`). It
does not know how an exchange is carried out or how long it takes: that is the `Exchanges` object it is given,

- `cluster.sim.ModelledExchanges`: averaged exactly in this process, timed by the network model on a virtual clock;
- `cluster.real.lockstep.PeerExchanges`: a real hivemind (or gloo) all-reduce among the peers, timed by the wall clock.

The workers are a runtime (`cluster.runtime`): `call(method, per-worker args)` on every worker's replica (or peer).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from cluster.checkpoint import NO_CHECKPOINTS, Checkpoints
from cluster.devices import DeviceProfile
from cluster.hostile import HostileFault
from cluster.network import Network
from cluster.records import CommRecord, EvalRecord, Record, StepRecord
from cluster.swarm_timing import SwarmTiming
from trainer.replica import AwaitRequest, StepDone
from trainer.robust import Aggregation


@dataclass(frozen=True)
class ArmPlan:
    """One arm as the cluster runs it: who the workers are, their links and devices, and the run's schedule."""

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
    swarm: SwarmTiming | None = None  # a swarm arm's matchmaking and timeouts (collaborative)
    aggregation: Aggregation | None = None  # how reducers combine contributions (None: the plain mean)
    hostile: tuple[HostileFault, ...] = ()  # peers that poison what they send (cluster.hostile)

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


def consensus(params: Sequence[np.ndarray]) -> tuple[np.ndarray, float]:
    """The replicas' consensus model and their spread around it.

    An observer's measurement, free of charge: identical replicas are the model as it is, diverged ones (between
    synchronisations) are taken at their exact mean. The spread is the replicas' mean distance to that mean,
    relative to its norm: exactly 0 when they agree."""
    identical = all(np.array_equal(params[0], p) for p in params[1:])
    model = params[0] if identical else average(params)
    if identical:
        return model, 0.0
    norm = float(np.linalg.norm(model)) or 1.0
    return model, float(np.mean([np.linalg.norm(p - model) for p in params])) / norm


def evaluate_consensus(workers, arm: str, step: int, tokens: int, time_s: float,
                       params: Sequence[np.ndarray] | None = None) -> EvalRecord:
    """Held-out loss of the consensus of `params` (every worker's own when None), evaluated on worker 0."""
    params = workers.call("params") if params is None else params
    model, spread = consensus(params)
    loss = workers.call("evaluate", [(model,)], workers=[0])[0]
    return EvalRecord(arm=arm, step=step, tokens=tokens, time_s=time_s, loss=loss, param_spread=spread)


class Exchanges(Protocol):
    """How a lockstep driver's exchanges are carried out, and what they and the workers' compute cost in time."""

    now_s: float  # the arm's clock: when its latest worker is done so far

    def step_done(self, worker: int, event: Any) -> tuple[float, float]:
        """A worker finished a step: its clock after it and the step's compute seconds."""

    def request_made(self, worker: int, request: Any) -> None:
        """A worker computed up to a request (the forward/backward before an exchange)."""

    def exchange(self, requests: list, step: int) -> tuple[list, list[CommRecord]]:
        """Carry out the exchanges requested (one per worker): each worker's reply, and the records of the rounds."""

    def await_exchanges(self, requests: list[AwaitRequest], step: int) -> tuple[list, list[CommRecord]]:
        """Every worker waits for a background exchange: the results, and the records of rounds now complete."""

    def close(self) -> None:
        """The run is over: nothing may still be in flight."""


class LockstepDriver:
    def __init__(self, workers, plan: ArmPlan, exchanges: Exchanges, emit: Callable[[Record], None],
                 on_step: Callable[[], None] = lambda: None, checkpoints: Checkpoints = NO_CHECKPOINTS):
        self.workers, self.plan, self.exchanges, self.emit, self.on_step = workers, plan, exchanges, emit, on_step
        self.checkpoints = checkpoints
        self.steps_completed = 0
        self.last_params: list[np.ndarray] = []  # every worker's parameters at the end of the run

    def run(self) -> None:
        plan, checkpoints = self.plan, self.checkpoints
        evals = eval_points(plan.total_steps, plan.eval_every_steps)
        reached = checkpoints.restore(self)
        if reached == 0:
            self.evaluate(step=0)
        for stop in checkpoints.stops(plan.total_steps, evals, reached):
            self.advance(stop, finish=stop == plan.total_steps)
            if stop in evals:
                self.evaluate(stop)
            if checkpoints.due(stop, plan.total_steps):
                checkpoints.save(self, stop)
        self.exchanges.close()

    def state_dict(self) -> dict:
        """The driver's position and its exchanges' state, at a step boundary (`cluster.checkpoint`)."""
        return {"steps_completed": self.steps_completed, "exchanges": self.exchanges.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.steps_completed = state["steps_completed"]
        self.exchanges.load_state_dict(state["exchanges"])

    def advance(self, until_step: int, finish: bool) -> None:
        replies: list = [None] * self.plan.n_workers
        while True:
            requests = self.account(self.workers.call("advance", [(until_step, r, finish) for r in replies]))
            if requests is None:
                return
            if isinstance(requests[0], AwaitRequest):
                replies, records = self.exchanges.await_exchanges(requests, self.steps_completed)
            else:
                replies, records = self.exchanges.exchange(requests, self.steps_completed)
            # Every worker's message (a model's worth each) goes before the workers make their next ones.
            del requests
            for record in records:
                self.emit(record)

    def account(self, events: list[list]) -> list | None:
        """Record the steps the workers finished; return their requests (one each), or None if they all stopped."""
        exchanges = self.exchanges
        steps = [[e for e in evs if isinstance(e, StepDone)] for evs in events]
        assert len({len(s) for s in steps}) == 1, "workers left lockstep"
        for done in zip(*steps):
            for w, d in enumerate(done):
                self.book_step(w, d)
            self.step_booked()
            self.on_step()
            self.steps_completed = done[0].step + 1
        tails = [evs[-1] if evs and not isinstance(evs[-1], StepDone) else None for evs in events]
        if all(t is None for t in tails):
            return None
        assert all(t is not None for t in tails), "only some workers made a request"
        assert len({type(t) for t in tails}) == 1, "workers made different kinds of request"
        for w, t in enumerate(tails):
            exchanges.request_made(w, t)
        return tails

    def book_step(self, w: int, d: StepDone) -> None:
        """Put worker `w`'s finished step on its clock and record it."""
        plan = self.plan
        time_s, compute_s = self.exchanges.step_done(w, d)
        self.emit(StepRecord(arm=plan.name, worker=w, step=d.step, tokens=(d.step + 1) * plan.tokens_per_step,
                             loss=d.loss, time_s=time_s, compute_s=compute_s))

    def step_booked(self) -> None:
        """Every worker's step of one index is booked (a hook for drivers that record more per step)."""

    def evaluate(self, step: int) -> None:
        # Every worker's parameters, a model's worth each, are held only while evaluated, except the last
        # evaluation's (the end of the run), which the real mode returns.
        self.last_params = []
        params = self.workers.call("params")
        self.emit(evaluate_consensus(self.workers, self.plan.name, step, step * self.plan.tokens_per_step,
                                     self.exchanges.now_s, params))
        if step == self.plan.total_steps:
            self.last_params = params

