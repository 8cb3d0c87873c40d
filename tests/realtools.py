"""Small real-mode arms for tests: tiny model, synthetic data, unshaped loopback links."""

from __future__ import annotations

from cluster.devices import get_device
from cluster.network import Link, Network
from cluster.swarm_timing import SwarmTiming
from cluster.driver import ArmPlan
from trainer.data import DataConfig
from trainer.model import PRESETS
from trainer.replica import OptimConfig, ReplicaSpec

BATCH = 4


def unshaped_arm(name: str, n: int, steps: int, seed: int, algorithm: str, settings,
                 swarm: SwarmTiming | None = None) -> tuple[ArmPlan, list]:
    """An arm of `n` tiny replicas over unshaped links, evaluated at the start and the end: (plan, replica specs)."""
    link = Link(uplink_bps=1e9, downlink_bps=1e9, one_way_latency_s=0.0)
    plan = ArmPlan(name=name, n_workers=n, network=Network(links=(link,) * n),
                   devices=(get_device("laptop-cpu"),) * n, speed_factors=(1.0,) * n, codec="none",
                   total_steps=steps, tokens_per_step=n * BATCH * PRESETS["tiny"].block_size, eval_every_steps=steps,
                   seed=seed, swarm=swarm)
    specs = [ReplicaSpec(worker=w, n_workers=n, seed=seed, model=PRESETS["tiny"],
                         data=DataConfig(corpus="synthetic", synthetic_bytes=200_000),
                         optim=OptimConfig(lr=3e-3, warmup_steps=2), batch_size=BATCH, total_steps=steps,
                         algorithm=algorithm, settings=settings, eval_batches=2, torch_threads=1) for w in range(n)]
    return plan, specs
