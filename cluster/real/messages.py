"""What a real peer reports to its driver: a step it took, an exchange it waits on, how an exchange went, and (a
swarm peer, `cluster.real.swarm`) an epoch it closed. Plain frozen dataclasses, as Ray returns them from the actors."""

from __future__ import annotations

from dataclasses import dataclass

from trainer.replica import StepDone


@dataclass(frozen=True)
class MeasuredStep(StepDone):
    """A step as a real peer reports it: its FLOPs, and the wall time it took."""

    compute_s: float  # wall seconds this peer computed for the step (its exchange excluded)
    time_s: float  # this peer's arm clock after the step
    straggled_s: float = 0.0  # of compute_s, what a straggler slept (`cluster.real.lockstep_peer`)


@dataclass(frozen=True)
class PendingExchange:
    """What a driver needs to know about an exchange a peer is waiting on; the tensor stays with the peer."""

    payload: str
    collective: str
    group: tuple[int, ...] | None
    nbytes: int
    raw_nbytes: int
    weight: float
    numel: int


@dataclass(frozen=True)
class ExchangeOutcome:
    ok: bool
    error: str  # "" when ok
    group_size: int
    comm_s: float  # from this peer's first attempt at this exchange to the end of this attempt
    idle_s: float  # from reaching the exchange to starting it (waiting for the slowest peer to get there too)
    end_s: float  # this peer's arm clock at the end of this attempt
    # Counted by the kernel for a gloo all-reduce (cluster.real.gloo); None when the relays count the bytes.
    bytes_sent: int | None = None
    bytes_received: int | None = None
    # hivemind's averager: the fraction of the vector this attempt received averaged, and the workers whose part or
    # contribution went missing (cluster.real.averager.RoundReport); None for gloo or an attempt that found no group.
    received_fraction: float | None = None
    missing_workers: tuple[int, ...] = ()


@dataclass(frozen=True)
class EpochRecord:
    """One peer's view of one epoch it closed."""

    worker: int
    epoch: int  # the epoch that closed
    samples: int  # this peer's samples in it
    loss: float | None  # mean microbatch loss (None if it ran none: it loaded state instead)
    compute_s: float  # forward/backward, plus the Optimizer.step calls that did not close the epoch
    optimizer_s: float  # those Optimizer.step calls alone (accumulating, reporting progress; local AdamW steps)
    step_s: float  # the `Optimizer.step` call that closed the epoch: waiting for the round and averaging
    time_s: float  # this peer's clock when the epoch closed
    swarm_peers: int  # peers the progress tracker saw in the swarm
    loaded_state: bool  # this peer caught up by downloading the state from its peers instead of averaging
    # The epoch's gradient rounds (cluster.real.averager.SwarmGradientAverager): the least fraction of the vector
    # this peer received averaged (None: it ran none) and the base58 ids of the peers whose part or contribution
    # went missing. hivemind steps on a partial round; the state average repairs it.
    received_fraction: float | None = None
    missing_peers: tuple[str, ...] = ()
    # The base58 ids of the peers in the epoch's last gradient round (empty: it ran none): who averaged together,
    # e.g. one side of a network partition (`cluster.real.partition`).
    group_peers: tuple[str, ...] = ()
    # Faults this peer played (`cluster.real.exchange_faults`): seconds it slept as a straggler (in `compute_s`),
    # and the rounds it cancelled its part of.
    straggled_s: float = 0.0
    cancelled_rounds: tuple[int, ...] = ()
