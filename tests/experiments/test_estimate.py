"""The estimate against the simulator on the same experiment file; `farflung estimate` from a file and from flags."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

from cluster.estimate import message_nbytes
from experiments import cli
from experiments.estimate import estimate_arm, load_arms
from experiments.runner import run

FILE = Path(__file__).parent / "files" / "estimate-small.toml"
STEPS, H = 16, 4


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    result = run(FILE, out=tmp_path_factory.mktemp("estimate") / "run", runtime="local")
    lines = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    by_arm = defaultdict(lambda: defaultdict(list))
    for line in lines:
        by_arm[line["arm"]][line["kind"]].append(line)
    return result.summary, by_arm


@pytest.mark.parametrize("arm", load_arms(FILE), ids=lambda a: a.name)
def test_estimate_equals_the_simulator_per_step_and_per_exchange(simulated, arm):
    summary, records = simulated
    est = estimate_arm(arm)
    steps = [r for r in records[arm.name]["step"]]
    assert {r["compute_s"] == pytest.approx(est.step_compute_s, rel=1e-12) for r in steps} == {True}
    during = [r for r in records[arm.name]["comm"] if r["step"] < STEPS]  # not the closing synchronisation
    assert during, "the arm never exchanged"
    assert max(r["comm_s"] for r in during) == pytest.approx(est.exchange_s, rel=1e-12)
    assert max(max(r["bytes_sent"]) for r in during) == est.bytes_sent_per_sync
    clock = [r["time_s"] for r in sorted(steps, key=lambda r: r["step"]) if r["worker"] == 0]
    # Steady state: a period of H steps from the second period on (the first fills the streaming link's queue).
    for s in range(2 * H - 1, STEPS - H):
        assert clock[s + H] - clock[s] == pytest.approx(H * est.step_time_s, rel=1e-12), s
    if arm.schedule.algorithm != "streaming-diloco":  # which adds a closing synchronisation of every fragment
        utilisation = summary["arms"][arm.name]["compute_utilisation"]
        assert utilisation == pytest.approx(est.compute_utilisation, rel=1e-12)


def test_streaming_overlap_hides_the_fast_exchange_only():
    arms = {a.name: estimate_arm(a) for a in load_arms(FILE)}
    assert arms["streaming-hidden"].exposed_comm_s == 0.0
    assert arms["streaming-exposed"].exposed_comm_s > 0.0
    assert arms["ddp-fast"].exposed_comm_s == pytest.approx(arms["ddp-fast"].exchange_s, rel=1e-12)  # no overlap


def test_cli_estimates_a_file_as_json(capsys):
    assert cli.main(["estimate", str(FILE), "--json", "--set", "estimate.devices_per_worker=2"]) == 0
    rows = json.loads(capsys.readouterr().out)["arms"]
    assert [r["name"] for r in rows] == [a.name for a in load_arms(FILE)]
    single = {a.name: estimate_arm(a) for a in load_arms(FILE)}["ddp-fast"]
    ddp = rows[0]
    # Two devices per worker: half the compute time each step, plus a reduce over NVLink inside the node.
    assert ddp["devices_per_worker"] == 2 and ddp["intra_node_s"] > 0
    assert ddp["step_compute_s"] == pytest.approx(single.step_compute_s / 2, rel=1e-12)
    assert 0 < ddp["compute_utilisation"] <= 1 and ddp["memory_fits"] is True


FLAGS = ["estimate", "--params", "10e9", "--device", "h100", "--devices-per-worker", "8", "--workers", "14",
         "--bandwidth", "1Gbit", "--latency", "100ms", "--algorithm", "diloco", "--inner-steps", "100", "--codec",
         "uint8", "--batch-tokens", "2000000", "--tokens", "1e12"]


def test_cli_estimates_from_flags(capsys):
    assert cli.main(FLAGS + ["--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["arms"]
    compute = 6 * 10e9 * 2e6 / 14 / (8 * 989e12 * 0.40)  # 6 FLOPs a parameter and token over 8 H100s at 40 % MFU
    assert row["step_compute_s"] == pytest.approx(compute, rel=1e-12)
    assert row["wall_s"] == pytest.approx(500_000 * row["step_time_s"], rel=1e-12)
    assert row["memory_needed_per_device"] == 24 * 10e9 / 8 and row["memory_fits"] is True
    assert row["bytes_sent_total"] == pytest.approx(5000 * row["bytes_sent_per_sync"])


def test_cli_solves_bandwidth_for_every_algorithm(capsys):
    flags = [f for f in FLAGS if f not in ("--algorithm", "diloco")]
    assert cli.main(flags + ["--solve", "bandwidth", "--utilisation", "0.9", "--json"]) == 0
    rows = {r["algorithm"]: r for r in json.loads(capsys.readouterr().out)["arms"]}
    assert set(rows) == {"ddp", "diloco", "streaming-diloco"}
    # Every step's exchange: with 100 ms a side, 26 latency terms of 0.2 s exceed 10 % of a 2.7 s step.
    assert rows["ddp"]["bandwidth_bps"] is None and "unreachable" in rows["ddp"]["note"]
    # DiLoCo by hand: 100 steps of compute c and intra-node reduce i, then one ring all-reduce of the uint8 message.
    c = 6 * 10e9 * 2e6 / 14 / (8 * 989e12 * 0.40)
    i = 2 * 7 / 8 * (2 * 10e9) * 8 / 3.6e12 + 2 * 7 * 1e-6
    allowed = 100 * c / 0.9 - 100 * (c + i)
    bps = 2 * 13 / 14 * message_nbytes(int(10e9), "uint8") * 8 / (allowed - 2 * 13 * 0.2)
    assert rows["diloco"]["bandwidth_bps"] == pytest.approx(bps, rel=1e-9)
    # Four fragments pay the 26 latency terms four times, more than one step of overlap hides.
    assert rows["streaming-diloco"]["bandwidth_bps"] > rows["diloco"]["bandwidth_bps"]


def test_memory_that_does_not_fit_is_said_plainly(capsys):
    flags = FLAGS[:]
    flags[flags.index("h100")] = "rtx4090"
    flags[flags.index("--devices-per-worker") + 1] = "1"
    assert cli.main(flags) == 0
    assert "DOES NOT FIT" in capsys.readouterr().out


@pytest.mark.parametrize("argv, field", [
    (["estimate", "--params", "1e9", "--workers", "0", "--network", "datacenter", "--batch-tokens", "1e6"],
     "--workers"),
    (["estimate", "--params", "1e9", "--workers", "4", "--batch-tokens", "1e6"], "--network"),
    (["estimate", "--params", "1e9", "--workers", "4", "--network", "lan", "--batch-tokens", "1e6"], "--network"),
    (["estimate", "--workers", "4", "--network", "datacenter", "--batch-tokens", "1e6"], "--params"),
    (["estimate", "--params", "1e9", "--workers", "4", "--bandwidth", "1Gbit", "--latency", "far", "--batch-tokens",
      "1e6"], "--latency"),
    (["estimate", "--params", "1e9", "--workers", "4", "--network", "datacenter", "--batch-tokens", "1e6",
      "--inner-steps", "0"], "--inner-steps"),
    (["estimate", "--params", "1e9", "--workers", "4", "--network", "datacenter", "--batch-tokens", "1e6",
      "--memory", "zero"], "--memory"),
    (["estimate", str(FILE), "--set", "arm.ddp-fast.algorithm=moshpit"], "arm.ddp-fast.algorithm"),
    (["estimate", str(FILE), "--set", "arm.ddp-fast.codec=blockwise8"], "arm.ddp-fast.codec"),
    (["estimate", str(FILE), "--set", "estimate.memory=zero"], "estimate.memory"),
])
def test_bad_input_names_the_field_and_exits_2(capsys, argv, field):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"farflung: error: {field}") and err.count("\n") == 1


def test_mode_estimate_runs_the_estimate_and_trains_nothing(tmp_path, capsys):
    path = tmp_path / "est.toml"
    path.write_text(FILE.read_text().replace('runtime = "local"', 'runtime = "local"\nmode = "estimate"'))
    assert cli.main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    assert "ddp-fast: ddp, 3 workers x 1 laptop-cpu" in out and "compute utilisation" in out
    assert not (Path(cli.__file__).parent.parent / "results" / "est").exists()


def test_readme_example_prints_what_the_readme_shows(capsys):
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    block = readme.split("$ farflung estimate --params", 1)[1].split("\n$ ", 1)[0]
    command, _, shown = block.partition("\n    ")[2].partition("\n")
    first = block.partition("\n")[0].rstrip(" \\")
    argv = ["estimate", "--params", *first.split(), *command.split()]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == shown + "\n"
