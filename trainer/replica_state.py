"""What a peer hands a joining peer: its parameters, optimizer state and strategy state, as hivemind's
`load_state_from_peers` does (there: the parameters and optimizer state that `get_current_state` serialises).

The strategy's state is taken generically from its attributes: optimizers through their `state_dict`, tensors (and
lists of them, e.g. Streaming DiLoCo's fragments) by value, plain values as they are. The replica's own bookkeeping
(its step counter, data sampler and random stream) stays the joiner's: a restarted peer reads its own shard on (a real
lockstep peer first skips its sampler to the donor's count of batches, `cluster.real.lockstep_peer`).
Once loaded, the strategy drops what only the sender had accumulated for itself (`Strategy.state_loaded`).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

_KEEP = ("settings", "replica")  # what a strategy is built with, not what it has learnt


def _value(v: Any) -> Any:
    if isinstance(v, torch.optim.Optimizer):
        return ("optimizer", copy.deepcopy(v.state_dict()))
    if isinstance(v, torch.Tensor):
        return ("tensor", v.detach().clone())
    if isinstance(v, list) and v and all(isinstance(x, torch.optim.Optimizer) for x in v):
        return ("optimizers", [copy.deepcopy(x.state_dict()) for x in v])
    if isinstance(v, list) and v and all(isinstance(x, torch.Tensor) for x in v):
        return ("tensors", [x.detach().clone() for x in v])
    return ("plain", copy.deepcopy(v))


def export_state(replica) -> dict[str, Any]:
    """The replica's state as another replica of the same arm can load it."""
    strategy = {k: _value(v) for k, v in vars(replica.strategy).items() if k not in _KEEP}
    return {
        "params": replica.flat_params().clone(),
        "optimizer": copy.deepcopy(replica.optimizer.state_dict()),
        "strategy": strategy,
        "residuals": {k: v.clone() for k, v in replica._residuals.items()},
    }


def import_state(replica, state: dict[str, Any]) -> None:
    """Make `replica` hold `state` (from `export_state` of a replica of the same arm)."""
    state = copy.deepcopy(state)  # the local runtime hands in the source's own objects
    replica.set_flat_params(state["params"])
    replica.optimizer.load_state_dict(state["optimizer"])
    strategy = replica.strategy
    for name, (kind, value) in state["strategy"].items():
        current = getattr(strategy, name)
        if kind == "optimizer":
            current.load_state_dict(value)
        elif kind == "optimizers":
            for opt, sd in zip(current, value):
                opt.load_state_dict(sd)
        elif kind == "tensors" and all(isinstance(x, torch.nn.Parameter) for x in current):
            with torch.no_grad():  # parameters an optimizer holds: overwritten in place, not replaced
                for x, v in zip(current, value):
                    x.copy_(v)
        else:
            setattr(strategy, name, value)
    replica._residuals = state["residuals"]
    strategy.state_loaded()


def state_nbytes(state: dict[str, Any]) -> int:
    """Bytes of the tensors in a state: what the download moves (hivemind sends them uncompressed by default)."""
    total = 0

    def walk(v: Any) -> None:
        nonlocal total
        if isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)

    walk(state)
    return total
