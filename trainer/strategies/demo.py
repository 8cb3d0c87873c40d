"""DeMo (Peng, Quesnelle & Kingma, 2024, "DeMo: Decoupled Momentum Optimization", arXiv:2411.19870).

DeMo replaces the optimizer and the gradient all-reduce together. Each worker keeps its own
momentum, m = beta * m + g, and every step sends only its "fast components": the momentum is cut
into blocks, each block goes through an orthonormal DCT-II, and the `topk` largest-magnitude
coefficients of each block are kept. What is sent is subtracted from the momentum, so the momentum
itself is the error feedback. The receivers average the kept coefficients, transform them back
(q) and step p <- p * (1 - lr * wd) - lr * sign(q).

Blocking follows the reference optimizer (github.com/bloc97/DeMo, `TransformDCT`/`CompressDCT`,
also vendored by exo gym): a matrix is cut into r x c tiles with a 2-D DCT per tile and top-k over
its r*c coefficients; a vector into chunks of l. r, c and l are the largest divisors of the
dimension that do not exceed `chunk_size`. A coefficient is averaged over the workers that kept it
(the reference's `scatter_reduce(..., "mean", include_self=False)`), not over all workers.

Defaults are the reference's and the paper's OLMo runs: compression_topk=32, compression_chunk=64,
compression_decay=0.999. The step size is the arm's AdamW schedule (`lr_at`) times `lr_scale`: a
sign step moves each parameter by lr, about what an Adam step does, and the paper's OLMo configs
give DeMo an AdamW-sized learning rate. Deviations from the reference, each to keep arms
comparable: the momentum accumulates g rather than lr * g (the paper's Algorithm 1), gradients are
clipped as the arm's AdamW clips them, and decoupled weight decay applies to matrices only (the
model's own `configure_optimizers` split; the reference decays every tensor).

The message is encoded by the strategy itself: one int16 (int32 for tiles over 32767 entries)
tensor of in-tile indices and one float32 tensor of values, sized by hivemind's serializer. It
travels by all-gather, since sparse messages cannot be summed on the way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from trainer.compression import tensor_message_nbytes
from trainer.settings import setting
from trainer.strategies.base import Exchange, Settings, StepGenerator, Strategy


@dataclass(frozen=True)
class DeMoSettings(Settings):
    chunk_size: int = setting(64, "compression_chunk: largest DCT block side", low=1)
    topk: int = setting(32, "compression_topk: coefficients kept per block", low=1)
    momentum_decay: float = setting(0.999, "compression_decay (beta) of the momentum", low=0, high=1, high_open=True)
    lr_scale: float = setting(1.0, "multiplies the arm's lr schedule for the sign step", low=0.0, high=100.0,
                              low_open=True)


def dct_basis(n: int) -> torch.Tensor:
    """Orthonormal DCT-II matrix B (n x n): coefficients = B @ x, and x = B.T @ coefficients."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    basis = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    basis[0] /= math.sqrt(2.0)
    return basis.to(torch.float32)


