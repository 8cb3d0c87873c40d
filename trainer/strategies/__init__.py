"""Training algorithms, one file each; register a new one in `STRATEGIES`."""

from trainer.strategies.base import Exchange, Settings, Strategy
from trainer.strategies.ddp import DDP
from trainer.strategies.diloco import DiLoCo

STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (DDP, DiLoCo)}

__all__ = ["Exchange", "Settings", "Strategy", "STRATEGIES"]
