"""The seam between what a worker computes and how its updates travel.

A strategy is written as a plain training step that `yield`s an `Exchange` whenever it needs its
peers, and receives the combined tensor back from the `yield`. It says *what* is exchanged and
*when*; it never sleeps, opens a socket or reads a clock. The cluster layer decides who takes
part, how long the exchange takes on the modelled (or real) links, and how many bytes it moves.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

import torch

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
    """Report local progress to the swarm (samples accumulated this epoch).

    The reply is True while this peer should keep accumulating and False once the swarm's epoch
    is complete; only the cluster knows, since that depends on every peer's speed and the links.
    """

    samples: int


# A step or a final synchronisation: yields exchanges, receives their averages, returns a loss.
StepGenerator = Generator[Exchange | Await | Report, torch.Tensor | bool | None, Any]


@dataclass(frozen=True)
class Settings:
    """Base of every strategy's settings; subclasses add fields and override `check`."""

    def check(self) -> None:
        """Raise ValueError('field: what is wrong and what is allowed') for a bad value."""

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


class Strategy:
    """Base class: one instance lives inside each worker, next to its replica."""

    name: ClassVar[str]
    Settings: ClassVar[type[Settings]]
    # "lockstep": every worker makes the same requests at the same steps (cluster.sim drives it);
    # "collaborative": peers accumulate at their own speeds until the swarm's epoch is complete.
    schedule: ClassVar[str] = "lockstep"

    def __init__(self, settings: Settings, replica: Replica):
        self.settings = settings
        self.replica = replica

    @classmethod
    def check_arm(cls, settings: Settings, n_workers: int, codec: str) -> None:
        """Raise ValueError('field: ...') if these settings cannot run with this many workers or this codec.

        Called when the experiment file is read, so a bad combination fails before any worker starts.
        """

    def train_step(self, step: int) -> StepGenerator:
        """One optimisation step on this worker; returns the training loss of its batch."""
        raise NotImplementedError

    def finish(self) -> StepGenerator:
        """Exchanges needed after the last step so that every replica ends on the shared model."""
        return
        yield  # pragma: no cover - makes this a generator


def positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")


def number_in(name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (low < value if low_open else low <= value) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name}: must be a number in {bracket}{low}, {high}], got {value!r}")
