"""Codecs for exchanged tensors, delegated to `hivemind.compression`.

A simulated exchange passes every tensor through the same serializer a real hivemind peer uses,
so the loss sees the codec's rounding and the byte count is the size of the real serialized
message, not a formula.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2

_CT = runtime_pb2.CompressionType

# name -> (hivemind compression type, what it is)
CODECS: dict[str, tuple[int, str]] = {
    "none": (_CT.NONE, "float32, uncompressed"),
    "fp16": (_CT.FLOAT16, "IEEE half precision"),
    "scaled-fp16": (_CT.MEANSTD_16BIT, "half precision after mean/std normalisation"),
    "uint8": (_CT.UNIFORM_8BIT, "8-bit uniform quantisation (256 levels between min and max)"),
    "quantile8": (_CT.QUANTILE_8BIT, "8-bit quantisation on the tensor's quantiles"),
    "blockwise8": (_CT.BLOCKWISE_8BIT, "8-bit blockwise quantisation (needs bitsandbytes)"),
}


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


def transmit(tensor: torch.Tensor, codec: str) -> Transmitted:
    """Serialize `tensor` as a hivemind peer would and decode it again, as the receiver sees it."""
    compression_type = CODECS[codec][0]
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
    nbytes = (
        serialize_torch_tensor(indices.to(torch.int32), _CT.NONE).ByteSize()
        + serialize_torch_tensor(values, _CT.NONE).ByteSize()
    )
    dense = torch.zeros_like(flat)
    dense[indices] = values
    return Transmitted(dense.view_as(tensor), nbytes)
