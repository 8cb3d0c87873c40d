"""Streaming DiLoCo (Douillard et al., 2025, "Streaming DiLoCo with overlapping communication:
Towards a Distributed Free Lunch", arXiv:2501.18512).

DiLoCo (see `diloco.py`) with three changes that cut the peak bandwidth and hide the exchange:

1. Fragments. The parameters are cut into `fragments` P parts, each synchronised every
   `inner_steps` H steps but at staggered steps: fragment p is sent after step s when
   (s + 1 - offset_p) % H == 0, offset_p = p * H // P. So an exchange carries about 1/P of the
   model, and the exchanges are spread over the H steps instead of arriving all at once. The paper
   cuts the model by transformer blocks (strided: block i goes to fragment i mod P). Here the flat
   parameter vector (in `model.parameters()` order: embeddings, blocks by depth, final norm) is
   cut into P contiguous slices whose sizes differ by at most one element, which works for any P
   and model and keeps every message the same size, since that size is what sets the peak
   bandwidth. The cut decides which parameters travel together and when; the outer optimizer is
   elementwise, so it changes nothing else.
2. Overlap. Fragment p's pseudo-gradient (its shared parameters at the last synchronisation minus
   the worker's parameters now) is all-reduced in the background while the worker runs
   `overlap_steps` tau more inner steps; it is awaited after the tau-th (staleness tau). The
   average goes through the fragment's outer Nesterov SGD, giving the new shared fragment, and the
   worker's fragment, which has moved on for tau steps, is merged with it:
       local := alpha * local + (1 - alpha) * shared        (the paper's mixing factor alpha)
   alpha = 0 discards the tau local steps, alpha = 1 ignores the peers. tau = 0 makes the exchange
   blocking; the local fragment is then the one just sent, so it simply takes the shared one
   (alpha is not used), and with P = 1 this is DiLoCo exactly.
3. Low-bit outer gradients. Not a setting here: every exchange goes through the arm's codec
   (`codec = "fp16"`, `"uint8"`, ...; the replica encodes each message and the peers average what
   they decode), so an arm with an 8-bit codec sends 8-bit pseudo-gradients. The paper's 4-bit
   floats (E3M0) have no hivemind codec; "uint8" is the nearest.

Payloads are named f"pseudo_gradient/{p}". `finish` awaits every fragment still in flight, then
synchronises (blocking, no mixing) every fragment whose replicas may differ, so all end equal.

Defaults: H = 50, as this repository's DiLoCo. P = 4 fragments, so an exchange carries a quarter of
the model. tau = 1 (one inner step hides the exchange; the paper overlaps one to a few steps) and
alpha = 0.5 (an even merge of local and shared, the paper's choice). Outer SGD with Nesterov
momentum 0.9 and learning rate 0.7 are DiLoCo's values (Douillard et al., 2023); the outer learning
rate is the setting to tune per model size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.settings import setting
from trainer.strategies.base import Await, Exchange, Settings, StepGenerator, Strategy


@dataclass(frozen=True)
class StreamingDiLoCoSettings(Settings):
    inner_steps: int = setting(50, "H: steps between two synchronisations of the same fragment", low=1)
    fragments: int = setting(4, "P: parts of the parameter vector, synchronised at staggered steps; at most "
                             "inner_steps", low=1)
    # The range depends on inner_steps, so `check` says it.
    overlap_steps: int = setting(1, "tau: inner steps run while a fragment's exchange travels (0: blocking)",
                                 note="from 0 to inner_steps - 1")
    alpha: float = setting(0.5, "on arrival, local := alpha * local + (1 - alpha) * shared", low=0.0, high=1.0)
    outer_lr: float = setting(0.7, "the outer Nesterov SGD's learning rate", low=0.0, high=10.0, low_open=True)
    outer_momentum: float = setting(0.9, "the outer Nesterov momentum (0: plain outer SGD)", low=0.0, high=0.999)

    def check(self) -> None:
        super().check()
        if self.fragments > self.inner_steps:
            raise ValueError(f"fragments: must be at most inner_steps ({self.inner_steps}) so that no two fragments "
                             f"are sent at the same step, got {self.fragments}")
        if not 0 <= self.overlap_steps < self.inner_steps:
            raise ValueError(f"overlap_steps: must be an integer from 0 to inner_steps - 1 ({self.inner_steps - 1}), "
                             f"so that a fragment arrives before it is sent again; got {self.overlap_steps!r}")


def fragment_bounds(n_params: int, fragments: int) -> list[tuple[int, int]]:
    """[start, stop) of each fragment: contiguous, the first n_params % fragments one element larger."""
    sizes = [n_params // fragments + (1 if p < n_params % fragments else 0) for p in range(fragments)]
    starts = [sum(sizes[:p]) for p in range(fragments)]
    return [(start, start + size) for start, size in zip(starts, sizes)]


class StreamingDiLoCo(Strategy):
    name = "streaming-diloco"
    summary = "one of `fragments` parameter fragments at staggered steps, overlapped with `overlap_steps` of compute"
    Settings = StreamingDiLoCoSettings
    robust_aggregation = True

    def __init__(self, settings: StreamingDiLoCoSettings, replica):
        super().__init__(settings, replica)
        flat = replica.flat_params()
        self.bounds = fragment_bounds(flat.numel(), settings.fragments)
        # The shared (global) fragments, equal on every worker; each has its own outer optimizer.
        self.shared = [torch.nn.Parameter(flat[a:b].clone()) for a, b in self.bounds]
        momentum = settings.outer_momentum
        self.outer_optimizers = [
            torch.optim.SGD([s], lr=settings.outer_lr, momentum=momentum, nesterov=momentum > 0) for s in self.shared
        ]
        self.sent_at: dict[int, int] = {}  # fragment -> step after which its exchange started
        self.diverged = [False] * settings.fragments  # whether a fragment may differ across replicas

    def state_dict(self) -> dict:
        return {"shared": [s.detach().clone() for s in self.shared],
                "outer_optimizers": [o.state_dict() for o in self.outer_optimizers],
                "sent_at": dict(self.sent_at), "diverged": list(self.diverged)}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for shared, saved in zip(self.shared, state["shared"], strict=True):
                shared.copy_(saved)
        for optimizer, saved in zip(self.outer_optimizers, state["outer_optimizers"], strict=True):
            optimizer.load_state_dict(saved)
        self.sent_at, self.diverged = dict(state["sent_at"]), list(state["diverged"])

    def offset(self, p: int) -> int:
        return p * self.settings.inner_steps // self.settings.fragments

    def train_step(self, step: int) -> StepGenerator:
        replica, s = self.replica, self.settings
        loss = replica.forward_backward()
        replica.optimizer_step(step)
        self.diverged = [True] * s.fragments
        for p in sorted(p for p, sent in self.sent_at.items() if step - sent == s.overlap_steps):
            yield from self.receive(p)
        for p in range(s.fragments):
            if (step + 1 - self.offset(p)) % s.inner_steps == 0:
                yield from self.send(p, step)
        return loss

    def finish(self) -> StepGenerator:
        for p in sorted(self.sent_at):
            yield from self.receive(p)
        for p in range(self.settings.fragments):
            if self.diverged[p]:
                average = yield Exchange(f"pseudo_gradient/{p}", self.pseudo_gradient(p))
                self.outer_step(p, average, alpha=0.0)

    def send(self, p: int, step: int) -> StepGenerator:
        payload = f"pseudo_gradient/{p}"
        if self.settings.overlap_steps == 0:
            average = yield Exchange(payload, self.pseudo_gradient(p))
            self.outer_step(p, average, alpha=0.0)
        else:
            yield Exchange(payload, self.pseudo_gradient(p), blocking=False)
            self.sent_at[p] = step

    def receive(self, p: int) -> StepGenerator:
        average = yield Await(f"pseudo_gradient/{p}")
        del self.sent_at[p]
        self.outer_step(p, average, alpha=self.settings.alpha)

    def pseudo_gradient(self, p: int) -> torch.Tensor:
        a, b = self.bounds[p]
        return self.shared[p].detach() - self.replica.flat_params()[a:b]

    def outer_step(self, p: int, average: torch.Tensor, alpha: float) -> None:
        """Apply the averaged pseudo-gradient to the shared fragment, then merge it into the local one."""
        shared = self.shared[p]
        shared.grad = average.to(shared.dtype).clone()
        self.outer_optimizers[p].step()
        a, b = self.bounds[p]
        flat = self.replica.flat_params().clone()
        merged = shared.detach().clone() if alpha == 0.0 else alpha * flat[a:b] + (1.0 - alpha) * shared.detach()
        flat[a:b] = merged
        self.replica.set_flat_params(flat)
        self.diverged[p] = alpha != 0.0
