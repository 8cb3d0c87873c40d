"""Train once, re-time many: a lockstep arm's trace replayed under other networks and devices, without training.

For a strategy whose maths does not depend on time (`Strategy.retimable`: every lockstep strategy), the network and the
devices change only the clock: the same replicas make the same requests at the same steps with the same tensors, so the
losses, parameter spreads and message sizes are those of any other network. `record` runs an arm once, as the simulator
always does, and keeps its trace: per worker, every step's FLOPs and every request (payload, collective, group, message
bytes, weight, blocking, sparse, the tensor's size: not its values), and every evaluation's loss and spread.
`retime` feeds that trace to the same `LockstepDriver` and `ModelledExchanges` under another plan (network, devices,
speed factors), which then book exactly the durations, idle times and bytes a full run would: the records come out
equal, field for field, to a full run's (tests/cluster/test_retime.py checks it over networks with jitter).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from cluster.driver import ArmPlan, LockstepDriver
from cluster.records import EvalRecord, Record
from cluster.sim import ModelledExchanges
from trainer.replica import ExchangeRequest


@dataclass(frozen=True)
class TensorShape:
    """Stands for a request's tensor in a trace: the cost model needs its size, never its values."""

    size: int
    finite: bool = True  # whether the reducers accepted it (a non-finite contribution is refused)


@dataclass
class Trace:
    """What a lockstep arm did, as far as time is concerned; the same for every network and device."""

    plan: ArmPlan  # the plan it was recorded under
    advances: list[list[list]] = field(default_factory=list)  # per driver `advance` call: each worker's events
    evals: list[EvalRecord] = field(default_factory=list)


class _RecordingWorkers:
    """Passes calls through to the workers and keeps, of each `advance`, the events without their tensors."""

    def __init__(self, workers, trace: Trace):
        self.workers, self.trace = workers, trace

    def call(self, method: str, args=None, workers=None, timeout_s=None) -> list:
        out = self.workers.call(method, args, workers, timeout_s)
        if method == "advance":
            self.trace.advances.append([[_strip(e) for e in events] for events in out])
        return out


class _ReplayedWorkers:
    """Answers the driver's `advance` calls from a trace, in order, whatever the replies (they are averages)."""

    def __init__(self, trace: Trace):
        self.advances = iter(trace.advances)

    def call(self, method: str, args=None, workers=None, timeout_s=None) -> list:
        assert method == "advance", f"a re-timed run asked its workers for {method!r}"
        return next(self.advances)


class _ReplayDriver(LockstepDriver):
    """The lockstep driver, with the evaluations taken from the trace and stamped with this run's clock."""

    def __init__(self, *args, trace: Trace, **kwargs):
        super().__init__(*args, **kwargs)
        self.evals = iter(trace.evals)

    def evaluate(self, step: int) -> None:
        recorded = next(self.evals)
        assert recorded.step == step, f"the trace evaluated at step {recorded.step}, this run at {step}"
        self.emit(dataclasses.replace(recorded, arm=self.plan.name, time_s=self.exchanges.now_s))


def _strip(event):
    if isinstance(event, ExchangeRequest):
        tensor = event.tensor
        return dataclasses.replace(event, tensor=TensorShape(int(tensor.size), bool(np.isfinite(tensor).all())))
    return event


def record(workers, plan: ArmPlan, emit: Callable[[Record], None], on_step: Callable[[], None] = lambda: None) -> Trace:
    """Run a lockstep arm in the simulator as usual, emitting its records, and return its trace."""
    trace = Trace(plan)

    def keep(record: Record) -> None:
        if isinstance(record, EvalRecord):
            trace.evals.append(record)
        emit(record)

    LockstepDriver(_RecordingWorkers(workers, trace), plan, ModelledExchanges(plan), keep, on_step).run()
    return trace


def retime(trace: Trace, plan: ArmPlan, emit: Callable[[Record], None],
           on_step: Callable[[], None] = lambda: None) -> None:
    """Emit the records of the traced arm under `plan`'s network, devices and speed factors, without training."""
    recorded = trace.plan
    same = ("n_workers", "codec", "total_steps", "tokens_per_step", "eval_every_steps", "seed", "client_mode")
    differ = [name for name in same if getattr(plan, name) != getattr(recorded, name)]
    assert not differ, f"a trace re-times only under another network or devices; these differ: {differ}"
    exchanges = ModelledExchanges(plan, exact=False)
    _ReplayDriver(_ReplayedWorkers(trace), plan, exchanges, emit, on_step, trace=trace).run()
