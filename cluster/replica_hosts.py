"""The simulator's Ray runtime: several replicas per actor, about one actor per CPU, the corpus shared by a node.

A Ray actor is a whole process that imports torch: one per worker made start-up grow with N (10 s for 4 workers,
25 s for 8 on 2 cores) and had N processes fight over the cores. Here each actor (`ReplicaHost`) holds a contiguous
block of workers and runs their calls one after another, as the local runtime does in one process; the corpus is
loaded once, in the driver, and put in Ray's object store, from which every actor on a node maps the same pages.

The driver still sees one call per worker (`call(method, per-worker args, workers)`), so the drivers do not know how
replicas are grouped; and the grouping cannot change a number: each replica trains on one thread with its own
stream of torch's generator, and every average is taken in the driver in worker order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from trainer.data import Corpus, load_corpus
from trainer.replica import Replica, ReplicaSpec

_LARGE_BYTES = 1 << 16  # arrays at least this large go through the object store once, whoever receives them
_STORED_BYTES = 100 * 1024  # results this large Ray returns through the object store anyway (its inline limit)


@dataclass(frozen=True)
class _Shared:
    """Stands in an argument list for the `index`-th large value passed to the host beside the list."""

    index: int


@dataclass(frozen=True)
class _Stored:
    """Stands in a host's answer for one replica's result, put in the object store as soon as it was made."""

    ref: Any


def _array_bytes(value: Any) -> int:
    """Bytes of the numpy arrays in a result: an array, or a list or dataclass of them (events, requests)."""
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, (list, tuple)):
        return sum(_array_bytes(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(_array_bytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    return 0


class ReplicaHost:
    """One actor's replicas, `specs` being a block of workers; `call` runs a method on some of them in turn.

    A host outlives its arm: `load` gives it the next arm's replicas, so a process imports torch once per run."""

    def __init__(self):
        self.replicas: list[Replica] = []

    def load(self, specs: Sequence[ReplicaSpec], corpus: Corpus) -> None:
        self.replicas = []  # the previous arm's replicas go before the next arm's are built
        self.replicas = [Replica(spec, corpus) for spec in specs]

    def call(self, method: str, local: Sequence[int], args: Sequence[tuple], *shared: Any) -> list[Any]:
        import ray

        results = []
        for i, a in zip(local, args):
            a = tuple(shared[x.index] if isinstance(x, _Shared) else x for x in a)
            result = getattr(self.replicas[i], method)(*a)
            # A large result (an exchanged tensor) goes to the object store now, so that this process holds one
            # replica's copy at a time rather than its whole block's until the call returns.
            results.append(_Stored(ray.put(result)) if _array_bytes(result) >= _STORED_BYTES else result)
        return results


