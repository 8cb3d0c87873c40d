"""The one parser of settings: a declaration on a dataclass field is the type, range, default and help of a key."""

import math
from dataclasses import dataclass

import pytest

from trainer.settings import ConfigError, Setting, check_fields, describe, parse_settings, setting, settings_of


@dataclass(frozen=True)
class Example:
    steps: int = setting(10, "steps between two rounds", low=1, high=100)
    rate: float = setting(0.5, "share kept", low=0.0, high=1.0, low_open=True)
    decay: float = setting(0.9, "momentum decay", low=0, high=1, high_open=True)
    mode: str = setting("grid", "how peers are grouped", choices=("grid", "random"))
    sync: bool = setting(False, "one global exchange at the end")
    limit: int | None = setting(None, "at most this many", low=1024)
    group: int = setting(0, "peers per group", low=0, note="0: as many as there are")

    def check(self) -> None:
        if self.mode == "grid" and self.steps == 7:
            raise ValueError("steps: 7 does not tile a grid; use 8")


def test_declarations_know_name_type_default_and_help():
    declared = settings_of(Example)
    assert list(declared) == ["steps", "rate", "decay", "mode", "sync", "limit", "group"]
    steps = declared["steps"]
    assert (steps.kind, steps.default, steps.help) == (int, 10, "steps between two rounds")
    assert (declared["limit"].kind, declared["limit"].optional) == (int, True)
    assert (declared["rate"].kind, declared["sync"].kind, declared["mode"].kind) == (float, bool, str)
    assert [row["allowed"] for row in describe(Example)] == [
        "an integer in [1, 100]", "a number in (0.0, 1.0]", "a number in [0, 1)", "one of grid, random",
        "true or false", "an integer >= 1024", "an integer >= 0 (0: as many as there are)",
    ]


def test_defaults_fill_what_the_table_leaves_out():
    assert parse_settings("x", Example, {}) == Example()
    parsed = parse_settings("x", Example, {"steps": 3, "rate": 1, "limit": 2048})
    assert (parsed.steps, parsed.rate, parsed.limit, parsed.mode) == (3, 1.0, 2048, "grid")
    assert type(parsed.rate) is float  # an integer where a number is declared reads as a float


def test_a_base_instance_gives_the_defaults():
    base = Example(steps=50, mode="random")
    assert parse_settings("x", Example, {"rate": 0.25}, base=base) == Example(steps=50, rate=0.25, mode="random")


@pytest.mark.parametrize(
    "table, message",
    [
        ({"stpes": 3}, "arm.a.algorithm.stpes: unknown key; allowed: decay, group, limit, mode, rate, steps, sync"),
        ({"steps": 0}, "arm.a.algorithm.steps: must be an integer in [1, 100], got 0"),
        ({"steps": 101}, "arm.a.algorithm.steps: must be an integer in [1, 100], got 101"),
        ({"steps": 2.0}, "arm.a.algorithm.steps: must be an integer in [1, 100], got 2.0"),
        ({"steps": True}, "arm.a.algorithm.steps: must be an integer in [1, 100], got True"),
        ({"rate": 0.0}, "arm.a.algorithm.rate: must be a number in (0.0, 1.0], got 0.0"),
        ({"rate": math.nan}, "arm.a.algorithm.rate: must be a number in (0.0, 1.0], got nan"),
        ({"rate": "half"}, "arm.a.algorithm.rate: must be a number in (0.0, 1.0], got 'half'"),
        ({"decay": 1.0}, "arm.a.algorithm.decay: must be a number in [0, 1), got 1.0"),
        ({"mode": "ring"}, "arm.a.algorithm.mode: must be one of grid, random, got 'ring'"),
        ({"sync": 1}, "arm.a.algorithm.sync: must be true or false, got 1"),
        ({"limit": 10}, "arm.a.algorithm.limit: must be an integer >= 1024, got 10"),
        ({"group": -1}, "arm.a.algorithm.group: must be an integer >= 0 (0: as many as there are), got -1"),
        ({"steps": 7}, "arm.a.algorithm.steps: 7 does not tile a grid; use 8"),  # the cross-field check
    ],
)
def test_every_failure_names_the_key_path_and_what_is_allowed(table, message):
    with pytest.raises(ConfigError) as error:
        parse_settings("arm.a.algorithm", Example, table)
    assert str(error.value) == message


def test_a_table_that_is_not_a_table_is_refused():
    with pytest.raises(ConfigError, match=r"^model: must be a table, got int 3$"):
        parse_settings("model", Example, 3)


def test_an_instance_built_in_code_is_checked_against_the_same_declarations():
    check_fields(Example(steps=5))
    with pytest.raises(ValueError, match=r"^rate: must be a number in \(0\.0, 1\.0\], got 2$"):
        check_fields(Example(rate=2))


def test_a_standalone_setting_checks_one_value():
    preset = Setting("the model's size", default="small", choices=("tiny", "small"))
    assert preset.check("model.preset", "tiny") == "tiny"
    with pytest.raises(ConfigError, match=r"^model\.preset: must be one of tiny, small, got 'huge'$"):
        preset.check("model.preset", "huge")
    with pytest.raises(ConfigError, match=r"^name: must be a non-empty string, got ' '$"):
        Setting("a name").check("name", " ")
