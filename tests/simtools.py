"""Helpers shared by the tests: a small in-process simulation of one arm."""

from __future__ import annotations

from dataclasses import dataclass

from cluster.devices import get_device
from cluster.network import build_network
from cluster.collaborative import CollaborativeDriver
from cluster.driver import ArmPlan, LockstepDriver
from cluster.records import KINDS, Record
from cluster.runtime import LocalRuntime
from cluster.sim import ModelledExchanges
from trainer.data import DataConfig
from trainer.model import PRESETS
from trainer.replica import OptimConfig, ReplicaSpec
from trainer.strategies import STRATEGIES

TINY = PRESETS["tiny"]
TINY_DATA = DataConfig(corpus="stdlib", max_bytes=200_000)
TINY_OPTIM = OptimConfig(lr=3e-3, warmup_steps=3)
SEED = 7


@dataclass
class Simulated:
    runtime: LocalRuntime
    records: list[Record]
    plan: ArmPlan

    def of(self, kind: str) -> list:
        return [r for r in self.records if isinstance(r, KINDS[kind])]


def simulate(
    n: int, batch_size: int, steps: int, algorithm: str, settings, *, codec: str = "none",
    network="datacenter", eval_every: int | None = None, device: str = "laptop-cpu",
    speed_factors: tuple[float, ...] | None = None, client_mode: tuple[bool, ...] = (),
    model=TINY, optim=TINY_OPTIM, swarm=None, make_runtime=LocalRuntime, aggregation=None, hostile=(),
) -> Simulated:
    """Run one arm of `n` tiny replicas (in this process, unless `make_runtime` says otherwise) and its records."""
    specs = [
        ReplicaSpec(w, n, SEED, model, TINY_DATA, optim, batch_size, steps, algorithm, settings, codec, eval_batches=2)
        for w in range(n)
    ]
    plan = ArmPlan(
        name="arm", n_workers=n, network=network if not isinstance(network, (str, dict)) else build_network(network, n),
        devices=(get_device(device),) * n, speed_factors=speed_factors or (1.0,) * n, codec=codec,
        total_steps=steps, tokens_per_step=n * batch_size * model.block_size,
        eval_every_steps=eval_every or steps, seed=SEED, client_mode=client_mode, swarm=swarm,
        aggregation=aggregation, hostile=tuple(hostile),
    )
    runtime = make_runtime(specs)
    records: list[Record] = []
    if STRATEGIES[algorithm].schedule == "collaborative":
        CollaborativeDriver(runtime, plan, records.append).run()
    else:
        LockstepDriver(runtime, plan, ModelledExchanges(plan), records.append).run()
    return Simulated(runtime, records, plan)