def blocks(n_workers: int, n_hosts: int) -> list[range]:
    """Contiguous blocks of workers, one per host, their sizes differing by at most one."""
    assert 1 <= n_hosts <= n_workers
    bounds = [h * n_workers // n_hosts for h in range(n_hosts + 1)]
    return [range(bounds[h], bounds[h + 1]) for h in range(n_hosts)]


class HostPool:
    """Idle `ReplicaHost` actors, handed to one arm after another and killed when the pool closes.

    `with HostPool():` makes it the pool every `RayReplicaRuntime` inside draws from (the runner opens one per run
    unless one is open already, e.g. around a sweep or a benchmark); outside any, a runtime has hosts of its own.
    Hosts hold a CPU each in Ray's accounting while they live, so a pool closes with the work it was opened for.
    Arms that run side by side (`cluster.arm_scheduler`) each draw from a `HostSlot` of the pool instead, which
    `HostPool.serving` makes the current pool of the arm's thread.
    """

    _open: list[HostPool] = []
    _thread = threading.local()  # a thread's own pool (an arm's slot), which comes before the open ones

    def __init__(self):
        self.idle: list = []
        self._slots: list[HostSlot] = []

    @classmethod
    def current(cls) -> HostPool | None:
        own = getattr(cls._thread, "pool", None)
        if own is not None:
            return own
        return cls._open[-1] if cls._open else None

    @classmethod
    @contextlib.contextmanager
    def serving(cls, pool: HostPool):
        """Within: the replica runtimes this thread opens draw their hosts from `pool`."""
        before = getattr(cls._thread, "pool", None)
        cls._thread.pool = pool
        try:
            yield pool
        finally:
            cls._thread.pool = before

    def acquire(self, n: int) -> tuple[list, bool]:
        """n hosts, and whether they may serve a later arm."""
        import ray

        cpus = float(ray.cluster_resources().get("CPU", 1.0))
        if n > cpus:
            # More actors than CPUs (asked for explicitly): fractional CPUs, none kept, since idle hosts holding a
            # whole CPU each would leave a later arm's actors waiting for CPUs that never come free.
            self.close()
            remote_cls = ray.remote(ReplicaHost).options(num_cpus=cpus / n)
            return [remote_cls.remote() for _ in range(n)], False
        taken, self.idle = self.idle[:n], self.idle[n:]
        remote_cls = ray.remote(ReplicaHost).options(num_cpus=min(1.0, cpus))
        return taken + [remote_cls.remote() for _ in range(n - len(taken))], True

    def release(self, hosts: list, healthy: bool) -> None:
        """Hosts whose arm ended normally wait for the next; others (an error, Ctrl-C, transient ones) are killed."""
        if healthy:
            self.idle.extend(hosts)
        else:
            _kill(hosts)

    def slots(self, count: int, cpus: int, ready_timeout_s: float = 60.0) -> list[HostSlot]:
        """`count` slots of `cpus` CPUs, each on one node, kept (with their hosts) while the pool lives.

        Slots that the cluster cannot place within `ready_timeout_s` (its CPUs held by something else) are given
        up; at least one is kept, waited for as long as it takes, since a run needs somewhere to train."""
        if [s.cpus for s in self._slots] == [cpus] * count:
            return self._slots
        self.close()  # idle hosts hold CPUs that the slots' placement groups need
        made = [HostSlot(cpus) for _ in range(count)]
        ready = [made[0]] + [s for s in made[1:] if s.wait(ready_timeout_s)]
        for s in made:
            if s not in ready:
                s.close()
        self._slots = ready
        return self._slots

    def close(self) -> None:
        _kill(self.idle)
        self.idle = []
        for slot in self._slots:
            slot.close()
        self._slots = []

    def __enter__(self):
        HostPool._open.append(self)
        return self

    def __exit__(self, *exc):
        HostPool._open.remove(self)
        self.close()


class HostSlot(HostPool):
    """`cpus` CPUs on one node (a STRICT_PACK placement group) and the hosts living in them, one arm at a time's.

    Packing an arm on one node keeps its replicas' calls on one machine; the slots of several arms land where the
    cluster has room, which spreads them over nodes once a node is full."""

    def __init__(self, cpus: int):
        from ray.util.placement_group import placement_group

        super().__init__()
        self.cpus = cpus
        self.group = placement_group([{"CPU": 1.0}] * cpus, strategy="STRICT_PACK")
        self.hosts: list = [None] * cpus
        self._nodes: dict[int, str] = {}

    def wait(self, timeout_s: float) -> bool:
        return self.group.wait(timeout_seconds=timeout_s)

    def acquire(self, n: int) -> tuple[list, bool]:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        assert n <= self.cpus, f"{n} hosts asked of a slot of {self.cpus} CPUs"
        for i in range(n):
            if self.hosts[i] is None:
                strategy = PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=i)
                self.hosts[i] = ray.remote(ReplicaHost).options(num_cpus=1.0, scheduling_strategy=strategy).remote()
                self._nodes.pop(i, None)
        return self.hosts[:n], True

    def release(self, hosts: list, healthy: bool) -> None:
        if not healthy:
            _kill(hosts)
            gone = {id(h) for h in hosts}
            self.hosts = [None if id(h) in gone else h for h in self.hosts]

    def nodes(self) -> list[str]:
        """The Ray node of each live host, as the host itself reports it."""
        import ray

        live = [i for i, h in enumerate(self.hosts) if h is not None]
        missing = [i for i in live if i not in self._nodes]
        found = ray.get([self.hosts[i].__ray_call__.remote(_node_id) for i in missing])
        self._nodes.update(zip(missing, found))
        return [self._nodes[i] for i in live]

    def close(self) -> None:
        from ray.util.placement_group import remove_placement_group

        _kill([h for h in self.hosts if h is not None])
        self.hosts = [None] * self.cpus
        with contextlib.suppress(Exception):  # the cluster is already gone
            remove_placement_group(self.group)


