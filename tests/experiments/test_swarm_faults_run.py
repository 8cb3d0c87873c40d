"""An experiment file with a collaborative arm with faults, one without, and a hostile peer: what the run writes."""

from __future__ import annotations

import json

from experiments.runner import run
from experiments.spec import parse_spec

STEPS, WORKERS, BATCH, BLOCK = 6, 3, 2, 32
SWARM = {"name": "collaborative", "target_batch_size": 12, "average_state_every": 2, "matchmaking_time": 0.0,
         "target_group_size": WORKERS, "progress_refresh_s": 0.0}
# A microbatch of ~0.5 s: longer than noticing an epoch's end on home links (slow devices, tiny model).
SLOW = [0.0003] * WORKERS


def raw(*arms: dict) -> dict:
    return {"name": "swarm-faults", "model": {"preset": "tiny"}, "data": {"corpus": "stdlib", "max_bytes": 200_000},
            "optim": {"lr": 3e-3, "warmup_steps": 2},
            "run": {"workers": WORKERS, "batch_size": BATCH, "tokens": STEPS * WORKERS * BATCH * BLOCK,
                    "eval_interval": 2 * WORKERS * BATCH * BLOCK, "eval_batches": 2, "runtime": "local"},
            "arm": list(arms)}


COLLAB = {"name": "collab", "algorithm": SWARM, "network": "home-broadband", "speed_factors": SLOW}
CHURN = {**COLLAB, "name": "collab-churn", "faults": {"events": [{"worker": 2, "leave_step": 1, "return_step": 2}]}}
HOSTILE = {"name": "ddp-hostile", "algorithm": "ddp", "network": "home-broadband",
           "faults": {"hostile": [{"peers": [1], "kind": "non_finite", "from_step": 2}]}}


def lines(folder, arm: str) -> list[str]:
    return [line for line in (folder / "metrics.jsonl").read_text().splitlines() if json.loads(line)["arm"] == arm]


def test_a_collaborative_arm_with_faults_is_summarised_and_leaves_the_others_alone(tmp_path):
    result = run(parse_spec(raw(COLLAB, CHURN, HOSTILE)), out=tmp_path / "all")
    arms = result.summary["arms"]
    assert "faults" not in arms["collab"] and "faults" not in arms["ddp-hostile"]
    faults = arms["collab-churn"]["faults"]
    assert (faults["failures"], faults["joins"]) == (1, 1) and faults["rounds_without_someone"] >= 1
    records = [json.loads(line) for line in lines(result.run_dir, "collab-churn")]
    (join,) = [r for r in records if r["kind"] == "fault" and r["event"] == "join"]
    assert faults["time_in_state_downloads_s"] == join["download_s"] and faults["state_bytes_downloaded"] > 0
    assert (result.run_dir / "membership.png").read_bytes().startswith(b"\x89PNG")
    # Peer 1 sends NaN from step 2 on: its contribution is refused in every exchange of steps 2..5, one per step.
    assert arms["ddp-hostile"]["rejected_contributions"] == STEPS - 2
    assert arms["collab"]["rejected_contributions"] == arms["collab-churn"]["rejected_contributions"] == 0
    # The arm without faults runs as it does alone: the arm with faults beside it changes none of its numbers.
    alone = run(parse_spec(raw(COLLAB)), out=tmp_path / "alone")
    assert lines(result.run_dir, "collab") == lines(alone.run_dir, "collab")
    assert not [r for r in map(json.loads, lines(alone.run_dir, "collab")) if "absent" in r or r["kind"] == "fault"]
