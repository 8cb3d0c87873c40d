"""Every experiment file shipped in experiments/ reads, and describes the run its comments say it does."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from experiments.spec import load_spec
from trainer.strategies import STRATEGIES

SHIPPED = sorted((Path(__file__).parents[2] / "experiments").glob("*.toml"))
# The budget's comment in every shipped file: "tokens = 983_040  # 240 steps of 4 workers x 8 sequences x 128 bytes".
BUDGET = re.compile(r"^tokens\s*=.*#\s*(\d+) (?:lockstep )?steps of (\d+) workers x (\d+) sequences x (\d+) bytes",
                    re.MULTILINE)


def test_the_files_the_readme_names_are_shipped():
    names = {p.name for p in SHIPPED}
    assert {"demo.toml", "algorithms.toml", "real-loopback.toml", "fidelity-20mbit.toml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_file_parses_into_a_runnable_spec(path):
    text = path.read_text()
    spec = load_spec(path)  # rejects unknown keys, algorithms, networks, devices, and what real mode cannot run
    # Every [[arm]] table became an arm (none lost to a misspelt table header such as [[arms]]).
    assert len(spec.arms) == len(re.findall(r"^\[\[arm\]\]\s*$", text, re.MULTILINE)) >= 1
    assert sum(arm.baseline for arm in spec.arms) == 1
    assert spec.total_steps >= 1 and 1 <= spec.eval_every_steps <= spec.total_steps
    # Arms are compared on one budget: the tokens are a whole number of steps, none dropped by the division.
    assert spec.total_steps * spec.tokens_per_step == spec.run.tokens


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_budget_comment_matches_the_spec(path):
    found = BUDGET.search(path.read_text())
    if found is None:
        pytest.skip("no step-count comment on its tokens line")
    steps, workers, batch, block = map(int, found.groups())
    spec = load_spec(path)
    assert (spec.total_steps, spec.run.workers, spec.run.batch_size, spec.model.block_size) == (
        steps, workers, batch, block)


def test_algorithms_file_runs_every_algorithm():
    # Its header promises "every algorithm farflung simulates": a new strategy belongs in it.
    spec = load_spec(Path(__file__).parents[2] / "experiments" / "algorithms.toml")
    assert {arm.algorithm for arm in spec.arms} == set(STRATEGIES)
