"""`farflung sweep`: grids from lists and ranges, train once and re-time, results tables, resume."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import experiments.runner as runner
from experiments.fields import ConfigError
from experiments.sweep import grid_of, sweep

REPO = Path(__file__).resolve().parents[2]
FILE = '''
name = "sweep-test"
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
[[arm]]
name = "collab"
algorithm = { name = "collaborative", target_batch_size = 8, progress_refresh_s = 0.0 }
network = "home-broadband"
[sweep]
"arm.diloco.network.bandwidth" = { log = ["10Mbit", "1Gbit", 3] }
"arm.*.network.latency" = ["1ms", "50ms"]
'''


def test_ranges_take_units_and_the_grid_is_their_product():
    keys, points = grid_of({"arm.*.network.bandwidth": {"log": ["10Mbit", "100Gbit", 9]},
                            "arm.*.network.latency": ["1ms", "300ms"], "run.seed": {"linear": [0, 4, 3]}})
    assert keys == ["arm.*.network.bandwidth", "arm.*.network.latency", "run.seed"]
    bandwidths = sorted({p[0] for p in points})
    assert bandwidths == [1e7, 3.16227766017e7, 1e8, 3.16227766017e8, 1e9, 3.16227766017e9, 1e10, 3.16227766017e10,
                          1e11]
    assert len(points) == 9 * 2 * 3 and sorted({p[2] for p in points}) == [0.0, 2.0, 4.0]
    assert points[0] == (1e7, "1ms", 0.0) and points[1] == (1e7, "1ms", 2.0)


def test_zip_pairs_values_and_bad_tables_name_the_key():
    assert grid_of({"zip": True, "a.b": [1, 2], "a.c": ["x", "y"]}) == (["a.b", "a.c"], [(1, "x"), (2, "y")])
    with pytest.raises(ConfigError, match=r"^sweep.zip: zipped keys need as many values each"):
        grid_of({"zip": True, "a.b": [1, 2], "a.c": ["x"]})
    with pytest.raises(ConfigError, match=r"^sweep.arm.\*.network.bandwidth.log: expected a bandwidth"):
        grid_of({"arm.*.network.bandwidth": {"log": ["fast", "1Gbit", 3]}})
    with pytest.raises(ConfigError, match=r"^sweep.run.seed.linear: must be \[low, high, points\]"):
        grid_of({"run.seed": {"linear": [0, 4]}})
    with pytest.raises(ConfigError, match=r"^sweep.run.seed: an empty list"):
        grid_of({"run.seed": []})


def _file(tmp_path, text=FILE) -> Path:
    path = tmp_path / "sweep.toml"
    path.write_text(text)
    return path


def test_a_bad_value_fails_before_anything_runs_naming_the_point(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "run", lambda *a, **k: pytest.fail("a point ran"))
    path = _file(tmp_path, FILE.replace('["1ms", "50ms"]', '["1ms", "-5ms"]'))
    with pytest.raises(ConfigError, match=r"^sweep point 1 \(arm.diloco.network.bandwidth=10000000.0, "
                                          r"arm.\*.network.latency='-5ms'\): arm.ddp.network.latency"):
        sweep(path, out=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_retimed_points_equal_trained_ones_and_resume_finishes_only_what_is_missing(tmp_path, monkeypatch):
    path = _file(tmp_path)
    calls = []
    real_run = runner.run

    def run_until_point_4(spec, **kwargs):
        calls.append(kwargs["out"].name)
        if kwargs["out"].name == "0004":
            raise KeyboardInterrupt
        return real_run(spec, **kwargs)

    monkeypatch.setattr(runner, "run", run_until_point_4)
    with pytest.raises(KeyboardInterrupt):
        sweep(path, out=tmp_path / "out", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert sorted({r["point"] for r in rows}) == [0, 1, 2, 3]  # the finished points are kept
    monkeypatch.setattr(runner, "run", lambda spec, **kwargs: (calls.append(kwargs["out"].name),
                                                               real_run(spec, **kwargs))[1])
    out = sweep(path, resume=tmp_path / "out", progress=False)
    assert calls == ["0000", "0001", "0002", "0003", "0004", "0004", "0005"]  # resume ran only 4 and 5
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["point"], r["arm"]) for r in rows] == [(p, a) for p in range(6) for a in ("ddp", "diloco", "collab")]
    # ddp and diloco train at point 0 only (their training does not depend on the network); collaborative always.
    assert [(r["point"], r["arm"]) for r in rows if not r["retimed"]] == [(0, "ddp"), (0, "diloco")] + [
        (p, "collab") for p in range(6)]
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert header[:5] == ["point", "arm", "algorithm", "arm.diloco.network.bandwidth", "arm.*.network.latency"]
    assert {r["arm.diloco.network.bandwidth"] for r in rows} == {1e7, 1e8, 1e9}
    # A re-timed point's records are a full run's, bit for bit.
    spec_5 = runner.load_spec(path, ["arm.diloco.network.bandwidth=1e9", 'arm.*.network.latency="50ms"'])
    alone = real_run(spec_5, out=tmp_path / "alone")
    assert (alone.run_dir / "metrics.jsonl").read_bytes() == (out / "points" / "0005" / "metrics.jsonl").read_bytes()
    with pytest.raises(ConfigError, match=r"^--resume: .* swept another grid"):
        sweep(path, ["run.seed=3"], resume=out, progress=False)


def test_the_command_line_reports_points_and_exits_2_on_a_bad_key(tmp_path):
    bad = _file(tmp_path, FILE.replace('"arm.*.network.latency"', '"arm.*.network.latncy"'))
    done = subprocess.run([sys.executable, "-m", "experiments.cli", "sweep", str(bad), "--out", str(tmp_path / "o")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "sweep point 0" in done.stderr and "latncy" in done.stderr


@pytest.mark.ray
def test_a_sweep_on_ray_actors_gives_the_local_sweeps_records(tmp_path):
    path = _file(tmp_path, FILE.replace('["1ms", "50ms"]', '["50ms"]').replace('"10Mbit", "1Gbit", 3', '"10Mbit", "1Gbit", 2'))
    local = sweep(path, out=tmp_path / "local", progress=False)
    on_ray = sweep(path, out=tmp_path / "ray", progress=False, runtime="ray")
    for point in ("0000", "0001"):
        assert (local / "points" / point / "metrics.jsonl").read_bytes() == \
            (on_ray / "points" / point / "metrics.jsonl").read_bytes()
    assert [json.loads(line)["retimed"] for line in (on_ray / "results.jsonl").read_text().splitlines()] == \
        [False, False, False, True, True, False]
