"""The real mode on a Ray cluster: three Ray nodes (`ray.cluster_utils.Cluster`, all on this machine, one CPU each),
one peer per node, the run connecting through RAY_ADDRESS as it would to a real cluster. The nodes share this
machine's loopback, so the peers listen there; on machines of a real cluster the runner has them listen on their
node's address (`host = "auto"`).

40-70 s on a 2-core machine: three raylets start before the peers do.
"""

from __future__ import annotations

import numpy as np
import pytest

from realtools import unshaped_arm

from cluster.real import RealOptions, run_real_arm
from trainer.strategies.diloco import DiLoCoSettings

N = 3
pytestmark = [pytest.mark.ray, pytest.mark.hivemind, pytest.mark.ray_cluster]


def test_real_peers_run_on_different_ray_nodes(monkeypatch):
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
        ray.shutdown()
        assert len(nodes) == N
        # As on a real cluster: the run connects through RAY_ADDRESS (shipping farflung's packages to the nodes).
        monkeypatch.setenv("RAY_ADDRESS", cluster.address)

        plan, specs = unshaped_arm("diloco-nodes", N, 12, seed=5, algorithm="diloco",
                                   settings=DiLoCoSettings(inner_steps=4))
        records: list[dict] = []
        result = run_real_arm(plan, specs, records.append, options=RealOptions(shaping="none"))

        placement = result.swarm.placement
        assert len(placement) == N and set(placement) == nodes  # one peer on each node
        evals = [r for r in records if r.kind == "eval"]
        assert evals[-1].loss < evals[0].loss
        assert all(np.allclose(result.final_params[0], p, rtol=1e-5, atol=1e-7) for p in result.final_params[1:])
    finally:
        ray.shutdown()
        cluster.shutdown()
