"""What a run records: one type per record kind, defined here once.

Every producer (the simulator's drivers, the real mode's drivers) builds these types and every reader (summary,
report, fidelity) reads their fields. `to_json` gives the line `metrics.jsonl` holds (the format
`results/README.md` documents): `kind` first, then the fields in the order declared below. A field declared
with `extra()` is written only when set, so the simulator's records carry none of the real mode's fields and a
lockstep arm's records none of a swarm's. `from_json` reads a line back into its type.

A new record kind (faults, membership) is a new dataclass here with a `kind` and an entry in `KINDS`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar


def extra(default: Any = None) -> Any:
    """A field only some producers set: left out of the JSON line while it is None."""
    return dataclasses.field(default=default, metadata={"extra": True})


@dataclass(frozen=True, kw_only=True)
class Record:
    kind: ClassVar[str]
    arm: str

    def to_json(self) -> dict[str, Any]:
        line: dict[str, Any] = {"kind": self.kind}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.metadata.get("extra"):
                continue
            line[f.name] = list(value) if isinstance(value, tuple) else value
        return line


@dataclass(frozen=True, kw_only=True)
class StepRecord(Record):
    """One worker's optimisation step (for a swarm arm: one peer's share of an epoch)."""

    kind: ClassVar[str] = "step"
    worker: int
    step: int  # 0-based
    tokens: int  # trained by all workers after this step
    loss: float | None  # this worker's batch; None for a swarm peer that ran no microbatch
    time_s: float  # the worker's clock after the step
    compute_s: float  # this step's compute time
    optimizer_s: float | None = extra()  # real swarm: Optimizer.step calls that did not close the epoch
    samples: int | None = extra()  # swarm: this peer's samples in the epoch
    late_samples: int | None = extra()  # swarm: a microbatch still running when the round began
    staleness: int | None = extra()  # swarm: 1 when the epoch includes samples computed on older parameters
    straggled_s: float | None = extra()  # real swarm: of compute_s, what a straggler slept (`faults.stragglers`)


@dataclass(frozen=True, kw_only=True)
class CommRecord(Record):
    """One group's exchange (a round: groups exchanging at once share its number)."""

    kind: ClassVar[str] = "comm"
    round: int
    group: int
    step: int  # the step in which it happened; the total step count for the closing synchronisation
    collective: str  # what ran: ring_allreduce, butterfly, allgather, gloo_allreduce
    requested_collective: str | None = extra()  # real mode: what the strategy asked for
    payload: str
    participants: list[int]
    message_bytes: int  # one serialized message
    raw_bytes: int  # the same payload as dense float32
    bytes_sent: list[int]  # per participant
    bytes_received: list[int]
    bytes_unattributed: int | None = extra()  # real mode: relay bytes no peer could be credited with
    comm_s: float
    comm_s_per_worker: list[float] | None = extra()  # real mode
    blocking: bool
    idle_s: list[float]  # per participant: waiting for the slowest, or for a background exchange where awaited
    time_s: float  # when the round ended
    staleness: int  # steps computed while a background exchange travelled
    attempts: int | None = extra()  # real mode: averaging rounds tried
    # real mode, hivemind's averagers: per participant, the least fraction of the vector it received averaged (over a
    # lockstep round's attempts, or a swarm epoch's gradient rounds; None: a swarm peer that ran none), and the
    # workers whose part or contribution went missing (-1: a peer outside the arm, joined from elsewhere)
    received_fraction: list[float | None] | None = extra()
    missing_peers: list[int] | None = extra()
    rejected: list[int] | None = extra()  # sim: senders whose contribution was refused (non-finite, wrong shape/dtype)
    absent: list[int] | None = extra()  # faults: workers the exchange was meant for that were gone or cut off
    measured: bool | None = extra()  # real mode: times and bytes measured, not modelled
    failed: bool | None = extra()  # collaborative: the round exceeded averaging_timeout
    samples: list[int] | None = extra()  # swarm: each peer's samples in the epoch
    epoch_closed_s: float | None = extra()  # collaborative (sim): when the swarm's samples reached the target
    ready_s: float | None = extra()  # ... when every peer had noticed and stopped accumulating
    matchmaking_start_s: float | None = extra()  # ... when the first peer began looking for a group
    round_start_s: float | None = extra()  # ... when the all-reduce began
    swarm_peers: int | None = extra()  # real swarm: most peers the progress tracker saw
    loaded_state: list[int] | None = extra()  # real swarm: peers that downloaded the state instead


@dataclass(frozen=True, kw_only=True)
class EvalRecord(Record):
    """A held-out evaluation of the replicas' consensus model."""

    kind: ClassVar[str] = "eval"
    step: int
    tokens: int
    time_s: float  # the arm's clock
    loss: float  # held-out loss of the consensus: the shared model, or the replicas' exact mean
    param_spread: float  # the replicas' mean distance to their mean, relative to its norm: 0 when they agree


@dataclass(frozen=True, kw_only=True)
class FaultRecord(Record):
    """A change in who takes part (`cluster.churn`, `cluster.swarm_churn`): a peer leaves, returns, loads the state,
    or cancels a round."""

    kind: ClassVar[str] = "fault"
    worker: int
    event: str  # leave | return | join (the state loaded) | cancel
    time_s: float  # the worker's clock when it happened
    step: int  # the step in progress
    cause: str | None = extra()  # leave: event (the written trace), mtbf (the seeded one) or exchange
    phase: str | None = extra()  # leave or cancel during an exchange: before, sending, reducing, cancel
    round: int | None = extra()  # ... the exchange's round
    back_s: float | None = extra()  # leave: when the trace brings it back (simulated seconds)
    back_step: int | None = extra()  # ... or at which step
    lost_s: float | None = extra()  # leave: its compute since its last round, thrown away
    timeout_s: float | None = extra()  # exchange faults: worker-seconds the survivors waited in timeouts
    sources: list[int] | None = extra()  # join: the peers it downloaded the state from
    state_bytes: int | None = extra()  # join: the state's size
    wait_s: float | None = extra()  # join: from its return until the download began
    download_s: float | None = extra()  # join: the download (`collectives.state_download`)


KINDS: dict[str, type[Record]] = {cls.kind: cls for cls in (StepRecord, CommRecord, EvalRecord, FaultRecord)}


def from_json(line: dict[str, Any]) -> Record:
    """The record a `metrics.jsonl` line holds; ValueError naming the kind or fields if it is not one."""
    kind = line.get("kind")
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r}; known: {', '.join(KINDS)}")
    cls = KINDS[kind]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(line) - names - {"kind"})
    if unknown:
        raise ValueError(f"a {kind} record has unknown fields {unknown}")
    try:
        return cls(**{k: v for k, v in line.items() if k != "kind"})
    except TypeError as e:
        raise ValueError(f"a {kind} record is missing fields: {e}") from None


def of_kind(records, cls: type[Record], arm: str | None = None) -> list:
    """The records of one type (and one arm), in order."""
    return [r for r in records if isinstance(r, cls) and (arm is None or r.arm == arm)]
