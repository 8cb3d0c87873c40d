"""Link shaping for the real mode: make real sockets as thin and as far apart as the configured `Link`s.

Two backends, chosen by the experiment's `shaping` setting:
- `relay`: a userspace asyncio TCP proxy in front of each peer (`relay.ShapingRelay`); works on any OS without root.
- `kernel`: a Linux network namespace per peer behind a tc-shaped veth pair (`kernel.NamespaceLink` for one link,
  `fabric.NamespaceSwitch` for a swarm's peers on one bridge); needs root, and netem in the kernel for latency,
  jitter and loss.

`verify` moves bytes through a shaped link and compares the wall time with what the link should take, so a run can
check (and its manifest can record) that the shaping does what it claims.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass

from cluster.shaping import probe
from cluster.shaping.kernel import (NamespaceLink, ShapingUnavailable, kernel_shaping_available,
                                    netem_available)
from cluster.shaping.relay import CHUNK_BYTES, RelayThread, ShapingRelay

BACKENDS = ("relay", "kernel")

__all__ = ["BACKENDS", "NamespaceLink", "RelayThread", "ShapingRelay", "ShapingUnavailable", "VerifyResult", "describe",
           "kernel_shaping_available", "netem_available", "verify"]


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown shaping backend {backend!r}; known: {', '.join(BACKENDS)}")


def describe(backend: str) -> str:
    """One line for a run manifest: which mechanism shapes the links, and what it can and cannot do here."""
    _check_backend(backend)
    if backend == "relay":
        return (f"relay: userspace asyncio TCP proxy per peer, token-bucket rate per direction in "
                f"{CHUNK_BYTES // 1024} KiB chunks, per-chunk one-way delay and seeded order-preserving jitter; "
                "loss not modelled")
    available, reason = kernel_shaping_available()
    kernel = f"Linux {platform.release()}"
    if not available:
        return f"kernel: unavailable on {kernel} ({reason})"
    delay = "netem delay/jitter/loss" if netem_available() else "no netem, so no delay/jitter/loss"
    return f"kernel: network namespace per peer, veth pair with tc tbf rate limiting on both ends, {delay} ({kernel})"


@dataclass(frozen=True)
class VerifyResult:
    """A timed transfer through a shaped link. `expected_seconds` counts the latency twice (data, then its ack)."""

    seconds: float
    expected_seconds: float
    throughput_bps: float  # nbytes * 8 / seconds: goodput over the whole exchange, latency included
    mechanism: str

    @property
    def ratio(self) -> float:
        return self.seconds / self.expected_seconds


def verify(backend: str, rate_bps: float, latency_s: float, nbytes: int) -> VerifyResult:
    """Move `nbytes` through a link shaped to `rate_bps` and one-way `latency_s`; time it from the first byte sent
    until the receiver's acknowledgement is back (see `probe` for why that crosses the latency twice).

    relay: sink, relay and sender on loopback. kernel: sink in a fresh namespace, sender on the host.
    """
    _check_backend(backend)
    if nbytes < 1:
        raise ValueError(f"nbytes must be at least 1, got {nbytes}")
    timed = probe.time_relay if backend == "relay" else probe.time_kernel
    seconds = timed(rate_bps, latency_s, nbytes)
    return VerifyResult(seconds=seconds, expected_seconds=probe.expected_seconds(nbytes, rate_bps, latency_s),
                        throughput_bps=nbytes * 8 / seconds, mechanism=describe(backend))
