"""Device profiles: how many FLOP/s a worker really delivers, so compute time = FLOPs of a step / effective_flops.

Peak figures are dense (no 2:4 sparsity) in the precision a transformer trains in on that device: bf16 tensor cores
with fp32 accumulation on NVIDIA GPUs (fp16 on the T4), fp32 on Apple GPUs and laptop CPUs.
`mfu` (model FLOPs utilisation) is the fraction of peak that training a transformer typically reaches there; it
absorbs kernel efficiency, memory-bound layers and framework overhead, and is the figure to change when a measured
step time disagrees. `memory_bytes` is one device's memory as its datasheet states it (decimal gigabytes); the
estimate checks that a model's training state fits there.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    peak_flops: float
    mfu: float
    note: str
    memory_bytes: float | None = None  # None: not known (a profile measured from a run)

    @property
    def effective_flops(self) -> float:
        return self.peak_flops * self.mfu


DEVICES: dict[str, DeviceProfile] = {
    # H100 SXM5 datasheet: 989 TFLOP/s dense BF16 (1979 is the 2:4-sparse figure). ~40 % MFU is what well-tuned
    # large-model training reports (PaLM 46 %, Megatron-LM 40-50 % on large GPT runs).
    # Memory: 80 GB HBM3 (H100 SXM datasheet).
    "h100": DeviceProfile("h100", 989e12, 0.40, "NVIDIA H100 SXM, 989 TFLOP/s dense bf16", 80e9),
    # A100 datasheet: 312 TFLOP/s dense BF16 (624 sparse); same MFU reasoning as H100.
    # Memory: 80 GB HBM2e, or 40 GB HBM2 for the first SKU (A100 datasheet).
    "a100": DeviceProfile("a100", 312e12, 0.40, "NVIDIA A100 80GB, 312 TFLOP/s dense bf16", 80e9),
    "a100-40gb": DeviceProfile("a100-40gb", 312e12, 0.40, "NVIDIA A100 40GB, 312 TFLOP/s dense bf16", 40e9),
    # B200 in an HGX/DGX B200 board (1000 W): 2250 TFLOP/s dense BF16, 4500 with 2:4 sparsity (NVIDIA's figures as
    # tabulated at glennklockwood.com/garden/processors/B200); consistent with the DGX B200 datasheet's 72 PFLOP/s
    # sparse FP8 for eight GPUs. MFU as for H100 (no published large-run MFU on B200 was found).
    # Memory: 180 GB HBM3e per GPU (DGX B200 datasheet: 1,440 GB for eight GPUs).
    "b200": DeviceProfile("b200", 2250e12, 0.40, "NVIDIA B200 (HGX), 2250 TFLOP/s dense bf16", 180e9),
    # NVIDIA T4 (Turing, 70 W PCIe) datasheet: 65 TFLOP/s FP16 mixed precision (FP16 multiply, FP32 accumulate),
    # 8.1 TFLOP/s FP32, 16 GB GDDR6 (as tabulated at networkoutlet.com and sysrqmts.com); training on it runs in fp16
    # (Erben et al. 2024, arXiv:2306.03163: "FP16 precision, as the target T4 GPUs have a considerable improvement in
    # FLOPs compared to FP32 (8:1)"). MFU assumed as for the GeForce cards: no published training MFU on T4 was found.
    "t4": DeviceProfile("t4", 65e12, 0.35, "NVIDIA T4, 65 TFLOP/s dense fp16 with fp32 accumulate", 16e9),
    # Ada Lovelace (AD102) whitepaper, RTX 4090: 165.2 TFLOP/s FP16/BF16 tensor with FP32 accumulate, dense. GeForce
    # cards run FP32 accumulate at half the FP16-accumulate rate (330 TFLOP/s), and training uses FP32 accumulate.
    # Lower MFU than datacenter parts: smaller memory and consumer cards usually train smaller, less efficient models.
    # Memory: 24 GB GDDR6X (NVIDIA's RTX 4090 specifications).
    "rtx4090": DeviceProfile("rtx4090", 165.2e12, 0.35, "NVIDIA RTX 4090, 165 TFLOP/s dense bf16 with fp32 accumulate",
                             24e9),
    # Ampere GA102 whitepaper, RTX 3090: 71 TFLOP/s FP16/BF16 tensor with FP32 accumulate, dense (142 with FP16
    # accumulate, same GeForce half-rate rule as the 4090).
    # Memory: 24 GB GDDR6X (NVIDIA's RTX 3090 specifications).
    "rtx3090": DeviceProfile("rtx3090", 71e12, 0.35, "NVIDIA RTX 3090, 71 TFLOP/s dense bf16 with fp32 accumulate",
                             24e9),
    # Apple M2 (10-core GPU): 3.6 TFLOP/s FP32 (Apple's M2 announcement, June 2022). PyTorch's MPS backend reaches a
    # small fraction of that on transformer training, hence the low MFU.
    # Memory: the M2 is sold with 8, 16 or 24 GB of unified memory (shared with the CPU); 16 GB is assumed.
    "apple-m2": DeviceProfile("apple-m2", 3.6e12, 0.15, "Apple M2 10-core GPU via PyTorch MPS, 3.6 TFLOP/s fp32", 16e9),
    # A 4-8 core laptop CPU with AVX2: 6 cores x ~2.6 GHz all-core x 32 fp32 FLOP/cycle (two 256-bit FMA units)
    # ~= 0.5 TFLOP/s. fp32 PyTorch training reaches ~20 % of that, so ~100 GFLOP/s effective.
    # Memory: 16 GB of RAM is assumed (a common laptop configuration, not a datasheet figure).
    "laptop-cpu": DeviceProfile("laptop-cpu", 0.5e12, 0.20, "4-8 core laptop CPU, fp32 PyTorch, ~0.5 TFLOP/s peak",
                                16e9),
}


def get_device(name: str) -> DeviceProfile:
    if name not in DEVICES:
        raise ValueError(f"unknown device {name!r}; known: {', '.join(sorted(DEVICES))}")
    return DEVICES[name]
