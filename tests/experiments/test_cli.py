"""End to end: real (tiny) runs through the CLI and `experiments.run`, and the run folder they leave."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import experiments
from cluster.driver import LockstepDriver
from experiments import cli
from trainer.model import GPT, PRESETS

TINY = Path(__file__).parent / "files" / "tiny.toml"
# tiny.toml: 2 workers x 4 sequences x 32 tokens = 256 tokens a step, 5120 tokens = 20 steps, an eval every 1280
# tokens = 5 steps; arms ddp-datacenter (baseline) and diloco-home (inner_steps 5, fp16).
WORKERS, STEPS, TOKENS_PER_STEP = 2, 20, 256
ARMS = ("ddp-datacenter", "diloco-home")
# Parameters of the tiny model (vocab 256, block 32, 2 layers, 32 wide, no biases, tied embeddings):
# wte 256*32 + wpe 32*32 + 2 x (ln 32 + qkv 32*96 + proj 32*32 + ln 32 + mlp 2*32*128) + ln_f 32.
TINY_PARAMS = 8192 + 1024 + 2 * (32 + 3072 + 1024 + 32 + 8192) + 32
OUTPUTS = ("config.toml", "manifest.json", "metrics.jsonl", "summary.json", "loss_vs_tokens.png", "loss_vs_time.png",
           "bytes.png", "report.html")


def farflung() -> list[str]:
    script = Path(sys.executable).with_name("farflung")
    return [str(script)] if script.exists() else [sys.executable, "-m", "experiments.cli"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run1"
    done = subprocess.run([*farflung(), "run", str(TINY), "--out", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    return done, out


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """tiny.toml run in this process, shared by the comparisons below."""
    return experiments.run(TINY, out=tmp_path_factory.mktemp("local") / "run")


def test_cli_run_leaves_a_complete_folder(cli_run):
    done, out = cli_run
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert Path(done.stdout.strip().splitlines()[-1]) == out.resolve()
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)
    assert not list(out.parent.glob(".*incomplete"))


def test_cli_run_metrics_hold_the_documented_records(cli_run):
    _, out = cli_run
    records = read_jsonl(out / "metrics.jsonl")
    kinds = {kind: [r for r in records if r["kind"] == kind] for kind in ("step", "comm", "eval")}
    assert sum(map(len, kinds.values())) == len(records)

    steps = kinds["step"]
    assert len(steps) == WORKERS * STEPS * len(ARMS)
    for r in steps:
        assert {"arm", "worker", "step", "tokens", "loss", "time_s"} <= r.keys()
        assert r["tokens"] == (r["step"] + 1) * TOKENS_PER_STEP
    for arm in ARMS:
        mine = [(r["worker"], r["step"]) for r in steps if r["arm"] == arm]
        assert sorted(mine) == [(w, s) for w in range(WORKERS) for s in range(STEPS)]

    for r in kinds["comm"]:
        assert {"arm", "round", "bytes_sent", "comm_s", "idle_s"} <= r.keys()
        assert len(r["bytes_sent"]) == len(r["idle_s"]) == WORKERS
        assert r["comm_s"] > 0
    ddp = [r for r in kinds["comm"] if r["arm"] == "ddp-datacenter"]
    diloco = [r for r in kinds["comm"] if r["arm"] == "diloco-home"]
    assert [r["round"] for r in ddp] == list(range(STEPS))  # one all-reduce of gradients a step
    assert [r["step"] for r in ddp] == list(range(STEPS))
    assert [r["round"] for r in diloco] == [0, 1, 2, 3]  # 20 steps / inner_steps 5
    assert [r["step"] for r in diloco] == [4, 9, 14, 19]  # during the 5th, 10th, ... step
    assert {r["payload"] for r in ddp} == {"gradients"} and {r["payload"] for r in diloco} == {"pseudo_gradient"}

    # A ring all-reduce sends 2(N-1)/N of the message per worker: exactly the message for N = 2. The message is
    # hivemind's serialization: 4 bytes a parameter in float32, 2 in fp16, plus a small header.
    assert TINY_PARAMS == sum(p.numel() for p in GPT(PRESETS["tiny"]).parameters())
    for r, width in [(r, 4) for r in ddp] + [(r, 2) for r in diloco]:
        assert r["bytes_sent"] == [r["message_bytes"]] * WORKERS
        assert width * TINY_PARAMS < r["message_bytes"] < width * TINY_PARAMS + 64

    evals = kinds["eval"]
    for r in evals:
        assert {"arm", "tokens", "time_s", "loss"} <= r.keys()
    for arm in ARMS:
        assert [r["tokens"] for r in evals if r["arm"] == arm] == [0, 1280, 2560, 3840, 5120]
        losses = [r["loss"] for r in evals if r["arm"] == arm]
        assert losses[0] == pytest.approx(5.5, abs=0.3)  # ln 256 = 5.55 for an untrained byte model
        assert losses[-1] < losses[0] - 0.5


def test_cli_run_summary_matches_the_metrics(cli_run):
    _, out = cli_run
    records = read_jsonl(out / "metrics.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["baseline"] == "ddp-datacenter" and summary["target_loss"] == 4.5
    assert list(summary["arms"]) == list(ARMS)
    for arm, a in summary["arms"].items():
        assert {"final_loss", "tokens", "time_s", "bytes_sent", "compute_utilisation", "time_to_target_s",
                "loss_ratio", "time_ratio", "bytes_ratio"} <= a.keys()
        evals = [r for r in records if r["kind"] == "eval" and r["arm"] == arm]
        comms = [r for r in records if r["kind"] == "comm" and r["arm"] == arm]
        assert a["final_loss"] == evals[-1]["loss"]
        assert a["tokens"] == STEPS * TOKENS_PER_STEP
        assert a["bytes_sent"] == sum(sum(r["bytes_sent"]) for r in comms)
        assert a["time_s"] == max(r["time_s"] for r in records if r["arm"] == arm)
        reached = next(r for r in evals if r["loss"] <= 4.5)
        assert a["time_to_target_s"] == reached["time_s"]
    ddp, diloco = summary["arms"]["ddp-datacenter"], summary["arms"]["diloco-home"]
    assert (ddp["loss_ratio"], ddp["time_ratio"], ddp["bytes_ratio"]) == (1.0, 1.0, 1.0)
    assert diloco["bytes_ratio"] == pytest.approx(diloco["bytes_sent"] / ddp["bytes_sent"])
    # 4 fp16 rounds against 20 fp32 rounds: a tenth of the bytes, up to the headers.
    assert diloco["bytes_ratio"] == pytest.approx(0.1, rel=1e-3)
    assert diloco["time_ratio"] > 1  # home broadband against a datacenter


def test_cli_run_manifest_says_what_it_was_made_with(cli_run):
    _, out = cli_run
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["mode"] == "sim" and manifest["runtime"] == "local"
    assert manifest["shaping_backend"]
    for package in ("python", "torch", "hivemind", "ray", "numpy"):
        assert manifest["packages"][package]
    assert {"commit", "dirty"} <= manifest["git"].keys()
    sha = manifest["corpus"]["sha256"]
    assert len(sha) == 64 and int(sha, 16) >= 0
    assert manifest["corpus"]["bytes"] == 200_000  # max_bytes
    assert (manifest["steps"], manifest["tokens_per_step"]) == (STEPS, TOKENS_PER_STEP)
    assert set(manifest["wall_s_per_arm"]) == set(ARMS)
    config = (out / "config.toml").read_text()
    assert 'name = "tiny"' in config and "inner_steps = 5" in config


def test_every_step_record_carries_its_compute(local_run):
    records = read_jsonl(local_run.run_dir / "metrics.jsonl")
    per_step = {r["compute_s"] for r in records if r["kind"] == "step"}
    # Same model, batch and device on every worker and step: one figure for all.
    assert len(per_step) == 1 and per_step.pop() > 0


def test_same_file_same_metrics_and_another_seed_differs(local_run, tmp_path):
    again = experiments.run(TINY, out=tmp_path / "again")
    first = (local_run.run_dir / "metrics.jsonl").read_bytes()
    assert (again.run_dir / "metrics.jsonl").read_bytes() == first
    reseeded = experiments.run(TINY, ["run.seed=1"], out=tmp_path / "seed1")
    assert (reseeded.run_dir / "metrics.jsonl").read_bytes() != first
    assert reseeded.summary["seed"] == 1


@pytest.mark.ray
def test_ray_runtime_gives_the_same_metrics_as_local(local_run, tmp_path):
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()
    try:
        result = experiments.run(TINY, out=tmp_path / "ray", runtime="ray")
        assert not ray.is_initialized()  # the runner stops the Ray it started
    finally:
        if ray.is_initialized():
            ray.shutdown()
    assert json.loads((result.run_dir / "manifest.json").read_text())["runtime"] == "ray"
    assert (result.run_dir / "metrics.jsonl").read_bytes() == (local_run.run_dir / "metrics.jsonl").read_bytes()


def test_out_folder_with_files_exits_2_and_is_left_alone(tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    before = os.stat(out / "notes.txt").st_mtime_ns
    assert cli.main(["run", str(TINY), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("farflung: error: --out: ") and len(err.strip().splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me" and os.stat(out / "notes.txt").st_mtime_ns == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_run_that_fails_midway_leaves_no_run_folder(tmp_path, monkeypatch):
    calls = []
    evaluate = LockstepDriver.evaluate

    def fail_after_first(self, step):
        calls.append(step)
        if len(calls) > 1:
            raise RuntimeError("worker lost")
        return evaluate(self, step)

    monkeypatch.setattr(LockstepDriver, "evaluate", fail_after_first)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="worker lost"):
        experiments.run(TINY, out=out)
    assert calls == [0, 5]  # it got as far as the first evaluation after training
    assert not out.exists()
