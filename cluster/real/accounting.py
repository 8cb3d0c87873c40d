"""Bytes on the wire in the real mode, counted by the shaping relay in front of each peer, per connecting peer.

Every peer announces only its relay's address, so every libp2p connection between two peers crosses exactly one relay:
the one in front of the peer that accepted it. That relay sees both directions of the connection. libp2p's TCP
transport dials from its own listening port (SO_REUSEPORT), so the relay can tell which peer dialled in: the client's
address is the dialler's p2p listening address. With the counts split by client, every byte is credited to the peer
that sent it and the peer that received it:

    relay of peer i, connection from peer c:  inbound  bytes (c -> i): c sent them, i received them
                                              outbound bytes (i -> c): i sent them, c received them

What is counted is the TCP payload forwarded by the relays: the averaged tensor parts, and also everything else the two
libp2p daemons say on that connection while the counters run (TLS/Noise and yamux framing, matchmaking and DHT RPCs,
identify and ping). Not counted: IP/TCP headers, traffic on a connection that bypasses every relay (none, as long as
peers dial only announced addresses), and nothing is double-counted. A client address that matches no peer (a dial from
an ephemeral port, e.g. across a NAT) still counts for the relay's own peer; its other side is reported as unattributed.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cluster.shaping.relay import ShapingRelay

Address = tuple[str, int]
# Per relay: client address -> (bytes inbound to the relay's peer, bytes outbound from it)
Counters = Mapping[Address, tuple[int, int]]


class _CountingWriter:
    """Wraps the stream writer of one direction of one connection and adds what is handed to it to a counter."""

    def __init__(self, writer, counts: list[int], index: int):
        self._writer, self._counts, self._index = writer, counts, index

    def write(self, data: bytes) -> None:
        if self._writer.is_closing():
            # asyncio's streams drop such a write silently, uvloop's (hivemind installs uvloop in its processes) raise
            # RuntimeError, which the relay would not recognise as "the far end went away".
            raise ConnectionResetError("the far end of the relayed connection is closed")
        self._counts[self._index] += len(data)
        self._writer.write(data)

    def __getattr__(self, name: str):
        return getattr(self._writer, name)


class CountingRelay(ShapingRelay):
    """A `ShapingRelay` that also counts forwarded bytes per client address (the relay's totals are unchanged).

    Counted at the same moment as the relay's own totals: when a chunk is handed to the far socket.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._by_client: dict[Address, list[int]] = {}
        self._client_of: dict[int, Address] = {}  # id(stream reader or writer of the client side) -> client address
        self._lock = threading.Lock()  # the relay thread adds clients while the owner takes snapshots

    async def _accept(self, client_reader, client_writer) -> None:
        host, port = client_writer.get_extra_info("peername")[:2]
        client = (str(host), int(port))
        with self._lock:
            self._by_client.setdefault(client, [0, 0])
        self._client_of[id(client_reader)] = self._client_of[id(client_writer)] = client
        try:
            await super()._accept(client_reader, client_writer)
        finally:
            self._client_of.pop(id(client_reader), None)
            self._client_of.pop(id(client_writer), None)

    async def _pump(self, reader, writer, direction: str, rng) -> None:
        # inbound pumps client_reader -> target; outbound pumps target -> client_writer
        client = self._client_of[id(reader) if direction == "inbound" else id(writer)]
        counts = self._by_client[client]
        await super()._pump(reader, _CountingWriter(writer, counts, 0 if direction == "inbound" else 1), direction, rng)

    def snapshot(self) -> dict[Address, tuple[int, int]]:
        """Cumulative (inbound, outbound) bytes per client address since the relay started."""
        with self._lock:
            return {client: (c[0], c[1]) for client, c in self._by_client.items()}


@dataclass(frozen=True)
class RoundBytes:
    bytes_sent: tuple[int, ...]  # per peer
    bytes_received: tuple[int, ...]
    unattributed: int  # bytes whose far end matched no peer's dial address (counted for the near end only)


def counters_delta(before: Counters, after: Counters) -> dict[Address, tuple[int, int]]:
    return {c: (a[0] - before.get(c, (0, 0))[0], a[1] - before.get(c, (0, 0))[1]) for c, a in after.items()}


def attribute(deltas: Sequence[Counters], dial_addresses: Sequence[Address],
              former: Mapping[Address, int] | None = None) -> RoundBytes:
    """Credit each relay's per-client byte counts to sender and receiver; `deltas[i]` is peer i's relay. `former`:
    the dial addresses a worker had before it was restarted (a connection from them may still be counted)."""
    assert len(deltas) == len(dial_addresses)
    n = len(deltas)
    peer_of = {tuple(a): i for a, i in (former or {}).items()} | {tuple(a): i for i, a in enumerate(dial_addresses)}
    sent, received, unattributed = [0] * n, [0] * n, 0
    for i, by_client in enumerate(deltas):
        for client, (inbound, outbound) in by_client.items():
            received[i] += inbound
            sent[i] += outbound
            c = peer_of.get(tuple(client))
            if c is None:
                unattributed += inbound + outbound
            else:
                sent[c] += inbound
                received[c] += outbound
    return RoundBytes(tuple(sent), tuple(received), unattributed)
