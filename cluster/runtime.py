"""Where replicas live: in this process, or on Ray actors (a local Ray or a cluster at RAY_ADDRESS).

Every runtime exposes the same call: run one method on every worker with per-worker arguments and
return the results in worker order. The simulator's Ray runtime puts several replicas on each actor
(about one actor per CPU, `ReplicaHost`); the real mode's peers get one actor each (`RayRuntime`),
since each runs its own sockets and exchanges concurrently with the others. Ray is started only if it
is not already running, and is shut down again by whoever started it, on success, error or Ctrl-C.

A replica's numbers do not depend on where it lives: each trains on one thread (`torch_threads`), with
its own stream of torch's generator, and the driver averages in worker order; so the grouping of
replicas on actors, the core count and the node count change only the speed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from trainer.data import Corpus
from trainer.replica import Replica, ReplicaSpec


class LocalRuntime:
    """All replicas in this process, called one after another. Exact, simple, and what tests use.

    `corpus`, if given, is the specs' corpus already loaded, shared by every replica."""

    name = "local"

    def __init__(self, specs: Sequence[ReplicaSpec], corpus: Corpus | None = None):
        self.replicas = [Replica(spec, corpus) for spec in specs]

    def call(self, method: str, args: Sequence[tuple] | None = None, workers: Sequence[int] | None = None,
             timeout_s: float | None = None) -> list[Any]:
        workers = range(len(self.replicas)) if workers is None else workers
        args = args or [()] * len(workers)
        return [getattr(self.replicas[w], method)(*a) for w, a in zip(workers, args)]

    def close(self) -> None:
        self.replicas = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def start_ray() -> bool:
    """Connect to RAY_ADDRESS or start a local Ray; returns True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = dict(include_dashboard=False, logging_level="ERROR", log_to_driver=True)
    if address:
        import cluster
        import trainer

        # A remote cluster's nodes may not have farflung installed: ship the two packages the actors import.
        kwargs["runtime_env"] = {"py_modules": [trainer, cluster]}
        ray.init(address=address, **kwargs)
    else:
        # A Ray of this run's own: with no address, `ray.init` would attach to any Ray it finds on this machine, one
        # another program runs or a stale one a killed run left in /tmp/ray (a hang), so say "local".
        ray.init(address="local", **kwargs)
    return True


class RayRuntime:
    """One Ray actor per worker, each holding its replica (or, in the real mode, its peer) in its own process.

    `actor_cls` is built as `actor_cls(spec, *extra_args[w])`; `actor_options` go to Ray (the real mode spreads its
    peers over the cluster's nodes). An actor class with a `shutdown` method has it called before its actor is
    killed (a real peer stops its hivemind processes, which `ray.kill` would leave behind); `local_pids`, if the
    caller fills it, are the actor processes on this machine that `close` waits to see gone.
    """

    name = "ray"

    def __init__(self, specs: Sequence[ReplicaSpec], actor_cls: type = Replica, extra_args: Sequence[tuple] = (),
                 ready_timeout_s: float | None = None, **actor_options: Any):
        import ray

        self._started_ray = start_ray()
        self.actors: list = []
        self.local_pids: list[int] = []
        self._shutdown = hasattr(actor_cls, "shutdown")
        try:
            cpus = float(ray.cluster_resources().get("CPU", 1.0))
            # Fractional CPUs let N workers share a small machine; on a big cluster each gets one.
            per_actor = min(1.0, cpus / len(specs))
            remote_cls = self._remote_cls = ray.remote(actor_cls).options(num_cpus=per_actor, **actor_options)
            self._specs = list(specs)
            extra_args = extra_args or [()] * len(specs)
            self.actors = [remote_cls.remote(spec, *extra) for spec, extra in zip(specs, extra_args)]
            self.call("num_params", timeout_s=ready_timeout_s)  # surface construction errors now
        except BaseException:
            self.close()
            raise

    def call(self, method: str, args: Sequence[tuple] | None = None, workers: Sequence[int] | None = None,
             timeout_s: float | None = None) -> list[Any]:
        import ray

        workers = range(len(self.actors)) if workers is None else workers
        args = args or [()] * len(workers)
        # The same large array sent to every worker (an averaged tensor) goes into the object store once.
        refs: dict[int, Any] = {}

        def shared(value: Any) -> Any:
            if getattr(value, "nbytes", 0) < 1 << 16:
                return value
            if id(value) not in refs:
                refs[id(value)] = ray.put(value)
            return refs[id(value)]

        futures = [getattr(self.actors[w], method).remote(*map(shared, a)) for w, a in zip(workers, args)]
        try:
            return ray.get(futures, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"{method} did not return on every worker within {timeout_s:.0f} s") from None

    def kill(self, worker: int, method: str, timeout_s: float = 30.0) -> None:
        """Have the worker's actor end itself by `method` (which does not return: it kills its own process), then
        make sure Ray has let go of it. Its slot keeps the dead handle until `respawn`."""
        import ray

        try:
            ray.get(getattr(self.actors[worker], method).remote(), timeout=timeout_s)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass  # the expected end: the actor died while running the method
        kill_actors([self.actors[worker]])

    def respawn(self, worker: int, extra_args: tuple = (), ready_timeout_s: float | None = None, **kwargs) -> None:
        """A new actor of the same class and options in the worker's slot, built as `actor_cls(spec, *extra_args,
        **kwargs)` (a process of its own, nothing carried over from the one before)."""
        self.actors[worker] = self._remote_cls.remote(self._specs[worker], *extra_args, **kwargs)
        self.call("num_params", workers=[worker], timeout_s=ready_timeout_s)  # surface construction errors now

    def close(self, timeout_s: float = 30.0) -> None:
        import ray

        if self.actors and self._shutdown:
            refs = [a.shutdown.remote() for a in self.actors]
            ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        kill_actors(self.actors)
        self.actors = []
        _wait_for_exit(self.local_pids, timeout_s)
        self.local_pids = []
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
            self._started_ray = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def kill_actors(actors) -> None:
    import ray

    for actor in actors:
        try:
            ray.kill(actor)
        except Exception:  # an actor that already died has nothing left to stop
            pass


from cluster.replica_hosts import RayReplicaRuntime  # noqa: E402  (it builds on RayRuntime and start_ray above)

RUNTIMES = {"local": LocalRuntime, "ray": RayReplicaRuntime}


def _wait_for_exit(pids: list[int], timeout_s: float) -> None:
    """ray.kill returns before the process is gone; wait (bounded) so that a caller sees its processes stopped."""
    if not pids:
        return
    import psutil

    processes = []
    for pid in pids:
        try:
            processes.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=timeout_s)
