"""The seam between what a worker computes and how its updates travel.

A strategy is written as a plain training step that `yield`s an `Exchange` whenever it needs its
peers, and receives the combined tensor back from the `yield`. It says *what* is exchanged and
*when*; it never sleeps, opens a socket or reads a clock. The cluster layer decides who takes
part, how long the exchange takes on the modelled (or real) links, and how many bytes it moves.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from trainer.settings import check_fields

if TYPE_CHECKING:
    from trainer.replica import Replica


@dataclass
class Exchange:
    """A request to average one flat tensor with the other workers' tensors of the same payload.

    A blocking exchange answers the `yield` with the average. A non-blocking one answers with
    None at once and runs while the worker keeps computing; `yield Await(payload)` later returns
    the average and is where the worker waits if the exchange has not finished yet.
    """

    payload: str  # what the tensor is, in the field's words: "gradients", "pseudo_gradient", ...
    tensor: torch.Tensor  # flat float32
    collective: str = "ring_allreduce"  # or "butterfly" (hivemind's all-reduce)
    # Workers taking part (this worker included); None means every worker of the arm.
    group: tuple[int, ...] | None = None
    weight: float = 1.0  # this worker's share in a weighted average (e.g. samples accumulated)
    blocking: bool = True
    # A strategy that encodes its own message (DeMo's sparse DCT coefficients) states its serialized
    # size here; the arm's codec is then not applied. Sparse messages travel by all-gather.
    nbytes: int | None = None
    sparse: bool = False
    # What the payload would take as dense float32, for the compression ratio (default: 4 bytes an element).
    dense_nbytes: int | None = None


@dataclass
class Await:
    """Wait for the non-blocking exchange of `payload` and receive its average."""

    payload: str


@dataclass
class Report:
    """Report local progress to the swarm (samples accumulated this epoch) and ask whether to compute on.

    The reply is a bool: True to compute one more microbatch, False to stop. Only the cluster knows,
    since that depends on every peer's speed and the links (see the swarm protocol below).
    """

    samples: int


@dataclass(frozen=True)
class EpochAverage:
    """The cluster's answer to a swarm strategy's `Await`: the epoch's averaged tensor, and the samples the swarm
    had averaged into the model before this epoch (hivemind's progress tracker knows them), which place the epoch
    on the learning-rate schedule."""

    tensor: Any  # torch.Tensor for the strategy (the cluster may hand in a float32 numpy array)
    samples_before: int


# The swarm protocol (a strategy with schedule = "collaborative"; `cluster.collaborative` and hivemind.Optimizer
# serve it). Within an epoch a peer's strategy sends, and the cluster answers:
# - `Report(samples)` before its contribution: True to accumulate one more microbatch into this epoch, False once
#   the swarm's epoch is complete;
# - its contribution, a non-blocking `Exchange` (weight = samples accumulated): answered with None at once;
# - `Report(0)` after its contribution: True to compute one microbatch while the round travels (it belongs to the
#   next epoch), False to wait idle;
# - `Await(payload)`: answered with an `EpochAverage` once the round is over (the peer's own tensor if it failed).
# The answers depend only on the message and where the peer is in its epoch, not on the order of the messages.

# A step or a final synchronisation: yields exchanges, receives their averages, returns a loss.
StepGenerator = Generator[Exchange | Await | Report, torch.Tensor | EpochAverage | bool | None, Any]


@dataclass(frozen=True)
class Settings:
    """Base of every strategy's settings: fields declared with `trainer.settings.setting` (type, range, default,
    help); a subclass with rules across fields extends `check`."""

    def check(self) -> None:
        """Raise ValueError('field: what is wrong and what is allowed') for a bad value."""
        check_fields(self)


@dataclass(frozen=True)
class SwarmMapping:
    """How a swarm strategy (real_mode = "swarm") runs as `hivemind.Optimizer`; `cluster.real.swarm` builds the
    optimizer from it, with the arm's matchmaking and timeouts (`cluster.swarm_timing`)."""

    target_batch_size: int  # samples per epoch over the swarm
    use_local_updates: bool
    delay_state_averaging: bool
    average_state_every: int  # epochs between averages of the parameters and optimizer state
    lockstep_steps_per_epoch: float  # places epoch e on the arm's learning-rate schedule


