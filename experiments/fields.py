"""Checks that turn a TOML table into typed values, each failure naming the field and what is allowed."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class ConfigError(ValueError):
    """A user mistake in an experiment file or an override; the message is one line that says the fix."""


def check_keys(path: str, table: Any, allowed: Iterable[str]) -> dict:
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: must be a table, got {type(table).__name__} {table!r}")
    allowed = list(allowed)
    for key in table:
        if key not in allowed:
            raise ConfigError(f"{path}.{key}: unknown key; allowed: {', '.join(sorted(allowed))}")
    return table


def integer(path: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool)
    ok = ok and (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        raise ConfigError(f"{path}: must be an integer{_range(low, high)}, got {value!r}")
    return value


def number(path: str, value: Any, low: float | None = None, high: float | None = None, *, low_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    ok = ok and (high is None or value <= high)
    if not ok:
        raise ConfigError(f"{path}: must be a number{_range(low, high, low_open)}, got {value!r}")
    return float(value)


def choice(path: str, value: Any, allowed: Iterable[str]) -> str:
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(f"{path}: must be one of {', '.join(allowed)}, got {value!r}")
    return value


def string(path: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{path}: must be a non-empty string, got {value!r}")
    return value


def boolean(path: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{path}: must be true or false, got {value!r}")
    return value


def _range(low: float | None, high: float | None, low_open: bool = False) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low}, {high}]"
    if low is not None:
        return f" {'>' if low_open else '>='} {low}"
    if high is not None:
        return f" <= {high}"
    return ""
