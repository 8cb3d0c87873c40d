"""Settings declared once: each field of a settings dataclass carries its type, range, default and help.

    @dataclass(frozen=True)
    class DiLoCoSettings(Settings):
        inner_steps: int = setting(50, "local steps between two outer steps (H)", low=1)

`parse_settings(path, cls, table)` is the one parser of every section and algorithm: it refuses unknown keys, checks
each value against its field, fills the defaults from the dataclass and then runs the instance's `check()` (rules
across fields). Every failure is a `ConfigError` that names the key path and what is allowed. `farflung algorithms`
and the README's tables are generated from, or tested against, the same declarations.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

METADATA_KEY = "farflung.setting"
KINDS = (int, float, bool, str)


class ConfigError(ValueError):
    """A user mistake in an experiment file or an override; the message is one line that says the fix."""


@dataclass(frozen=True)
class Setting:
    """One declared setting: what it accepts, and the help `farflung algorithms` prints."""

    help: str
    default: Any = dataclasses.field(default_factory=lambda: dataclasses.MISSING)  # MISSING: a required key
    kind: type = str  # int, float, bool or str; from the field's annotation
    optional: bool = False  # the annotation admits None (a setting left unset)
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    note: str | None = None  # said after the allowed range: "(a group of one averages nothing)"
    name: str = ""

    def check(self, path: str, value: Any) -> Any:
        """`value` if this setting accepts it (numbers as float), else ConfigError('path: must be ..., got ...')."""
        if value is None and self.optional:
            return None
        if self.kind is bool:
            ok = isinstance(value, bool)
        elif self.kind is str:
            ok = value in self.choices if self.choices is not None else isinstance(value, str) and bool(value.strip())
        else:
            ok = isinstance(value, int if self.kind is int else (int, float)) and not isinstance(value, bool)
            ok = ok and value == value and self._in_range(value)  # NaN is no number here
        if not ok:
            raise ConfigError(f"{path}: must be {self.allowed()}, got {value!r}")
        return float(value) if self.kind is float else value

    def allowed(self) -> str:
        """What the setting accepts, as the error messages and `farflung algorithms` say it."""
        if self.choices is not None:
            text = f"one of {', '.join(self.choices)}"
        elif self.kind is str:
            text = "a non-empty string"
        elif self.kind is bool:
            text = "true or false"
        else:
            text = f"{'an integer' if self.kind is int else 'a number'}{self._range()}"
        return text + (f" ({self.note})" if self.note else "")

    def _in_range(self, value: float) -> bool:
        if self.low is not None and not (value > self.low if self.low_open else value >= self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def _range(self) -> str:
        low, high = self.low, self.high
        if low is not None and high is not None:
            return f" in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if low is not None:
            return f" {'>' if self.low_open else '>='} {low}"
        if high is not None:
            return f" {'<' if self.high_open else '<='} {high}"
        return ""


def setting(default: Any = dataclasses.MISSING, help: str = "", *, low: float | None = None,
            high: float | None = None, low_open: bool = False, high_open: bool = False,
            choices: Iterable[str] | None = None, note: str | None = None) -> Any:
    """A dataclass field declared as a setting; without a default the key is required."""
    assert help, "every setting says in one line what it is"
    declared = Setting(help=help, default=default, low=low, high=high, low_open=low_open, high_open=high_open,
                       choices=None if choices is None else tuple(choices), note=note)
    return dataclasses.field(default=default, metadata={METADATA_KEY: declared})


@functools.cache
def settings_of(cls: type) -> dict[str, Setting]:
    """The declared settings of a dataclass, in field order, each knowing its name and type."""
    found = {}
    for f in dataclasses.fields(cls):
        if METADATA_KEY in f.metadata:
            kind, optional = _kind(f.type)
            found[f.name] = replace(f.metadata[METADATA_KEY], name=f.name, kind=kind, optional=optional)
    return found


def _kind(annotation: Any) -> tuple[type, bool]:
    if isinstance(annotation, str):  # postponed annotations; a setting's type names only builtins
        annotation = eval(annotation, {"__builtins__": {}, **{k.__name__: k for k in KINDS}, "None": None})
    args = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    kinds = [a for a in args if a is not type(None)]
    assert len(kinds) == 1 and kinds[0] in KINDS, f"a setting is an int, float, bool or str (or None), not {annotation}"
    return kinds[0], len(kinds) < len(args)


def check_keys(path: str, table: Any, allowed: Iterable[str]) -> dict:
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: must be a table, got {type(table).__name__} {table!r}")
    allowed = list(allowed)
    for key in table:
        if key not in allowed:
            raise ConfigError(f"{path}.{key}: unknown key; allowed: {', '.join(sorted(allowed))}")
    return table


def parse_values(path: str, cls: type, table: Any) -> dict[str, Any]:
    """The table's values, each checked against its declared setting of `cls`; a key `cls` does not declare is an
    error."""
    declared = settings_of(cls)
    check_keys(path, table, declared)
    return {key: declared[key].check(f"{path}.{key}" if path else key, value) for key, value in table.items()}


def parse_settings(path: str, cls: type, table: Any, base: Any = None) -> Any:
    """An instance of `cls` from a TOML table: keys checked, defaults filled (from `base` if given, else from the
    dataclass), then the instance's `check()`, whose ValueError('field: ...') is reported under `path`."""
    values = parse_values(path, cls, table)
    instance = replace(base, **values) if base is not None else cls(**values)
    check = getattr(instance, "check", None)
    if check is not None:
        try:
            check()
        except ValueError as e:
            raise ConfigError(f"{path}.{e}") from None
    return instance


def check_fields(instance: Any) -> None:
    """Raise ConfigError('field: ...') for the first declared setting whose value the declaration refuses."""
    for name, declared in settings_of(type(instance)).items():
        declared.check(name, getattr(instance, name))


def describe(cls: type) -> list[dict[str, Any]]:
    """Each declared setting of `cls` as `farflung algorithms --json` prints it."""
    return [{"name": s.name, "default": None if s.default is dataclasses.MISSING else s.default,
             "allowed": s.allowed(), "help": s.help} for s in settings_of(cls).values()]
