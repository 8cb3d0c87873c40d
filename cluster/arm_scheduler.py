"""Arms side by side: the independent arms of a run (and the points of a sweep) train at the same time on Ray.

Each arm that trains takes a *slot*: a placement group of CPUs on one node (`HostSlot`), holding that arm's
`ReplicaHost` actors, so an arm's replicas stay together on a node and the arms spread over the cluster's nodes. The
slots' shape (how many, how many CPUs each) comes from the cluster's nodes, the workers per arm and the number of
arms to train (`slot_shape`), so that on a cluster with a CPU per worker per arm a run takes about the time of its
slowest arm. An arm's driver runs in a thread of this process; its replicas' calls release the GIL while they wait.

Nothing here can change a number: a replica computes the same on any actor of any node (one thread, its own stream
of torch's generator), each arm's records are kept apart and written in arm order, and which arm trains a shared
training configuration and which re-times it is decided in arm (and point) order before anything runs (`TraceClaims`).
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass, field

from cluster.replica_hosts import HostPool, HostSlot


def completed(futures) -> Iterator:
    """The futures as they finish, like `concurrent.futures.as_completed`, but waiting in short slices: a signal
    (Ctrl-C) delivered to one of Ray's threads is then handled by the main thread within a slice, not only when the
    next arm ends."""
    pending = set(futures)
    while pending:
        done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
        yield from done


class Cancelled(Exception):
    """Raised in an arm's thread when the run or sweep it belongs to stopped (an error elsewhere, Ctrl-C)."""


def slot_shape(node_cpus: Sequence[int], workers: int, arms: int) -> tuple[int, int]:
    """(slots, CPUs per slot) for `arms` arms of `workers` workers on nodes with `node_cpus` CPUs each.

    A slot lives on one node. With h CPUs per slot the nodes hold k(h) = sum(c // h) slots; the arms then take
    ceil(arms / k) rounds of about ceil(workers / h) replica-steps each, which is what is minimised. On a tie the
    larger slot wins: fewer arms in memory at once, and an arm's own replicas keep the cores busy."""
    best: tuple[float, int, int] | None = None
    for h in range(1, max(1, min(workers, max(node_cpus, default=1))) + 1):
        k = sum(c // h for c in node_cpus)
        if k == 0:
            continue
        k = min(k, max(1, arms))
        cost = math.ceil(max(1, arms) / k) * math.ceil(workers / h)
        if best is None or cost < best[0] or (cost == best[0] and h > best[2]):
            best = (cost, k, h)
    return (best[1], best[2]) if best else (1, 1)


def node_cpus() -> list[int]:
    """Whole CPUs of each live node of the Ray cluster this process is connected to."""
    import ray

    return [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) >= 1]


@dataclass
class _Claim:
    owner: tuple
    done: threading.Event = field(default_factory=threading.Event)
    failed: bool = False


class TraceClaims:
    """Which arm trains each training configuration of a sweep's (or run's) `traces`: the first to claim it.

    Claims are made in arm order, point by point, before any arm starts, so the same arms train and the same arms
    are re-timed as when everything runs one after another; an arm re-timed from a trace still being recorded waits
    for it."""

    def __init__(self, cancelled: threading.Event):
        self._claims: dict[tuple[int, str], _Claim] = {}
        self._lock = threading.Lock()
        self._cancelled = cancelled

    def claim(self, traces: dict, key: str, owner: tuple) -> _Claim | None:
        """The claim on `key` (made now by `owner` if nobody has one and no trace exists), or None: re-time now."""
        with self._lock:
            found = self._claims.get((id(traces), key))
            if found is None and key not in traces:
                found = self._claims[(id(traces), key)] = _Claim(owner)
            return found

    def wait(self, claim: _Claim) -> None:
        while not claim.done.wait(0.2):
            if self._cancelled.is_set():
                raise Cancelled("stopped while waiting for a trace")
        if claim.failed:
            raise Cancelled(f"the arm that trains this configuration ({claim.owner[1]}) did not finish")

    @staticmethod
    def settle(claim: _Claim, ok: bool) -> None:
        claim.failed = not ok
        claim.done.set()


class ArmScheduler:
    """Slots for the arms that train, handed out first come first served, and a stop signal for their threads.

    `with ArmScheduler(pool, slots, cpus_per_slot):` makes it the scheduler runs inside use (a sweep opens one for
    all its points); the runner opens one per run otherwise. If the cluster cannot give a slot (its CPUs are taken
    by something else), the scheduler has as many as it got, at least one."""

    _open: list[ArmScheduler] = []

    def __init__(self, pool: HostPool, slots: int, cpus_per_slot: int, ready_timeout_s: float = 60.0):
        self.slots = pool.slots(slots, cpus_per_slot, ready_timeout_s)
        self._free: queue.Queue[HostSlot] = queue.Queue()
        for slot in self.slots:
            self._free.put(slot)
        self.cancelled = threading.Event()
        self.claims = TraceClaims(self.cancelled)

    @classmethod
    def current(cls) -> ArmScheduler | None:
        return cls._open[-1] if cls._open else None

    @classmethod
    def for_cluster(cls, pool: HostPool, workers: int, arms: int) -> ArmScheduler:
        slots, cpus = slot_shape(node_cpus(), workers, arms)
        return cls(pool, slots, cpus)

    @property
    def concurrency(self) -> int:
        return len(self.slots)

    @contextlib.contextmanager
    def slot(self, placement: dict | None = None) -> Iterator[HostSlot]:
        """A free slot, made the pool of this thread's replica runtimes while the arm trains on it.

        `placement`, if given, receives where and when the arm ran: the nodes of its hosts and wall-clock times."""
        while True:
            self.check()
            try:
                slot = self._free.get(timeout=0.2)
                break
            except queue.Empty:
                continue
        try:
            with HostPool.serving(slot):
                if placement is not None:
                    placement["start_unix_s"] = round(time.time(), 3)
                yield slot
                if placement is not None:
                    placement["end_unix_s"] = round(time.time(), 3)
                    placement["nodes"] = slot.nodes()
        finally:
            self._free.put(slot)

    def check(self) -> None:
        """Raise `Cancelled` in an arm's thread once the work it belongs to has stopped."""
        if self.cancelled.is_set():
            raise Cancelled("stopped")

    def cancel(self) -> None:
        self.cancelled.set()

    def __enter__(self):
        ArmScheduler._open.append(self)
        return self

    def __exit__(self, *exc):
        ArmScheduler._open.remove(self)
        self.cancel()
