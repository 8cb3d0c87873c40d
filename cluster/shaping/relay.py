"""A userspace shaping relay: a TCP proxy that makes a loopback socket behave like a thin, distant link.

The relay stands in front of one peer's listening address and models that peer's access link (`cluster.network.Link`):
bytes travelling INTO the peer (client -> relay -> peer) cross its *downlink*, bytes coming OUT of it (peer -> relay ->
client) cross its *uplink*. Each direction is one link shared by every connection through the relay, so two clients
downloading from the peer at once split its uplink, as they would on a real access link.

How a chunk crosses a link (the same composition as a real wire and as the alpha-beta cost model): it waits until the
link is free, occupies it for `B * 8 / rate` seconds (serialization; chunks from all connections are serialized in
turn), and arrives `one_way_latency_s` (+ jitter) after its last bit left. Each direction carries the latency once, so
a request/response round trip through the relay adds `2 * one_way_latency_s`. The rate limiter is a token bucket one
chunk or 10 ms of traffic deep (whichever is more): an idle link sends that much at once, like tc's tbf burst, and a
late wake-up is caught up rather than lost.

Jitter is drawn uniformly from [-jitter, +jitter] per chunk (netem's default distribution), clipped so that a chunk
never arrives before the one sent ahead of it on the same connection: TCP would hide reordering anyway, and the byte
stream must stay intact. The draws are seeded per connection (relay seed, accept order, direction).

The reader of each direction is held back until its chunk has been serialized, so TCP flow control pushes back on the
sender exactly as a slow link would. In flight (sent, not yet delivered) the relay holds about what the link would:
rate x (latency + jitter), plus four chunks, at most 64 MiB per direction and connection, which caps a very fast, very
long link at 64 MiB per latency (about 10 Gbit/s at 50 ms).

Pairs of peers: data from peer i to peer j crosses only the relay in front of whichever of them accepted the
connection. To shape a pair as "i's uplink, then j's downlink, latencies summed" chain two relays (a relay may target
another relay) or configure one relay with the pair's figures.

A cut (`set_cut`, a network partition, `cluster.real.partition`): the relay refuses connections from the client
addresses it is given (accepted, then closed at once, before anything is forwarded or counted) and closes the ones it
has with them, both directions at once as on a real cut (either end sees its socket reset or closed); an empty cut
accepts them again. Clients are told apart by their address (host, port), as `cluster.real.accounting` counts them: a
client whose address is not in the cut passes, whoever it is (a machine that joined with `farflung join`, or a peer
dialling from an ephemeral port). Without a cut the relay behaves as if the feature did not exist.
"""

from __future__ import annotations

import asyncio
import math
import random
import threading
from dataclasses import dataclass

from cluster.network import Link

CHUNK_BYTES = 16 * 1024  # small enough that a 1 Mbit/s link still gets a chunk every ~130 ms
# Token-bucket depth: one chunk, or 10 ms of traffic if more. A thread that wakes late (timer granularity, the GIL, a
# busy 2-core host: 5-12 ms seen) spends the credit catching up instead of losing the link time for good.
_BUCKET_S = 0.010
_MAX_IN_FLIGHT_BYTES = 64 * 1024 * 1024


@dataclass
class _Wire:
    """One direction of the link: its rate and when it is next free (event-loop time), shared by all connections."""

    rate_bps: float
    free_at: float = -math.inf

    def serialize(self, nbytes: int, now: float) -> float:
        """Reserve the wire for `nbytes`; return when their last bit has left (never before `now`: credit lets a
        chunk leave at once, not in the past)."""
        depth_s = max(CHUNK_BYTES * 8 / self.rate_bps, _BUCKET_S)
        self.free_at = max(self.free_at, now - depth_s) + nbytes * 8 / self.rate_bps
        return max(self.free_at, now)


