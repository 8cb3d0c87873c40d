"""The virtual clock: simulated time per worker, advanced by compute and by exchanges, never by sleeping."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Synchronisation:
    start_s: float  # when the slowest participant arrived
    end_s: float
    idle_s: tuple[float, ...]  # per participant: how long it waited for the slowest


class VirtualClock:
    def __init__(self, n_workers: int):
        self.now_s = [0.0] * n_workers
        self.compute_s = [0.0] * n_workers
        self.comm_s = [0.0] * n_workers
        self.idle_s = [0.0] * n_workers

    def compute(self, worker: int, seconds: float) -> float:
        assert seconds >= 0.0
        self.now_s[worker] += seconds
        self.compute_s[worker] += seconds
        return self.now_s[worker]

    def synchronise(self, participants: Sequence[int], duration_s: float, not_before_s: float = 0.0) -> Synchronisation:
        """A blocking exchange: it starts when the last participant arrives (and its links are free)
        and ends for all at once."""
        assert duration_s >= 0.0
        start = max(not_before_s, *(self.now_s[w] for w in participants))
        idle = tuple(start - self.now_s[w] for w in participants)
        end = start + duration_s
        for w, waited in zip(participants, idle):
            self.idle_s[w] += waited
            self.comm_s[w] += duration_s
            self.now_s[w] = end
        return Synchronisation(start, end, idle)

    @property
    def elapsed_s(self) -> float:
        return max(self.now_s)

    def wait_until(self, worker: int, time_s: float) -> float:
        """Idle until `time_s` (the end of an exchange running in the background); returns the wait."""
        waited = max(0.0, time_s - self.now_s[worker])
        self.idle_s[worker] += waited
        self.now_s[worker] += waited
        return waited

    def overlap(self, participants: Sequence[int], duration_s: float) -> None:
        """Book communication that runs in the background, off the workers' critical path."""
        for w in participants:
            self.comm_s[w] += duration_s

    def state_dict(self) -> dict:
        return {"now_s": list(self.now_s), "compute_s": list(self.compute_s), "comm_s": list(self.comm_s),
                "idle_s": list(self.idle_s)}

    def load_state_dict(self, state: dict) -> None:
        assert len(state["now_s"]) == len(self.now_s), "a clock is restored for the workers it was saved with"
        self.now_s, self.compute_s = list(state["now_s"]), list(state["compute_s"])
        self.comm_s, self.idle_s = list(state["comm_s"]), list(state["idle_s"])
