"""`faults.hostile` and `aggregation` in an experiment file: parsed, inherited, refused where they cannot run."""

import dataclasses
import tomllib
from pathlib import Path

import numpy as np
import pytest
import tomli_w

from cluster.hostile import HostileFault
from cluster.records import CommRecord
from experiments.fields import ConfigError
from experiments.resolved import resolved_config
from experiments.spec import load_spec, parse_spec
from trainer.robust import Aggregation

ROOT = Path(__file__).resolve().parents[2]
FLIP = {"peers": [3], "from_step": 20, "kind": "sign_flip", "scale": -1000.0}


def raw(arms, faults=None, mode="sim"):
    table = {"run": {"workers": 8, "mode": mode}, "arm": arms}
    return table if faults is None else {**table, "faults": faults}


def test_the_poisoned_file_declares_one_hostile_peer_and_each_rule():
    spec = load_spec(ROOT / "experiments" / "poisoned.toml")
    arms = {a.name: a for a in spec.arms}
    assert arms["clean"].hostile == () and arms["clean"].baseline
    flip = HostileFault(kind="sign_flip", peers=(3,), from_step=20, scale=-1000.0)
    assert arms["mean"].hostile == (flip,) and arms["median"].hostile == (flip,)
    assert arms["mean-nan"].hostile == (HostileFault(kind="non_finite", peers=(3,), from_step=20),)
    assert {a.aggregation.aggregation for a in spec.arms} == {"mean", "centered_clip", "median", "trimmed_mean"}
    assert arms["centered-clip"].aggregation == Aggregation("centered_clip", clip_tau=0.1, clip_iters=5)


def test_the_run_faults_apply_to_every_arm_and_the_config_reads_back():
    spec = parse_spec(raw([{"name": "a", "algorithm": {"name": "diloco", "aggregation": "median"}, "network": "mobile"},
                           {"name": "b", "algorithm": "moshpit", "network": "mobile",
                            "faults": {"hostile": [{"peers": [1], "kind": "stale", "stale_rounds": 2}]}}],
                          {"hostile": [FLIP]}))
    assert spec.arms[0].hostile[0].kind == "sign_flip" and spec.arms[1].hostile[0].kind == "stale"
    assert spec.arms[1].aggregation == Aggregation()
    back = parse_spec(tomllib.loads(tomli_w.dumps(resolved_config(spec))))
    assert back.arms == spec.arms


@pytest.mark.parametrize("arms, faults, mode, message", [
    ([{"name": "a", "algorithm": "collaborative", "network": "mobile"}], {"hostile": [FLIP]}, "sim",
     "faults.hostile: hostile peers are modelled for lockstep algorithms only, not 'collaborative'"),
    ([{"name": "a", "algorithm": "ddp", "network": "mobile"}], {"hostile": [FLIP]}, "real",
     "arm.a.faults.hostile: hostile peers and robust aggregation run in the simulator only"),
    ([{"name": "a", "algorithm": {"name": "ddp", "aggregation": "median"}, "network": "mobile"}], None, "real",
     "arm.a.algorithm.aggregation: hostile peers and robust aggregation run in the simulator only"),
    ([{"name": "a", "algorithm": {"name": "demo", "aggregation": "median"}, "network": "mobile"}], None, "sim",
     "arm.a.algorithm.aggregation: unknown key"),
    ([{"name": "a", "algorithm": {"name": "ddp", "trim_fraction": 0.5}, "network": "mobile"}], None, "sim",
     r"arm.a.algorithm.trim_fraction: must be a number in \[0.0, 0.5\)"),
    ([{"name": "a", "algorithm": "ddp", "network": "mobile", "faults": {"hostle": []}}], None, "sim",
     "arm.a.faults.hostle: unknown key"),
    ([{"name": "a", "algorithm": "ddp", "network": "mobile",
       "faults": {"hostile": [{"peers": [9], "kind": "scale"}]}}], None, "sim",
     r"arm.a.faults.hostile\[0\].peers: must be a non-empty list of worker indices in 0..7"),
])
def test_what_cannot_run_is_refused_in_one_line(arms, faults, mode, message):
    with pytest.raises(ConfigError, match=message) as e:
        parse_spec(raw(arms, faults, mode))
    assert "\n" not in str(e.value)


def test_rejected_follows_missing_peers_in_the_line_and_in_results_readme():
    names = [f.name for f in dataclasses.fields(CommRecord)]
    assert names.index("rejected") == names.index("missing_peers") + 1
    readme = (ROOT / "results" / "README.md").read_text()
    assert readme.index("`missing_peers`") < readme.index("`rejected`")


def test_a_hostile_peer_and_churn_run_together_under_a_robust_rule(tmp_path):
    """A NaN-sending peer, a peer that fails before sending and one that leaves and returns, with the median: the
    run counts both kinds of fault, its reducers refuse every poisoned contribution, and the loss still falls."""
    import json

    import experiments

    table = tomllib.loads((ROOT / "tests" / "experiments" / "files" / "tiny.toml").read_text())
    table["run"] |= {"workers": 4, "tokens": 4 * 4 * 32 * 12, "eval_interval": 4 * 4 * 32 * 6}
    del table["run"]["target_loss"]
    table["arm"] = [{"name": "robust-churn", "algorithm": {"name": "ddp", "aggregation": "median"},
                     "network": "home-broadband",
                     "faults": {"hostile": [{"peers": [3], "kind": "non_finite", "from_step": 2}],
                                "events": [{"worker": 2, "leave_step": 4, "return_step": 8}],
                                "exchange": [{"worker": 1, "round": 1, "phase": "before"}]}}]
    path = tmp_path / "robust-churn.toml"
    path.write_text(tomli_w.dumps(table))
    run_dir = experiments.run(path, [], out=tmp_path / "out").run_dir
    summary = json.loads((run_dir / "summary.json").read_text())["arms"]["robust-churn"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    comms = [r for r in records if r["kind"] == "comm"]
    # Peer 3 poisons every round from step 2 on, whoever else is there; peer 1 is gone after round 1 for good.
    poisoned = [c for c in comms if c["step"] >= 2 and 3 in c["participants"]]
    assert poisoned and all(c["rejected"] == [3] for c in poisoned)
    assert summary["rejected_contributions"] == len(poisoned)
    assert summary["faults"]["failures"] == 2 and summary["faults"]["joins"] == 1
    evals = [r["loss"] for r in records if r["kind"] == "eval"]
    assert all(np.isfinite(evals)) and evals[-1] < evals[0] - 0.3, evals