class ShapingRelay:
    """Forward TCP connections from `listen_host:listen_port` (0: any free port) to `target`, shaped.

    `inbound_bps` shapes client -> target (the peer's downlink), `outbound_bps` target -> client (its uplink); both
    directions get `one_way_latency_s` and `jitter_s`. `bytes_inbound`/`bytes_outbound` count bytes forwarded.
    """

    def __init__(self, target: tuple[str, int], inbound_bps: float, outbound_bps: float, one_way_latency_s: float = 0.0,
                 jitter_s: float = 0.0, seed: int = 0, listen_host: str = "127.0.0.1", listen_port: int = 0):
        if not (inbound_bps > 0 and outbound_bps > 0):
            raise ValueError(f"relay rates must be above 0 bit/s, got inbound_bps={inbound_bps}, "
                             f"outbound_bps={outbound_bps}")
        if not (one_way_latency_s >= 0 and jitter_s >= 0):
            raise ValueError(f"relay latency and jitter must be at least 0 s, got one_way_latency_s="
                             f"{one_way_latency_s}, jitter_s={jitter_s}")
        self.target = target
        self.one_way_latency_s = one_way_latency_s
        self.jitter_s = jitter_s
        self.seed = seed
        self.bytes_inbound = 0
        self.bytes_outbound = 0
        self._listen = (listen_host, listen_port)
        self._wires = {"inbound": _Wire(inbound_bps), "outbound": _Wire(outbound_bps)}
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._accepted = 0
        self.cut: frozenset[tuple[str, int]] = frozenset()  # client addresses refused (`set_cut`)
        self.refused = 0  # connections refused by a cut
        self._client_of_task: dict[asyncio.Task, tuple[str, int]] = {}

    @classmethod
    def from_link(cls, link: Link, target: tuple[str, int], seed: int = 0, listen_host: str = "127.0.0.1",
                  listen_port: int = 0) -> "ShapingRelay":
        """A relay in front of a peer whose access link is `link` (loss is not modelled: TCP would hide it as delay)."""
        return cls(target, inbound_bps=link.downlink_bps, outbound_bps=link.uplink_bps,
                   one_way_latency_s=link.one_way_latency_s, jitter_s=link.jitter_s, seed=seed,
                   listen_host=listen_host, listen_port=listen_port)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, *self._listen)

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None, "start() the relay first"
        return self._server.sockets[0].getsockname()[:2]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def set_cut(self, clients) -> int:
        """Refuse the clients at these addresses from now on and close the connections this relay has with them (an
        empty set lifts the cut); returns how many open connections were closed."""
        self.cut = frozenset((str(h), int(p)) for h, p in clients)
        doomed = [t for t, c in self._client_of_task.items() if c in self.cut]
        for task in doomed:
            task.cancel()  # its `finally` closes both ends
        await asyncio.gather(*doomed, return_exceptions=True)
        return len(doomed)

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        peer = client_writer.get_extra_info("peername")
        client = (str(peer[0]), int(peer[1]))
        if client in self.cut:
            self.refused += 1
            client_writer.close()  # before dialling the target: the peer behind the relay never hears of it
            return
        task = asyncio.current_task()
        self._tasks.add(task)
        self._client_of_task[task] = client
        index, self._accepted = self._accepted, self._accepted + 1
        target_writer = None
        try:
            target_reader, target_writer = await asyncio.open_connection(*self.target)
            async with asyncio.TaskGroup() as group:  # one direction failing ends the other
                group.create_task(self._pump(client_reader, target_writer, "inbound",
                                             random.Random(f"{self.seed}:{index}:in")))
                group.create_task(self._pump(target_reader, client_writer, "outbound",
                                             random.Random(f"{self.seed}:{index}:out")))
        except* (ConnectionError, OSError):
            pass  # either end went away; closing the other end below tells its owner
        except* asyncio.CancelledError:
            pass  # close(): this task is the connection's top level; Python 3.11's stream callback chokes on a re-raise
        finally:
            self._tasks.discard(task)
            self._client_of_task.pop(task, None)
            for writer in (client_writer, target_writer):
                if writer is not None:
                    writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str,
                    rng: random.Random) -> None:
        """Carry one direction of one connection: serialize on the shared wire, then deliver after the latency."""
        wire = self._wires[direction]
        # Hold what the link itself would hold (rate x delay) plus a little slack, so a receiver that stops reading
        # stalls the sender about as soon as on a real link instead of after a large relay buffer fills.
        pipe_bytes = min(wire.rate_bps / 8 * (self.one_way_latency_s + self.jitter_s), _MAX_IN_FLIGHT_BYTES)
        in_flight = math.ceil(pipe_bytes / CHUNK_BYTES) + 4
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(maxsize=in_flight)
        async with asyncio.TaskGroup() as group:  # a receiver that goes away also stops the reading side
            group.create_task(self._deliver(queue, writer, direction))
            group.create_task(self._serialize(reader, queue, wire, rng))

    async def _serialize(self, reader: asyncio.StreamReader, queue: asyncio.Queue, wire: _Wire,
                         rng: random.Random) -> None:
        loop = asyncio.get_running_loop()
        last_arrival = -math.inf
        while True:
            data = await reader.read(CHUNK_BYTES)
            now = loop.time()
            sent = wire.serialize(len(data), now) if data else now
            delay = self.one_way_latency_s + (rng.uniform(-self.jitter_s, self.jitter_s) if self.jitter_s else 0.0)
            last_arrival = max(last_arrival, sent + max(0.0, delay))
            await queue.put((last_arrival, data))  # b"" marks the end of the stream
            if not data:
                return
            if sent > loop.time():
                await asyncio.sleep(sent - loop.time())

    async def _deliver(self, queue: asyncio.Queue, writer: asyncio.StreamWriter, direction: str) -> None:
        loop = asyncio.get_running_loop()
        while True:
            arrival, data = await queue.get()
            if arrival > loop.time():
                await asyncio.sleep(arrival - loop.time())
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()  # half-close: the other direction may still be talking
                return
            # Counted when handed to the far socket, so a receiver that has the bytes always sees them counted.
            if direction == "inbound":
                self.bytes_inbound += len(data)
            else:
                self.bytes_outbound += len(data)
            writer.write(data)
            await writer.drain()


