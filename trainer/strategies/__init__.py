"""Training algorithms, one file each: a new algorithm plugs in by adding a module here that
defines a `Strategy` subclass with a `name` and a `Settings` dataclass."""

import importlib
import pkgutil

from trainer.strategies.base import Await, Exchange, Report, Settings, Strategy


def _discover() -> dict[str, type[Strategy]]:
    found: dict[str, type[Strategy]] = {}
    for module in sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "base"):
        for value in vars(importlib.import_module(f"{__name__}.{module}")).values():
            if isinstance(value, type) and issubclass(value, Strategy) and "name" in vars(value):
                assert value.name not in found or found[value.name] is value, f"two strategies named {value.name!r}"
                found[value.name] = value
    return dict(sorted(found.items(), key=lambda kv: (kv[0] != "ddp", kv[0])))


STRATEGIES: dict[str, type[Strategy]] = _discover()

__all__ = ["Await", "Exchange", "Report", "Settings", "Strategy", "STRATEGIES"]
