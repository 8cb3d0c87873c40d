"""The real mode on a Ray cluster: three Ray nodes (`ray.cluster_utils.Cluster`, all on this machine, one CPU each),
one peer per node. The nodes share this machine's loopback, so the peers listen there; on machines at RAY_ADDRESS
they listen on their node's address (`host = "auto"`).

40-70 s on a 2-core machine: three raylets start before the peers do.
"""

from __future__ import annotations

import numpy as np
import pytest

from cluster.devices import get_device
from cluster.network import Link, Network
from cluster.real import RealOptions, run_real_arm
from cluster.sim import ArmPlan
from trainer.data import DataConfig
from trainer.model import PRESETS
from trainer.replica import OptimConfig, ReplicaSpec
from trainer.strategies.diloco import DiLoCoSettings

N = 3


def test_real_peers_run_on_different_ray_nodes():
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        for _ in range(N - 1):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, include_dashboard=False, logging_level="ERROR")
        nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert len(nodes) == N

        link = Link(uplink_bps=1e9, downlink_bps=1e9, one_way_latency_s=0.0)
        steps = 12
        plan = ArmPlan(name="diloco-nodes", n_workers=N, network=Network(links=(link,) * N),
                       devices=(get_device("laptop-cpu"),) * N, speed_factors=(1.0,) * N, codec="none",
                       total_steps=steps, tokens_per_step=N * 4 * 32, eval_every_steps=steps, seed=5)
        specs = [ReplicaSpec(worker=w, n_workers=N, seed=5, model=PRESETS["tiny"],
                             data=DataConfig(corpus="synthetic", synthetic_bytes=200_000),
                             optim=OptimConfig(lr=3e-3, warmup_steps=2), batch_size=4, total_steps=steps,
                             algorithm="diloco", settings=DiLoCoSettings(inner_steps=4), eval_batches=2,
                             torch_threads=1) for w in range(N)]
        records: list[dict] = []
        result = run_real_arm(plan, specs, records.append, options=RealOptions(shaping="none"))

        placement = result.swarm.placement
        assert len(placement) == N and set(placement) == nodes  # one peer on each node
        evals = [r for r in records if r["kind"] == "eval"]
        assert evals[-1]["loss"] < evals[0]["loss"]
        assert all(np.allclose(result.final_params[0], p, rtol=1e-5, atol=1e-7) for p in result.final_params[1:])
    finally:
        ray.shutdown()
        cluster.shutdown()
