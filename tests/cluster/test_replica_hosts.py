"""The simulator's Ray runtime: replicas grouped on actors give exactly the numbers they give alone."""

import dataclasses
import functools

import pytest
import torch

from cluster.replica_hosts import HostPool, RayReplicaRuntime, blocks
from cluster.runtime import LocalRuntime
from tests.simtools import TINY, simulate
from trainer.strategies.ddp import DDPSettings
from trainer.strategies.diloco import DiLoCoSettings


def test_blocks_are_contiguous_and_even():
    assert blocks(4, 1) == [range(0, 4)]
    assert blocks(4, 4) == [range(i, i + 1) for i in range(4)]
    assert [len(b) for b in blocks(10, 4)] == [2, 3, 2, 3]
    assert [w for b in blocks(64, 7) for w in b] == list(range(64))


# Dropout draws from torch's global generator: each replica keeps its own stream, so grouping cannot change it.
DROPOUT = dataclasses.replace(TINY, dropout=0.1)


def run(algorithm, settings, make_runtime, steps=6):
    # One thread per replica, as the runner sets it: a thread count is the one thing that may change float sums.
    def one_thread(specs):
        return make_runtime([dataclasses.replace(s, torch_threads=1) for s in specs])

    result = simulate(4, 2, steps, algorithm, settings, model=DROPOUT, eval_every=3, make_runtime=one_thread)
    result.runtime.close()
    return [r.to_json() for r in result.records]


@pytest.mark.ray
def test_assignment_of_replicas_to_actors_does_not_change_metrics():
    ray = pytest.importorskip("ray")
    threads = torch.get_num_threads()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        # One pool for both algorithms, as a run's arms share one: every grouping but the last reuses actors, and
        # the last (4 actors on 2 CPUs: fractional CPUs, never kept) is one actor per worker.
        # Each grouping: (actors, idle hosts in the pool after it).
        groupings = {"diloco": (DiLoCoSettings(inner_steps=2), ((1, 1), (2, 2))),
                     "ddp": (DDPSettings(), ((2, 2), (1, 2), (4, 0)))}
        with HostPool() as pool:
            for algorithm, (settings, actor_counts) in groupings.items():
                local = run(algorithm, settings, LocalRuntime)
                losses = [r["loss"] for r in local if r["kind"] == "step"]
                assert len(set(losses)) > 1  # it trained: equal empty or constant records would prove nothing
                for actors, idle in actor_counts:
                    grouped = run(algorithm, settings, functools.partial(RayReplicaRuntime, actors=actors))
                    assert grouped == local, f"{algorithm} on {actors} actors"
                    assert len(pool.idle) == idle
    finally:
        ray.shutdown()
        torch.set_num_threads(threads)
