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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from trainer.data import Corpus, load_corpus
from trainer.replica import Replica, ReplicaSpec

_LARGE_BYTES = 1 << 16  # arrays at least this large go through the object store once, whoever receives them


@dataclass(frozen=True)
class _Shared:
    """Stands in an argument list for the `index`-th large value passed to the host beside the list."""

    index: int


class ReplicaHost:
    """One actor's replicas, `specs` being a block of workers; `call` runs a method on some of them in turn."""

    def __init__(self, specs: Sequence[ReplicaSpec], corpus: Corpus):
        self.replicas = [Replica(spec, corpus) for spec in specs]

    def call(self, method: str, local: Sequence[int], args: Sequence[tuple], *shared: Any) -> list[Any]:
        results = []
        for i, a in zip(local, args):
            a = tuple(shared[x.index] if isinstance(x, _Shared) else x for x in a)
            results.append(getattr(self.replicas[i], method)(*a))
        return results


def blocks(n_workers: int, n_hosts: int) -> list[range]:
    """Contiguous blocks of workers, one per host, their sizes differing by at most one."""
    assert 1 <= n_hosts <= n_workers
    bounds = [h * n_workers // n_hosts for h in range(n_hosts + 1)]
    return [range(bounds[h], bounds[h + 1]) for h in range(n_hosts)]


class RayReplicaRuntime:
    """The workers' replicas on `actors` Ray actors (default: one per CPU of the cluster, at most one per worker).

    `corpus`, if given, is the specs' corpus already loaded (the runner has it); otherwise it is loaded here, once.
    """

    name = "ray"

    def __init__(self, specs: Sequence[ReplicaSpec], corpus: Corpus | None = None, actors: int | None = None,
                 ready_timeout_s: float | None = None):
        import ray

        from cluster.runtime import start_ray

        assert [s.worker for s in specs] == list(range(len(specs)))
        self._started_ray = start_ray()
        self.hosts: list = []
        try:
            cpus = float(ray.cluster_resources().get("CPU", 1.0))
            n_hosts = min(len(specs), actors or max(1, int(cpus)))
            self.blocks = blocks(len(specs), n_hosts)
            self.placement = [(h, i) for h, block in enumerate(self.blocks) for i in range(len(block))]
            if corpus is None:
                corpus = load_corpus(specs[0].data, specs[0].seed)
            corpus_ref = ray.put(corpus)
            remote_cls = ray.remote(ReplicaHost).options(num_cpus=min(1.0, cpus / n_hosts))
            self.hosts = [remote_cls.remote([specs[w] for w in block], corpus_ref) for block in self.blocks]
            self.call("num_params", timeout_s=ready_timeout_s)  # surface construction errors now
        except BaseException:
            self.close()
            raise

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
        return [answers[h][k] for h, k in order]

    def close(self) -> None:
        import ray

        from cluster.runtime import kill_actors

        kill_actors(self.hosts)
        self.hosts = []
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
            self._started_ray = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