def largest_divisor_up_to(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


@dataclass(frozen=True)
class _Tensor:
    """One parameter's place in the flat vector and its DCT tiling."""

    offset: int
    shape: tuple[int, ...]  # (rows, cols) or (length,)
    tile: tuple[int, ...]  # (r, c) or (l,)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def tile_numel(self) -> int:
        return math.prod(self.tile)


class BlockDCT:
    """Flat vector <-> per-tile DCT coefficients, tiled like the model's parameter tensors.

    Coefficients use the same flat length: each tensor's tiles, one after another, each tile's
    coefficients row-major.
    """

    def __init__(self, shapes: list[tuple[int, ...]], chunk_size: int):
        self.tensors: list[_Tensor] = []
        offset = 0
        for shape in shapes:
            # The reference tiles matrices and vectors; anything else is viewed as (first dim, rest).
            shape = (shape[0], math.prod(shape[1:])) if len(shape) > 2 else tuple(shape) or (1,)
            tile = tuple(largest_divisor_up_to(s, chunk_size) for s in shape)
            self.tensors.append(_Tensor(offset, shape, tile))
            offset += math.prod(shape)
        self.numel = offset
        self.bases = {n: dct_basis(n) for t in self.tensors for n in t.tile}

    def _tiles(self, flat: torch.Tensor):
        for t in self.tensors:
            yield t, flat[t.offset : t.offset + t.numel]

    def encode(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Per tensor: its coefficients as (tiles, tile_numel)."""
        out = []
        for t, x in self._tiles(flat):
            if len(t.shape) == 2:
                (rows, cols), (r, c) = t.shape, t.tile
                tiles = x.view(rows // r, r, cols // c, c).transpose(1, 2)  # (tile row, tile col, r, c)
                x = self.bases[r] @ tiles @ self.bases[c].T
            else:
                x = x.view(-1, t.tile[0]) @ self.bases[t.tile[0]].T
            out.append(x.reshape(-1, t.tile_numel))
        return out

    def decode(self, coefficients: list[torch.Tensor]) -> torch.Tensor:
        out = []
        for t, x in zip(self.tensors, coefficients):
            if len(t.shape) == 2:
                (rows, cols), (r, c) = t.shape, t.tile
                tiles = self.bases[r].T @ x.view(rows // r, cols // c, r, c) @ self.bases[c]
                x = tiles.transpose(1, 2)
            else:
                x = x.view(-1, t.tile[0]) @ self.bases[t.tile[0]]
            out.append(x.reshape(-1))
        return torch.cat(out)

    def kept_per_tile(self, topk: int) -> list[int]:
        return [min(topk, t.tile_numel) for t in self.tensors]


def extract_fast_components(
    transform: BlockDCT, momentum: torch.Tensor, topk: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The top-k coefficients of every tile, dense with zeros elsewhere, and their 0/1 masks."""
    kept, masks = [], []
    for coefficients, k in zip(transform.encode(momentum), transform.kept_per_tile(topk)):
        indices = torch.topk(coefficients.abs(), k, dim=-1, sorted=False).indices
        kept.append(torch.zeros_like(coefficients).scatter(-1, indices, coefficients.gather(-1, indices)))
        masks.append(torch.zeros_like(coefficients).scatter(-1, indices, 1.0))
    return kept, masks


def message_bytes(transform: BlockDCT, topk: int) -> int:
    """Serialized size of one worker's message: in-tile indices and float32 values of every kept coefficient."""
    n_kept = sum(k * (t.numel // t.tile_numel) for t, k in zip(transform.tensors, transform.kept_per_tile(topk)))
    index_dtype = torch.int16 if max(t.tile_numel for t in transform.tensors) <= 2**15 else torch.int32
    return tensor_message_nbytes((n_kept,), index_dtype) + tensor_message_nbytes((n_kept,), torch.float32)


class DeMo(Strategy):
    name = "demo"
    summary = "DCT-domain top-k of momentum (the momentum is the error feedback), all-gathered"
    Settings = DeMoSettings

    @classmethod
    def check_arm(cls, settings: DeMoSettings, n_workers: int, codec: str) -> None:
        if codec != "none":
            raise ValueError(
                f"codec: DeMo encodes its own sparse messages, so the arm's codec {codec!r} would be "
                "ignored; set codec = 'none' for this arm (or choose another algorithm to test codecs)"
            )

    def __init__(self, settings: DeMoSettings, replica):
        super().__init__(settings, replica)
        self.check_arm(settings, replica.spec.n_workers, replica.spec.codec)
        parameters = list(replica.model.parameters())
        self.transform = BlockDCT([tuple(p.shape) for p in parameters], settings.chunk_size)
        self.momentum = torch.zeros(self.transform.numel)
        self.decays = torch.cat([torch.full((p.numel(),), p.dim() >= 2) for p in parameters])
        self.nbytes = message_bytes(self.transform, settings.topk)

    def state_dict(self) -> dict:
        return {"momentum": self.momentum.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.momentum = state["momentum"].clone()

    def train_step(self, step: int) -> StepGenerator:
        replica, settings, optim = self.replica, self.settings, self.replica.spec.optim
        loss = replica.forward_backward()
        if optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(replica.model.parameters(), optim.grad_clip)
        self.momentum.mul_(settings.momentum_decay).add_(replica.flat_grads())
        kept, masks = extract_fast_components(self.transform, self.momentum, settings.topk)
        self.momentum.sub_(self.transform.decode(kept))
        n = self.transform.numel
        message = torch.cat([c.reshape(-1) for c in kept] + [m.reshape(-1) for m in masks])
        mean = yield Exchange("fast_components", message, nbytes=self.nbytes, sparse=True, dense_nbytes=4 * n)
        # Mean over the workers that kept each coefficient: the mean values over the share that kept it.
        values, share = mean[:n], mean[n:]
        q = torch.where(share > 0, values / share.clamp_min(1e-30), torch.zeros_like(values))
        q = self.transform.decode([c.view_as(k) for c, k in zip(self._split(q), kept)])
        lr = optim.lr_at(step, replica.spec.total_steps) * settings.lr_scale
        params = replica.flat_params().clone()
        params[self.decays] *= 1.0 - lr * optim.weight_decay
        replica.set_flat_params(params - lr * torch.sign(q))
        return loss

    def _split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(flat, [t.numel for t in self.transform.tensors]))
