"""Device profiles: how many FLOP/s a worker really delivers, so compute time = FLOPs of a step / effective_flops.

Peak figures are dense (no 2:4 sparsity) in the precision a transformer trains in on that device: bf16 tensor cores
with fp32 accumulation on NVIDIA GPUs, fp32 on Apple GPUs and laptop CPUs. `mfu` (model FLOPs utilisation) is the
fraction of peak that training a transformer typically reaches there; it absorbs kernel efficiency, memory-bound
layers and framework overhead, and is the figure to change when a measured step time disagrees.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    peak_flops: float
    mfu: float
    note: str

    @property
    def effective_flops(self) -> float:
        return self.peak_flops * self.mfu


DEVICES: dict[str, DeviceProfile] = {
    # H100 SXM5 datasheet: 989 TFLOP/s dense BF16 (1979 is the 2:4-sparse figure). ~40 % MFU is what well-tuned
    # large-model training reports (PaLM 46 %, Megatron-LM 40-50 % on large GPT runs).
    "h100": DeviceProfile("h100", 989e12, 0.40, "NVIDIA H100 SXM, 989 TFLOP/s dense bf16"),
    # A100 datasheet: 312 TFLOP/s dense BF16 (624 sparse); same MFU reasoning as H100.
    "a100": DeviceProfile("a100", 312e12, 0.40, "NVIDIA A100, 312 TFLOP/s dense bf16"),
    # Ada Lovelace (AD102) whitepaper, RTX 4090: 165.2 TFLOP/s FP16/BF16 tensor with FP32 accumulate, dense. GeForce
    # cards run FP32 accumulate at half the FP16-accumulate rate (330 TFLOP/s), and training uses FP32 accumulate.
    # Lower MFU than datacenter parts: smaller memory and consumer cards usually train smaller, less efficient models.
    "rtx4090": DeviceProfile("rtx4090", 165.2e12, 0.35, "NVIDIA RTX 4090, 165 TFLOP/s dense bf16 with fp32 accumulate"),
    # Ampere GA102 whitepaper, RTX 3090: 71 TFLOP/s FP16/BF16 tensor with FP32 accumulate, dense (142 with FP16
    # accumulate, same GeForce half-rate rule as the 4090).
    "rtx3090": DeviceProfile("rtx3090", 71e12, 0.35, "NVIDIA RTX 3090, 71 TFLOP/s dense bf16 with fp32 accumulate"),
    # Apple M2 (10-core GPU): 3.6 TFLOP/s FP32 (Apple's M2 announcement, June 2022). PyTorch's MPS backend reaches a
    # small fraction of that on transformer training, hence the low MFU.
    "apple-m2": DeviceProfile("apple-m2", 3.6e12, 0.15, "Apple M2 10-core GPU via PyTorch MPS, 3.6 TFLOP/s fp32"),
    # A 4-8 core laptop CPU with AVX2: 6 cores x ~2.6 GHz all-core x 32 fp32 FLOP/cycle (two 256-bit FMA units)
    # ~= 0.5 TFLOP/s. fp32 PyTorch training reaches ~20 % of that, so ~100 GFLOP/s effective.
    "laptop-cpu": DeviceProfile("laptop-cpu", 0.5e12, 0.20, "4-8 core laptop CPU, fp32 PyTorch, ~0.5 TFLOP/s peak"),
}


def get_device(name: str) -> DeviceProfile:
    if name not in DEVICES:
        raise ValueError(f"unknown device {name!r}; known: {', '.join(sorted(DEVICES))}")
    return DEVICES[name]