def _node_id(_host) -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _kill(hosts: list) -> None:
    from cluster.runtime import kill_actors

    kill_actors(hosts)


class RayReplicaRuntime:
    """The workers' replicas on `actors` Ray actors (default: one per CPU of the cluster, at most one per worker).

    `corpus`, if given, is the specs' corpus already loaded (the runner has it); otherwise it is loaded here, once.
    The actors come from the open `HostPool`, if any, and go back to it when the runtime closes.
    """

    name = "ray"

    def __init__(self, specs: Sequence[ReplicaSpec], corpus: Corpus | None = None, actors: int | None = None,
                 ready_timeout_s: float | None = None):
        import ray

        from cluster.runtime import start_ray

        assert [s.worker for s in specs] == list(range(len(specs)))
        self._started_ray = start_ray()
        self.hosts: list = []
        self._pool = HostPool.current() if not self._started_ray else None
        self._own_pool = self._pool is None
        self._healthy = self._reusable = False
        try:
            if self._own_pool:
                self._pool = HostPool()
            cpus = float(ray.cluster_resources().get("CPU", 1.0))
            n_hosts = min(len(specs), actors or max(1, int(cpus)))
            self.blocks = blocks(len(specs), n_hosts)
            self.placement = [(h, i) for h, block in enumerate(self.blocks) for i in range(len(block))]
            # New actors start (a process importing torch each) while the corpus is loaded and stored here.
            self.hosts, self._reusable = self._pool.acquire(n_hosts)
            if corpus is None:
                corpus = load_corpus(specs[0].data, specs[0].seed)
            corpus_ref = ray.put(corpus)
            ray.get([h.load.remote([specs[w] for w in block], corpus_ref) for h, block in zip(self.hosts, self.blocks)],
                    timeout=ready_timeout_s)  # surfaces construction errors now
        except BaseException:
            self.close()
            raise
        self._healthy = True

    def call(self, method: str, args: Sequence[tuple] | None = None, workers: Sequence[int] | None = None,
             timeout_s: float | None = None) -> list[Any]:
        import ray

        workers = range(len(self.placement)) if workers is None else workers
        args = args or [()] * len(workers)
        refs: dict[int, Any] = {}  # id of a large value -> its object in the store, put once for every host
        per_host: dict[int, tuple[list[int], list[tuple], list[Any], dict[int, int]]] = {}
        order: list[tuple[int, int]] = []  # for each worker asked, (host, position in that host's answer)
        for w, a in zip(workers, args):
            h, i = self.placement[w]
            local, host_args, shared, seen = per_host.setdefault(h, ([], [], [], {}))
            packed = []
            for value in a:
                if getattr(value, "nbytes", 0) < _LARGE_BYTES:
                    packed.append(value)
                    continue
                if id(value) not in refs:
                    refs[id(value)] = ray.put(value)
                if id(value) not in seen:
                    seen[id(value)] = len(shared)
                    shared.append(refs[id(value)])
                packed.append(_Shared(seen[id(value)]))
            order.append((h, len(local)))
            local.append(i)
            host_args.append(tuple(packed))
        hosts = list(per_host)
        futures = [self.hosts[h].call.remote(method, per_host[h][0], per_host[h][1], *per_host[h][2]) for h in hosts]
        try:
            answers = dict(zip(hosts, ray.get(futures, timeout=timeout_s)))
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"{method} did not return on every worker within {timeout_s:.0f} s") from None
        results = [answers[h][k] for h, k in order]
        stored = [k for k, r in enumerate(results) if isinstance(r, _Stored)]
        for k, value in zip(stored, ray.get([results[k].ref for k in stored])):
            results[k] = value
        return results

    def close(self) -> None:
        import ray

        if self._pool is not None:
            self._pool.release(self.hosts, self._healthy and self._reusable)
            if self._own_pool:
                self._pool.close()
            self._pool = None
        self.hosts = []
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
            self._started_ray = False

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self._healthy = self._healthy and exc_type is None
        self.close()