class RelayThread:
    """Run a `ShapingRelay` on its own event loop in a daemon thread, for synchronous callers (Ray actors, tests).

    `with RelayThread(ShapingRelay(target, ...)) as relay: connect(relay.address)`; counters are on `relay.relay`.
    """

    def __init__(self, relay: ShapingRelay, timeout_s: float = 10.0, namespace: str | None = None):
        self.relay = relay
        self.timeout_s = timeout_s  # binding and closing a local socket; anything slower is a bug, not the network
        self.namespace = namespace  # a network namespace (cluster.shaping.fabric) the relay's sockets live in
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="shaping-relay", daemon=True)

    def _run(self) -> None:
        if self.namespace is None:
            self._loop.run_forever()
            return
        from cluster.shaping.fabric import in_namespace

        with in_namespace(self.namespace):  # this thread only: every socket the loop opens is in the namespace
            self._loop.run_forever()

    @property
    def address(self) -> tuple[str, int]:
        return self.relay.address

    def set_cut(self, clients) -> int:
        """`ShapingRelay.set_cut` from another thread; returns how many open connections it closed."""
        return asyncio.run_coroutine_threadsafe(self.relay.set_cut(clients), self._loop).result(self.timeout_s)

    def start(self) -> "RelayThread":
        try:
            if self.namespace is not None:
                from cluster.shaping.fabric import require_namespace

                require_namespace(self.namespace)  # fail here, in one line, not as a timeout waiting on the thread
            self._thread.start()
            asyncio.run_coroutine_threadsafe(self.relay.start(), self._loop).result(self.timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self._loop.is_closed():
            return
        if self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(self.relay.close(), self._loop).result(self.timeout_s)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(self.timeout_s)
        self._loop.close()

    def __enter__(self) -> "RelayThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
