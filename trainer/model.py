"""A small decoder-only transformer over bytes, in the manner of nanoGPT.

Single-device and unaware of distribution: data parallelism, averaging and time live in
`trainer.strategies` and `cluster`. The presets are sized for a CPU: `tiny` for tests, `small`
(about 1M parameters) for the demo, `base` (about 10M) for longer runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from trainer.settings import setting


@dataclass(frozen=True)
class GPTConfig:
    block_size: int = setting(128, "context length in bytes (tokens)", low=8, high=4096)
    vocab_size: int = setting(256, "bytes: always 256", low=256, high=256)
    n_layer: int = setting(4, "transformer blocks", low=1, high=96)
    n_head: int = setting(4, "attention heads per block; must divide n_embd", low=1, high=128)
    n_embd: int = setting(128, "width of the residual stream", low=8, high=16384)
    dropout: float = setting(0.0, "dropout probability in training", low=0.0, high=0.9)
    bias: bool = setting(False, "biases in the linear layers and layer norms")


PRESETS: dict[str, GPTConfig] = {
    "tiny": GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32),
    "small": GPTConfig(block_size=128, n_layer=5, n_head=4, n_embd=128),
    "base": GPTConfig(block_size=256, n_layer=6, n_head=6, n_embd=384),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying: the byte embedding doubles as the output projection.
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2's scaled init of residual projections keeps the residual stream's variance flat in depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T = idx.size()
        assert T <= self.config.block_size, f"sequence of {T} exceeds block_size {self.config.block_size}"
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss

    def configure_optimizers(
        self, weight_decay: float, learning_rate: float, betas: tuple[float, float]
    ) -> torch.optim.AdamW:
        # Matrices decay; biases, norms and embeddings' 1-D companions do not (nanoGPT's split).
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, foreach=False)


def count_params(config: GPTConfig) -> int:
    """Parameters of a model with this config, counting the tied embedding once."""
    d, L, V, T = config.n_embd, config.n_layer, config.vocab_size, config.block_size
    bias = config.bias
    per_layer = (
        2 * (d + (d if bias else 0))  # two LayerNorms
        + 3 * d * d + (3 * d if bias else 0)  # qkv
        + d * d + (d if bias else 0)  # attention out
        + 4 * d * d + (4 * d if bias else 0)  # mlp in
        + 4 * d * d + (d if bias else 0)  # mlp out
    )
    return V * d + T * d + L * per_layer + d + (d if bias else 0)


def training_flops_per_token(config: GPTConfig, seq_len: int | None = None) -> float:
    """Forward + backward FLOPs per trained token: 6N for the weights plus 12*L*T*d for attention.

    The PaLM appendix B estimate; N excludes the position embedding, which is a lookup.
    """
    T = seq_len or config.block_size
    n = count_params(config) - config.block_size * config.n_embd
    return 6.0 * n + 12.0 * config.n_layer * T * config.n_embd
