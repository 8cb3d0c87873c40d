"""When a simulated arm stops to checkpoint, and the seam through which a driver's state is saved and restored.

A driver checkpoints only at a step boundary, where no worker is inside a step: every strategy generator has returned,
so a replica's whole state is its tensors and counters (`Replica.state_dict`), and the driver's is its position and
its exchanges (`ModelledExchanges.state_dict`: clocks, busy links, rounds in flight, the jitter stream). Stopping at a
boundary changes nothing: the driver only splits one `advance` into two, and the workers make the same steps and
requests in the same order (tests/cluster/test_checkpoint.py holds every strategy to it).

`Checkpoints` is also the null object: with `every = 0` an arm never stops and `restore` starts it at step 0. The
runner's `experiments.checkpoint.ArmCheckpoints` writes the files and reads them back.
"""

from __future__ import annotations

from collections.abc import Sequence


class Checkpoints:
    """An arm's checkpoint schedule (every `every` steps, 0: never) and where its state goes."""

    def __init__(self, every: int = 0):
        assert every >= 0
        self.every = every

    def stops(self, total_steps: int, evals: Sequence[int], reached: int) -> list[int]:
        """The steps after `reached` at which a driver pauses: the evaluations and the checkpoints before the end."""
        saves = range(self.every, total_steps, self.every) if self.every else ()
        return sorted(s for s in {*evals, *saves} if s > reached)

    def due(self, step: int, total_steps: int | None = None) -> bool:
        """Whether to save after `step`; with no `total_steps` (a collaborative arm, whose epochs end with its token
        budget) the caller says it is not the end."""
        end = total_steps is not None and step >= total_steps
        return bool(self.every) and step % self.every == 0 and step > 0 and not end

    def restore(self, driver) -> int:
        """Load the latest checkpoint of this arm into `driver` and its workers; the step it reached (0: none)."""
        return 0

    def save(self, driver, step: int) -> None:
        """Save `driver` and its workers, which are all at the boundary before `step`, its evaluation (if any) done."""


NO_CHECKPOINTS = Checkpoints()
