"""What a swarm arm's peers pass to `hivemind.Optimizer`, from the arm's strategy settings and swarm timing.

How the simulator's settings map onto hivemind.Optimizer (a swarm strategy's own part is its `swarm_mapping`, the
timing is the arm's `SwarmTiming`):

| simulator                                    | hivemind.Optimizer                                                   |
|----------------------------------------------|----------------------------------------------------------------------|
| collaborative `target_batch_size`            | `target_batch_size`, `batch_size_per_step` = the run's batch size     |
| SwarmTiming `matchmaking_time`               | `matchmaking_time` (the averagers' `min_matchmaking_time`)           |
| SwarmTiming `averaging_timeout`              | `averaging_timeout`                                                   |
| SwarmTiming `progress_refresh_s`             | `tracker_opts.min_refresh_period`                                    |
| SwarmTiming `target_group_size` (0: None)    | the averagers' `target_group_size`                                    |
| collaborative `average_state_every` (epochs) | `average_state_every` (parameters; `average_opt_statistics` = ())    |
| local-updates `average_state_every` (steps)  | `use_local_updates`, one epoch = that many steps of every peer        |
| local-updates `delay_state_averaging`        | `delay_state_averaging` (hivemind's delta rule)                       |
| the run's codec                               | `grad_compression`, `state_averaging_compression`                    |
| AdamW + clipping + warmup/cosine by step      | the same AdamW (clipping in its `step`), the schedule by epoch       |

The schedule: hivemind steps a scheduler once per epoch, so epoch e gets the learning rate of the lockstep step
e x (samples per epoch / samples per lockstep step), as the simulator's collaborative arm does with the swarm's sample
count. With local updates the rate is constant within an epoch (the simulator changes it every step).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import torch

from cluster.swarm_timing import SwarmTiming
from trainer.strategies.base import Settings, Strategy

# A swarm arm without timing settings of its own (local-updates) keeps these: hivemind's defaults, with the averager's
# min_matchmaking_time (5 s) rather than hivemind.Optimizer's 15 s.
UNTIMED = SwarmTiming(matchmaking_time=5.0, averaging_timeout=60.0, target_group_size=0, progress_refresh_s=0.5)


@dataclass(frozen=True)
class SwarmSetup:
    """What a peer passes to `hivemind.Optimizer`, derived from an arm's strategy settings and swarm timing (see the
    module table); it travels as JSON to joining peers."""

    target_batch_size: int
    batch_size: int
    use_local_updates: bool
    delay_state_averaging: bool
    average_state_every: int
    matchmaking_time_s: float
    averaging_timeout_s: float
    progress_refresh_s: float
    target_group_size: int  # 0: hivemind's default (None): a leader gathers its group for matchmaking_time
    lockstep_steps_per_epoch: float  # places epoch e on the arm's learning-rate schedule
    codec: str

    @classmethod
    def of(cls, strategy: type[Strategy], settings: Settings, timing: SwarmTiming | None, n_workers: int,
           batch_size: int, codec: str) -> SwarmSetup:
        assert strategy.real_mode == "swarm", f"{strategy.name!r} does not run as hivemind.Optimizer"
        mapping = strategy.swarm_mapping(settings, n_workers, batch_size)
        timing = timing or UNTIMED
        return cls(
            target_batch_size=mapping.target_batch_size, batch_size=batch_size,
            use_local_updates=mapping.use_local_updates, delay_state_averaging=mapping.delay_state_averaging,
            average_state_every=mapping.average_state_every, matchmaking_time_s=timing.matchmaking_time,
            averaging_timeout_s=timing.averaging_timeout, progress_refresh_s=timing.progress_refresh_s,
            target_group_size=timing.target_group_size, lockstep_steps_per_epoch=mapping.lockstep_steps_per_epoch,
            codec=codec,
        )


def arm_config(spec, setup: SwarmSetup, arm: str) -> str:
    """The JSON a joining peer rebuilds the arm's replica and optimizer from."""
    return json.dumps({
        "arm": arm, "algorithm": spec.algorithm, "n_workers": spec.n_workers, "seed": spec.seed,
        "model": dataclasses.asdict(spec.model), "data": dataclasses.asdict(spec.data),
        "optim": dataclasses.asdict(spec.optim), "batch_size": spec.batch_size, "total_steps": spec.total_steps,
        "settings": dataclasses.asdict(spec.settings), "codec": spec.codec, "eval_batches": spec.eval_batches,
        "setup": dataclasses.asdict(setup),
    }, sort_keys=True)


class ClippedAdamW(torch.optim.AdamW):
    """AdamW that clips its gradients' global norm first: the replica's `optimizer_step`, inside hivemind."""

    def __init__(self, params, grad_clip: float = 0.0, **kwargs):
        super().__init__(params, **kwargs)
        self.grad_clip = grad_clip

    def step(self, closure=None):
        if self.grad_clip > 0:
            grads = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(grads, self.grad_clip)
        return super().step(closure)


def fresh_weights(model: torch.nn.Module, seed: int, worker: int, incarnation: int) -> None:
    """Initialise `model` again from a generator of its own, leaving torch's global generator as it was."""
    from trainer.model import GPT

    with torch.random.fork_rng():
        torch.manual_seed((seed * 1_000_003 + worker) * 1009 + incarnation)
        model.load_state_dict(GPT(model.config).state_dict())
