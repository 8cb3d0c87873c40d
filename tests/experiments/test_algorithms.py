"""`farflung algorithms` and the README say what the declarations say: no setting is added without documenting it."""

import json
import re
import tomllib
from pathlib import Path

import pytest

from cluster.real.options import real_algorithms
from cluster.swarm_timing import SwarmTiming
from experiments import cli
from experiments.spec import ARM_KEYS, FAULT_KEYS, algorithm_catalog, algorithm_settings
from trainer.compression import CODECS
from trainer.data import DataConfig
from trainer.model import GPTConfig
from trainer.replica import OptimConfig
from trainer.robust import Aggregation
from trainer.settings import check_fields, settings_of
from trainer.strategies import STRATEGIES

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


def table_after(heading: str) -> list[list[str]]:
    """The cells of the first Markdown table after the line that starts with `heading`, header excluded."""
    lines = README[README.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


def without_parentheses(text: str) -> str:
    return re.sub(r"\([^()]*\)", "", text)


def readme_algorithms() -> dict[str, tuple[str, dict]]:
    """name -> (what is exchanged, {setting: default}) from the README's algorithm table."""
    found = {}
    for name, summary, settings in table_after("Algorithms (`trainer/strategies/`"):
        pairs = {} if settings == "—" else dict(
            re.fullmatch(r"`(\w+)` (.+)", pair.strip()).groups() for pair in without_parentheses(settings).split(",")
        )
        found[name.strip("`")] = (summary, {k: tomllib.loads(f"v = {v.strip()}")["v"] for k, v in pairs.items()})
    return found


def test_the_readme_table_lists_every_algorithm_with_its_declared_settings_and_defaults():
    documented = readme_algorithms()
    assert sorted(documented) == sorted(STRATEGIES)
    for name, strategy in STRATEGIES.items():
        summary, settings = documented[name]
        declared = {s.name: s.default for cls in algorithm_settings(strategy) if cls is not Aggregation
                    for s in settings_of(cls).values()}
        assert settings == declared, name
        # 15 in the README for 15.0 is the same default, but false is not 0 and "grid" is not grid.
        assert {k: type(v) is bool for k, v in settings.items()} == {k: type(v) is bool for k, v in declared.items()}
        assert summary == strategy.summary, name


def test_collaborative_takes_the_swarm_timing_and_only_collaborative_does():
    timing = list(settings_of(SwarmTiming))
    assert timing == ["matchmaking_time", "averaging_timeout", "target_group_size", "progress_refresh_s"]
    assert [n for n, s in STRATEGIES.items() if SwarmTiming in algorithm_settings(s)] == ["collaborative"]
    assert "matchmaking_time" in readme_algorithms()["collaborative"][1]


def test_the_readme_names_the_algorithms_that_take_a_robust_aggregation_and_its_defaults():
    sentence = README[README.index("The `algorithm` table of"):].split("\n\n")[0]
    takers, keys = sentence.removeprefix("The `algorithm` table of").split("also takes")
    assert sorted(re.findall(r"`([\w-]+)`", takers)) == sorted(
        n for n, s in STRATEGIES.items() if Aggregation in algorithm_settings(s))
    pairs = dict(re.findall(r"`(\w+)`\s+(\"\w+\"|\d+(?:\.\d+)?)", without_parentheses(keys.split(":", 1)[1])))
    assert {k: tomllib.loads(f"v = {v}")["v"] for k, v in pairs.items()} == {
        s.name: s.default for s in settings_of(Aggregation).values()}


def test_the_readme_section_table_lists_every_declared_key():
    rows = {section: re.findall(r"`(\w+)`", without_parentheses(keys)) for section, keys in table_after("| section")}
    assert sorted(rows["`[model]`"]) == sorted(["preset", *settings_of(GPTConfig)])
    assert sorted(rows["`[data]`"]) == sorted(settings_of(DataConfig))
    assert sorted(rows["`[optim]`"]) == sorted(settings_of(OptimConfig))
    from experiments.spec import RunConfig

    assert sorted(rows["`[run]`"]) == sorted(settings_of(RunConfig))
    assert sorted(rows["`[[arm]]`"]) == sorted(ARM_KEYS)
    assert sorted(rows["`[faults]`"]) == sorted(FAULT_KEYS)


def test_the_readme_real_mode_table_groups_algorithms_by_their_declared_real_mode():
    rows = {re.search(r"\((\w+)\)", first).group(1): re.findall(r"`([\w-]+)`", first)
            for first, _ in table_after("| algorithm (its `real_mode`)")}
    assert rows == {"lockstep": ["ddp", "diloco"], "swarm": ["collaborative", "local-updates"]}
    assert rows["lockstep"] == real_algorithms("lockstep") and rows["swarm"] == real_algorithms("swarm")


def test_the_readme_names_every_codec():
    line = README[README.index("Codecs\n(`trainer/compression.py`"):].split("; bytes")[0]
    assert re.findall(r"`([\w:-]+)`", line.split("via `hivemind.compression`")[1]) == [*CODECS, "topk:FRACTION"]


def test_algorithms_json_prints_every_setting_with_its_default_and_range(capsys):
    assert cli.main(["algorithms", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["algorithms"] == algorithm_catalog()
    by_name = {a["name"]: a for a in printed["algorithms"]}
    assert list(by_name) == list(STRATEGIES)
    diloco = {s["name"]: s for s in by_name["diloco"]["settings"]}
    assert diloco["inner_steps"] == {"name": "inner_steps", "default": 50, "allowed": "an integer >= 1",
                                     "help": "H: inner AdamW steps between two outer steps"}
    assert diloco["outer_lr"]["allowed"] == "a number in (0.0, 10.0]"
    collaborative = [s["name"] for s in by_name["collaborative"]["settings"]]
    assert collaborative == ["target_batch_size", "average_state_every", "matchmaking_time", "averaging_timeout", "target_group_size",
                             "progress_refresh_s"]
    assert {a["name"]: a["real_mode"] for a in printed["algorithms"] if a["real_mode"]} == {
        "ddp": "lockstep", "collaborative": "swarm", "diloco": "lockstep", "local-updates": "swarm"}
    assert [c["name"] for c in printed["codecs"]] == list(CODECS)


def test_algorithms_prints_a_line_per_setting(capsys):
    assert cli.main(["algorithms"]) == 0
    out = capsys.readouterr().out
    assert "diloco: pseudo-gradient every inner_steps, outer Nesterov SGD\n  real mode: lockstep averaging\n" in out
    assert re.search(r"\n  target_group_size +2 +an integer >= 2 \(a group of one averages nothing\) +M: peers", out)
    assert re.search(r"\n  final_sync +false +true or false +one butterfly", out)
    assert "sparta: a random fraction of the parameters averaged every step\n  real mode: simulator only\n" in out


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_default_passes_its_own_declaration(name):
    for cls in algorithm_settings(STRATEGIES[name]):
        check_fields(cls())
        getattr(cls(), "check", lambda: None)()
