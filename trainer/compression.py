"""Codecs for exchanged tensors, delegated to `hivemind.compression`.

A simulated exchange passes every tensor through the same serializer a real hivemind peer uses,
so the loss sees the codec's rounding and the byte count is the size of the real serialized
message, not a formula. `CODECS` is the one table of them: the simulator serializes with each
codec's hivemind compression type, the real mode hands its class to hivemind's averagers and
Optimizer, and the experiment file accepts its names. Top-k (`topk:FRACTION`) is the one sparse
codec: hivemind's all-reduce has no counterpart, so it runs in the simulator only.
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Codec:
    """A dense codec: every element is sent, each in fewer bits (or as float32)."""

    class_name: str  # of the `hivemind.compression` class that hivemind's averagers and Optimizer are given
    help: str

    @property
    def hivemind(self) -> type:
        return getattr(importlib.import_module("hivemind.compression"), self.class_name)

    @property
    def compression_type(self) -> int:
        """hivemind's CompressionType, which `serialize_torch_tensor` takes."""
        return self.hivemind.compression_type


CODECS: dict[str, Codec] = {
    "none": Codec("NoCompression", "float32, uncompressed"),
    "fp16": Codec("Float16Compression", "IEEE half precision"),
    "scaled-fp16": Codec("ScaledFloat16Compression", "half precision after mean/std normalisation"),
    "uint8": Codec("Uniform8BitQuantization", "8-bit uniform quantisation (256 levels between min and max)"),
    "quantile8": Codec("Quantile8BitQuantization", "8-bit quantisation on the tensor's quantiles"),
    "blockwise8": Codec("BlockwiseQuantization", "8-bit blockwise quantisation (needs bitsandbytes)"),
}
TOPK_HELP = "the largest FRACTION of entries with error feedback, sent as index/value pairs by all-gather"


@dataclass(frozen=True)
class Transmitted:
    tensor: torch.Tensor  # what the receiver decodes
    nbytes: int  # size of the serialized message on the wire


def topk_fraction(name: str) -> float | None:
    """The kept fraction of a top-k codec name such as 'topk:0.01', or None for a dense codec."""
    if not name.startswith("topk:"):
        return None
    try:
        fraction = float(name.split(":", 1)[1])
    except ValueError:
        fraction = -1.0
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"codec {name!r}: top-k takes the kept fraction in (0, 1], e.g. 'topk:0.01'")
    return fraction


def check_codec(name: str) -> None:
    """Raise ValueError naming the allowed codecs, or the missing package, before a run starts."""
    if not isinstance(name, str):
        raise ValueError(f"must be a codec name, got {name!r}")
    if topk_fraction(name) is not None:
        return
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; known: {', '.join(CODECS)}, topk:FRACTION (e.g. topk:0.01)")
    if name == "blockwise8":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ValueError("codec 'blockwise8' needs bitsandbytes: pip install bitsandbytes, or use 'uint8'") from None


def hivemind_compression(name: str):
    """The compression a real peer's averager or hivemind.Optimizer applies for a dense codec."""
    assert name in CODECS, f"codec {name!r} is not dense; check_real_arm refuses it before any peer starts"
    return CODECS[name].hivemind()


def _varint_len(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def tensor_message_nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Serialized size of hivemind's uncompressed `runtime_pb2.Tensor` for a tensor of this shape and dtype.

    The message (hivemind/proto/runtime.proto) sets `buffer` (field 1, the raw bytes), `size` (field 2, packed
    uint32 dimensions) and `dtype` (field 4, e.g. "float32"); `requires_grad`, `compression` (NONE) and `chunks` are
    at their defaults, which proto3 does not write. Each written field is a one-byte tag, a varint length and the
    payload. bfloat16, which hivemind sends as float32 by default, never reaches here.
    """
    assert dtype != torch.bfloat16
    numel = 1
    for d in shape:
        numel *= d
    n = numel * torch.empty((), dtype=dtype).element_size()
    total = 1 + _varint_len(n) + n if n else 0
    if shape:
        dims = sum(_varint_len(d) for d in shape)
        total += 1 + _varint_len(dims) + dims
    name = str(dtype).replace("torch.", "")
    return total + 1 + _varint_len(len(name)) + len(name)


def transmit(tensor: torch.Tensor, codec: str) -> Transmitted:
    """Serialize `tensor` as a hivemind peer would and decode it again, as the receiver sees it."""
    if codec == "none" and tensor.dtype != torch.bfloat16:
        # hivemind's NoCompression sends the raw bytes, and the receiver decodes a copy of the same values.
        return Transmitted(tensor.detach().clone(), tensor_message_nbytes(tuple(tensor.shape), tensor.dtype))
    from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor

    compression_type = CODECS[codec].compression_type
    with warnings.catch_warnings():
        # hivemind's 8-bit codecs use torch.quantize_per_tensor, which warns on every call.
        warnings.simplefilter("ignore")
        message = serialize_torch_tensor(tensor.detach(), compression_type)
        decoded = deserialize_torch_tensor(message)
    return Transmitted(decoded.to(tensor.dtype), message.ByteSize())


def transmit_topk(tensor: torch.Tensor, fraction: float) -> Transmitted:
    """Send the largest-magnitude `fraction` of entries as (int32 index, float32 value) pairs.

    The receiver rebuilds a dense tensor with zeros elsewhere. Sparse messages cannot be summed on
    the way, so they travel by all-gather; the byte count is both serialized tensors.
    """
    flat = tensor.detach().reshape(-1)
    k = max(1, int(round(fraction * flat.numel())))
    indices = torch.topk(flat.abs(), k, sorted=False).indices.sort().values
    values = flat[indices]
    nbytes = tensor_message_nbytes((k,), torch.int32) + tensor_message_nbytes((k,), values.dtype)
    dense = torch.zeros_like(flat)
    dense[indices] = values
    return Transmitted(dense.view_as(tensor), nbytes)
