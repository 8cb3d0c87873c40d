"""Arms side by side on Ray: slots shaped from the cluster's nodes, arms on different nodes at the same time, and
records equal to a run in this process, bit for bit."""

import json
from pathlib import Path

import pytest

import experiments
import experiments.runner as runner
from cluster.arm_scheduler import slot_shape
from experiments.sweep import sweep

FILES = Path(__file__).resolve().parent / "files"


def test_slots_fit_the_nodes_and_minimise_rounds_of_replica_steps():
    assert slot_shape([1, 1, 1], workers=2, arms=3) == (3, 1)  # an arm per node, all at once
    assert slot_shape([2], workers=4, arms=3) == (1, 2)  # 3 rounds x 2 beats 2 rounds x 4
    assert slot_shape([2], workers=4, arms=4) == (1, 2)  # a tie (8 and 8): the larger slot
    assert slot_shape([8, 8], workers=8, arms=2) == (2, 8)  # an arm per node, a CPU per worker
    assert slot_shape([8, 8], workers=8, arms=5) == (2, 8)  # 3 rounds x 1 beats 2 rounds x 2 (4 slots of 4)
    assert slot_shape([16, 16], workers=8, arms=4) == (4, 8)  # four arms at once, a CPU per worker: one round
    assert slot_shape([4, 4, 4, 4], workers=4, arms=4) == (4, 4)  # an arm per node
    assert slot_shape([4, 2], workers=4, arms=3) == (3, 2)  # two slots on the 4-CPU node, one on the other
    assert slot_shape([16], workers=2, arms=1) == (1, 2)  # never more CPUs than workers
    assert slot_shape([], workers=2, arms=2) == (1, 1)  # a cluster reporting no whole CPU still gets a slot


FOUR_ARMS = """
[[arm]]
name = "ddp-datacenter"
algorithm = "ddp"
network = "datacenter"

[[arm]]
name = "ddp-home"
algorithm = "ddp"
network = "home-broadband"

[[arm]]
name = "diloco-home"
algorithm = { name = "diloco", inner_steps = 5 }
network = "home-broadband"
codec = "fp16"
"""


@pytest.mark.ray
@pytest.mark.ray_cluster
def test_arms_run_at_once_on_different_nodes_and_give_the_local_records(tmp_path):
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    text = (FILES / "tiny.toml").read_text()
    text = text[:text.index("[[arm]]")] + FOUR_ARMS  # three arms, each with two workers
    path = tmp_path / "three.toml"
    path.write_text(text)
    local = experiments.run(path, out=tmp_path / "local", runtime="local")

    assert not ray.is_initialized()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, include_dashboard=False, logging_level="ERROR")
        nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert len(nodes) == 3
        on_ray = experiments.run(path, out=tmp_path / "ray", runtime="ray")
    finally:
        ray.shutdown()
        cluster.shutdown()

    assert (on_ray.run_dir / "metrics.jsonl").read_bytes() == (local.run_dir / "metrics.jsonl").read_bytes()
    assert (on_ray.run_dir / "summary.json").read_bytes() == (local.run_dir / "summary.json").read_bytes()
    manifest = json.loads((on_ray.run_dir / "manifest.json").read_text())
    assert manifest["arms_side_by_side"] == 3
    placement = manifest["arm_placement"]
    assert list(placement) == ["ddp-datacenter", "ddp-home", "diloco-home"]
    # Each arm's host reported its own node: one node per arm, all three nodes used.
    assert all(len(p["nodes"]) == 1 for p in placement.values())
    assert {p["nodes"][0] for p in placement.values()} == nodes
    # They trained at the same time: every arm started before any arm ended.
    assert max(p["start_unix_s"] for p in placement.values()) < min(p["end_unix_s"] for p in placement.values())


SWEEP = """
name = "sweep-side-by-side"
[model]
preset = "tiny"
[data]
corpus = "synthetic"
synthetic_bytes = 200_000
[run]
workers = 2
batch_size = 2
tokens = 4096
eval_batches = 2
runtime = "local"
[[arm]]
name = "ddp"
algorithm = "ddp"
network = "datacenter"
[[arm]]
name = "diloco"
algorithm = { name = "diloco", inner_steps = 4 }
network = "home-broadband"
[sweep]
"arm.diloco.network.bandwidth" = [1e7, 1e8, 1e9]
"""


@pytest.mark.ray
@pytest.mark.ray_cluster
def test_an_interrupted_sweep_on_ray_resumes_to_the_local_sweeps_records(tmp_path, monkeypatch):
    path = tmp_path / "sweep.toml"
    path.write_text(SWEEP)
    local = sweep(path, out=tmp_path / "local", progress=False)
    real_run = runner.run

    def stop_at_point_2(spec, **kwargs):
        if kwargs["out"].name == "0002":
            raise KeyboardInterrupt
        return real_run(spec, **kwargs)

    monkeypatch.setattr(runner, "run", stop_at_point_2)
    with pytest.raises(KeyboardInterrupt):
        sweep(path, out=tmp_path / "ray", progress=False, runtime="ray")
    kept = {p.name: (p / "metrics.jsonl").read_bytes() for p in (tmp_path / "ray" / "points").iterdir()
            if (p / "summary.json").is_file()}
    assert "0002" not in kept
    monkeypatch.setattr(runner, "run", real_run)
    on_ray = sweep(path, resume=tmp_path / "ray", progress=False, runtime="ray")
    for point in ("0000", "0001", "0002"):
        records = (on_ray / "points" / point / "metrics.jsonl").read_bytes()
        assert records == (local / "points" / point / "metrics.jsonl").read_bytes(), point
        assert kept.get(point, records) == records  # a point finished before the interrupt is left as it was
    # Both arms train at point 0 only and are re-timed at the others, as in the local sweep.
    assert (on_ray / "results.jsonl").read_text() == (local / "results.jsonl").read_text().replace("/local/", "/ray/")
    assert [json.loads(line)["retimed"] for line in (on_ray / "results.jsonl").read_text().splitlines()] == \
        [False, False, True, True, True, True]
