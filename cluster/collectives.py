"""Alpha-beta costs of collectives over a `Network`: how long an exchange takes and how many bytes each worker moves.

Pure functions; nothing here sleeps or opens a socket. The virtual clock adds `time_s`, the metrics record the bytes.
Loss is not modelled (no retransmissions): a link's `loss` matters only to the real, shaped mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from cluster.network import Network


@dataclass(frozen=True)
class CollectiveCost:
    """Duration of one collective and the bytes each participant sent and received, in participant order."""

    time_s: float
    bytes_sent: tuple[int, ...]
    bytes_received: tuple[int, ...]


def _check(network: Network, participants: Sequence[int], nbytes: int) -> None:
    assert len(participants) >= 1, "a collective needs at least one participant"
    assert len(set(participants)) == len(participants), f"participants repeat: {list(participants)}"
    assert all(0 <= p < network.n_workers for p in participants), f"participants {list(participants)} not in network"
    assert nbytes >= 0, f"nbytes must be >= 0, got {nbytes}"


def _has_jitter(network: Network, pairs: list[tuple[int, int]]) -> bool:
    return any(network.pair_jitter_s(a, b) > 0 for a, b in pairs)


def _jittered_latency(network: Network, pairs: list[tuple[int, int]], rng: np.random.Generator) -> float:
    """One latency term: the slowest pair, each pair's delay pushed up by |N(0, pair jitter)|."""
    latency = np.array([network.pair_latency_s(a, b) for a, b in pairs])
    jitter = np.array([network.pair_jitter_s(a, b) for a, b in pairs])
    return float(np.max(latency + np.abs(rng.normal(0.0, jitter))))


def ring_allreduce(
    network: Network, participants: Sequence[int], nbytes: int, rng: np.random.Generator | None = None
) -> CollectiveCost:
    """Ring all-reduce (reduce-scatter, then all-gather) over `participants` in the order given.

    With N participants, S = nbytes:

        time_s = 2(N-1)/N * 8S / B  +  2(N-1) * alpha

    B = min over participants of min(uplink_bps, downlink_bps): every step moves one chunk over every ring hop at
    once, so the slowest link bounds each step. alpha = max over ring hops k -> k+1 (mod N) of the one-way pair
    latency, for the same reason. With `rng` and nonzero jitter, each of the 2(N-1) latency terms is instead drawn as
    max over hops of (pair latency + |N(0, pair jitter)|).

    Bytes: the tensor is cut into N chunks, the first S mod N of them one byte larger than S // N. In reduce-scatter
    step t participant k sends chunk (k - t) mod N to k+1; in all-gather step t it sends chunk (k + 1 - t) mod N.
    Each participant therefore sends every chunk but (k+1) mod N, then every chunk but (k+2) mod N:
    sent_k = 2S - c[(k+1) mod N] - c[(k+2) mod N], and receives exactly what its predecessor sent.
    N = 1 costs nothing.
    """
    _check(network, participants, nbytes)
    n = len(participants)
    if n == 1:
        return CollectiveCost(0.0, (0,), (0,))

    chunks = [nbytes // n + (1 if i < nbytes % n else 0) for i in range(n)]
    # The schedule summed in closed form, so that estimate mode can ask about thousands of workers.
    sent = [2 * nbytes - chunks[(k + 1) % n] - chunks[(k + 2) % n] for k in range(n)]
    received = [sent[(k - 1) % n] for k in range(n)]

    links = [network.links[p] for p in participants]
    bottleneck_bps = min(min(link.uplink_bps, link.downlink_bps) for link in links)
    hops = [(participants[k], participants[(k + 1) % n]) for k in range(n)]
    alpha = max(network.pair_latency_s(a, b) for a, b in hops)

    bandwidth_s = 2 * (n - 1) / n * nbytes * 8 / bottleneck_bps
    steps = 2 * (n - 1)
    # Without jitter the generator is left untouched, so the cost is exactly the closed formula.
    if rng is not None and _has_jitter(network, hops):
        latency_s = sum(_jittered_latency(network, hops, rng) for _ in range(steps))
    else:
        latency_s = steps * alpha
    return CollectiveCost(bandwidth_s + latency_s, tuple(sent), tuple(received))


def broadcast(
    network: Network,
    participants: Sequence[int],
    root: int,
    nbytes: int,
    rng: np.random.Generator | None = None,
) -> CollectiveCost:
    """The root (a worker index among `participants`) sends the whole payload to every other participant directly.

    This is a star: a parameter server pushing parameters, or a peer serving its state to one that joins. With N
    participants, S = nbytes, receivers r:

        time_s = max((N-1) * 8S / root.uplink_bps,  max_r 8S / r.downlink_bps)  +  max_r pair_latency(root, r)

    The root's uplink carries all N-1 copies; each receiver's downlink carries one. With `rng` and nonzero jitter the
    latency term is max_r (pair latency + |N(0, pair jitter)|). Bytes: the root sends (N-1)S, each receiver gets S.
    """
    _check(network, participants, nbytes)
    assert root in participants, f"root {root} is not among participants {list(participants)}"
    receivers = [p for p in participants if p != root]
    sent = tuple((len(receivers) * nbytes) if p == root else 0 for p in participants)
    received = tuple(0 if p == root else nbytes for p in participants)
    if not receivers:
        return CollectiveCost(0.0, sent, received)

    bits = nbytes * 8
    transfer_s = max(len(receivers) * bits / network.links[root].uplink_bps,
                     max(bits / network.links[r].downlink_bps for r in receivers))
    pairs = [(root, r) for r in receivers]
    if rng is not None and _has_jitter(network, pairs):
        latency_s = _jittered_latency(network, pairs, rng)
    else:
        latency_s = max(network.pair_latency_s(root, r) for r in receivers)
    return CollectiveCost(transfer_s + latency_s, sent, received)