class Strategy:
    """Base class: one instance lives inside each worker, next to its replica."""

    name: ClassVar[str]
    summary: ClassVar[str]  # what is exchanged, when: one line for `farflung algorithms` and the README
    Settings: ClassVar[type[Settings]]
    # "lockstep": every worker makes the same requests at the same steps (cluster.driver drives it);
    # "collaborative": peers accumulate at their own speeds until the swarm's epoch is complete.
    schedule: ClassVar[str] = "lockstep"
    # Whether the strategy's maths is independent of time: then the network and the devices change only the clock,
    # and a recorded run can be re-timed under another network without training (cluster.retime). Every lockstep
    # strategy is; one whose epochs close when the swarm's samples arrive (collaborative) is not.
    retimable: ClassVar[bool] = True
    # How the real mode runs it: "lockstep" (its exchanges are blocking, dense and among all workers: averaged by
    # hivemind's DecentralizedAverager, or gloo), "swarm" (as hivemind.Optimizer, see `swarm_mapping`), or None
    # (simulator only).
    real_mode: ClassVar[str | None] = None
    # Whether the arm's reducers may combine this strategy's exchanges by a robust rule (`trainer.robust`): true for
    # dense averages of equally weighted contributions, which a coordinate-wise median or a clipped mean can replace.
    robust_aggregation: ClassVar[bool] = False

    def __init__(self, settings: Settings, replica: Replica):
        self.settings = settings
        self.replica = replica

    @classmethod
    def check_arm(cls, settings: Settings, n_workers: int, codec: str) -> None:
        """Raise ValueError('field: ...') if these settings cannot run with this many workers or this codec.

        Called when the experiment file is read, so a bad combination fails before any worker starts.
        """

    @classmethod
    def swarm_mapping(cls, settings: Settings, n_workers: int, batch_size: int) -> SwarmMapping:
        """For real_mode = "swarm": the hivemind.Optimizer that runs these settings with this many workers."""
        raise NotImplementedError(f"{cls.name!r} has real_mode {cls.real_mode!r}, not 'swarm'")

    @classmethod
    def replicas_agree_at_end(cls, settings: Settings) -> bool:
        """Whether, with these settings, every replica ends the run on bit-for-bit the same parameters.

        True for an algorithm whose steps keep the replicas equal or whose `finish` synchronises them; an
        algorithm that leaves them where its last exchange did (Moshpit without `final_sync`) says False.
        The contract test (tests/trainer/test_strategy_contract.py) holds every strategy to its answer.
        """
        return True

    def state_dict(self) -> dict:
        """What this strategy carries from one step to the next (shared copies, outer optimizers, exchanges in
        flight, counters), as tensors and plain values; taken between steps, never inside one. The replica's
        model, inner optimizer, sampler and random stream are the replica's own. A strategy with such state
        overrides both methods; the checkpoint test (tests/cluster/test_checkpoint.py) holds every one to a
        resumed run that equals an uninterrupted one."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        assert not state, f"{self.name} keeps no state between steps, but was given {sorted(state)}"

    def state_loaded(self) -> None:
        """This peer has just loaded another peer's state (`trainer.replica_state.import_state`, as hivemind's
        `load_state_from_peers`): drop whatever only the sender had accumulated for itself. Nothing, by default."""

    def train_step(self, step: int) -> StepGenerator:
        """One optimisation step on this worker; returns the training loss of its batch."""
        raise NotImplementedError

    def finish(self) -> StepGenerator:
        """Exchanges needed after the last step so that every replica ends on the shared model."""
        return
        yield  # pragma: no cover - makes this a generator

