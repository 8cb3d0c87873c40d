"""One real peer: a replica that trains, and a hivemind DHT + averager that average its exchanges over real sockets.

The replica is the simulator's (`trainer.replica.Replica`, same `ReplicaSpec`), driven with the same
`advance(until_step, reply, finish)` protocol. What changes is who answers a blocking `Exchange`: the tensor never
leaves this process for a driver; the peer copies it into its averager's shared tensor, runs one hivemind all-reduce
with every other peer (`DecentralizedAverager.step`), and hands the average back to the strategy on the next `advance`.
Time is the wall clock, bytes are what the shaping relay in front of this peer forwarded (`cluster.real.accounting`).

Wiring of one peer (every address on `options.host`, loopback by default):

    other peers --> relay (announced, shaped to this worker's Link) --> p2pd (DHT + averager) <-- this process
    this p2pd   --> the other peers' relays (dials go from p2pd's own listening port: SO_REUSEPORT)

With kernel shaping (`options.shaping == "kernel"`) the driver has built a network namespace per peer
(`cluster.shaping.fabric.NamespaceSwitch`) and hands the peer its `NamespacePort`: the relay's thread and the DHT's
process (so its p2pd) live in that namespace and use its address, and the relay only counts (tc shapes the veth).
hivemind's processes talk to p2pd over a Unix socket, which crosses namespaces, so nothing else moves.

The class is plain Python; `cluster.real.runtime` wraps it in `ray.remote`. It starts two hivemind processes (the DHT
with its p2pd, and the averager); `shutdown` stops them and, should any outlive their grace period, kills them by pid.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time

import numpy as np
import torch

from cluster.network import Link
from cluster.real.accounting import Address, CountingRelay
from cluster.real.messages import ExchangeOutcome, MeasuredStep, PendingExchange
from cluster.real.options import AveragingTimeouts, RealOptions, part_size_bytes
from cluster.real.processes import authorizer, process_tree
from cluster.shaping.fabric import NamespacePort, in_namespace
from cluster.shaping.relay import RelayThread
from trainer.compression import hivemind_compression
from trainer.replica import AwaitRequest, ExchangeRequest, Replica, ReplicaSpec, ReportRequest, StepDone

READY_KEY = "{run_id}_peers"  # DHT key under which every peer of a run lists its announced multiaddrs, by worker


class _Quiet(logging.Filter):
    """hivemind warns on every non-power-of-two group size; the real mode groups all N workers on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "power of 2" not in record.getMessage()


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def resolve_host(host: str) -> str:
    """`options.host`, with "auto" meaning the address of the Ray node this peer runs on (how peers on different
    machines of a Ray cluster reach each other)."""
    if host != "auto":
        return host
    import ray

    return ray.util.get_node_ip_address()


def _ray_node_id() -> str:
    """The Ray node this process runs on ("" outside Ray: a peer that joined from elsewhere)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # not in a Ray worker
        return ""


class RealPeer:
    """Built in two steps so that a driver can build every peer at once and only then join them into one swarm:
    `RealPeer(...)` builds the replica and starts the relay; `join(initial_peers)` starts the DHT (None: this peer is
    the swarm's first); `start_averaging` starts the averager."""

    def __init__(self, spec: ReplicaSpec, link: Link, options: RealOptions, run_id: str,
                 port: NamespacePort | None = None):
        logging.getLogger("hivemind.averaging.key_manager").addFilter(_Quiet())
        self.spec, self.options, self.run_id, self.port = spec, options, run_id, port
        self.dht = self.averager = self.relay = self.gloo = None
        self._owned: list = []  # the hivemind processes this peer started (psutil handles), for shutdown's last resort
        self._pending: ExchangeRequest | None = None
        self.group_size = spec.n_workers  # the workers of this peer's rounds (fewer while some are gone)
        self._reply: np.ndarray | None = None
        self._next_step = 0
        self._exchanges_started = 0  # the fault hook's clock (options.drop_parts_at): exchanges, not attempts
        self._step_compute_s = 0.0
        self._arrived_s = self._idle_s = self._comm_started_s = 0.0
        self.start_clock()
        try:
            self.replica = Replica(spec)
            host = self.host = port.address if port is not None else resolve_host(options.host)
            with self._in_namespace():
                self._p2p_port = _free_port(host)
            self.dial_address: Address = (host, self._p2p_port)  # where this p2pd's outgoing connections come from
            relay = CountingRelay.from_link(options.relay_link(link), (host, self._p2p_port),
                                            seed=spec.seed * 1009 + spec.worker, listen_host=host)
            self.relay = RelayThread(relay, namespace=None if port is None else port.namespace).start()
        except BaseException:
            self.shutdown()
            raise

    # --- swarm ---------------------------------------------------------------------------------
    def join(self, initial_peers: list[str] | None, client_mode: bool = False) -> list[str]:
        """Start the DHT (and its p2pd) behind the relay; returns this peer's announced multiaddrs.

        A client-mode peer (behind NAT) accepts no connections: it announces nothing and its relay stays unused."""
        import hivemind

        host = self.host
        self.dht = hivemind.DHT(
            initial_peers=initial_peers, start=False, host_maddrs=[f"/ip4/{host}/tcp/{self._p2p_port}"],
            announce_maddrs=[] if client_mode else [f"/ip4/{host}/tcp/{self.relay.address[1]}"],
            client_mode=client_mode, authorizer=authorizer(self.options.secret),
        )
        try:  # started only once it is held here, so that shutdown can stop it even if it fails to come up
            with self._in_namespace():  # the DHT process is forked from this thread, p2pd from it
                self.dht.run_in_background(await_ready=True, timeout=self.options.startup_timeout_s)
        finally:
            self._owned += process_tree(self.dht.pid)
        from cluster.real.probe import serve_probe

        serve_probe(self.dht)  # `farflung doctor` elsewhere can measure its link to this peer
        return self.visible_maddrs()

    def _in_namespace(self):
        """This thread in the peer's namespace (kernel shaping) for the body, or nothing happens."""
        return contextlib.nullcontext() if self.port is None else in_namespace(self.port.namespace)

    def visible_maddrs(self) -> list[str]:
        return [str(m) for m in self.dht.get_visible_maddrs()]

    def start_averaging(self, timeouts: AveragingTimeouts, bandwidth_mbps: float | None) -> int:
        """Start the averager over one flat float32 tensor the size of the model; returns that size."""
        n = self.spec.n_workers
        self.timeouts = timeouts
        self.averager = self._averager_class()(
            [torch.zeros(self.replica.num_params(), dtype=torch.float32)], self.dht, prefix=self.run_id,
            target_group_size=n, min_group_size=n, min_matchmaking_time=timeouts.min_matchmaking_time_s,
            request_timeout=timeouts.request_timeout_s, allreduce_timeout=timeouts.allreduce_timeout_s,
            next_chunk_timeout=timeouts.next_chunk_timeout_s,
            compression=hivemind_compression(self.spec.codec), bandwidth=bandwidth_mbps, allow_state_sharing=False,
            part_size_bytes=part_size_bytes(4 * self.replica.num_params(), n), start=False,
        )
        from cluster.real.secret import secret_schema_hash

        # Matchmaking refuses a peer whose schema hash differs: bound to the run secret, it shuts outsiders out.
        self.averager.schema_hash = secret_schema_hash(self.averager.schema_hash, self.options.secret)
        try:
            self.averager.run_in_background(await_ready=True, timeout=self.options.startup_timeout_s)
        finally:
            self._owned += process_tree(self.averager.pid)
        return self.replica.num_params()

    def _averager_class(self) -> type:
        from cluster.real.averager import ExactAverager

        return ExactAverager

    def gloo_port(self) -> int:
        """A free port on this peer's host for the gloo rendezvous store (asked of rank 0)."""
        from cluster.real.gloo import free_port

        return free_port(self.host)

    def start_gloo(self, host: str, port: int, timeout_s: float) -> int:
        """Join the arm's gloo process group (every rank at once); returns the gloo sockets found for byte counting."""
        from cluster.real.gloo import GlooGroup

        self.timeouts = None
        self.gloo = GlooGroup(self.spec.worker, self.spec.n_workers, host, port, timeout_s)
        return len(self.gloo.fds)

    def announce(self) -> bool:
        """List this peer's multiaddrs in the DHT under the run's key: how the barrier (and a joining machine) finds it."""
        from hivemind.utils import get_dht_time

        key = READY_KEY.format(run_id=self.run_id)
        return bool(self.dht.store(key, self.visible_maddrs(), get_dht_time() + 3600, subkey=self.spec.worker))

    def peers_seen(self) -> list[int]:
        """Workers this peer finds announced in the DHT."""
        found = self.dht.get(READY_KEY.format(run_id=self.run_id), latest=True)
        if found is None or not isinstance(found.value, dict):
            return []
        return sorted(int(k) for k in found.value)

    # --- the arm's clock: wall time spent training, paused while the driver evaluates -----------------------------
    def start_clock(self, offset_s: float = 0.0) -> None:
        """Start the clock at `offset_s` (a peer restarted mid-run starts at the arm's time)."""
        self._paused_at = time.perf_counter()
        self._t0 = self._paused_at - offset_s
        self._excluded_s = 0.0

    def clock_s(self) -> float:
        now = self._paused_at if self._paused_at is not None else time.perf_counter()
        return now - self._t0 - self._excluded_s

    def _resume_clock(self) -> None:
        if self._paused_at is not None:
            self._excluded_s += time.perf_counter() - self._paused_at
            self._paused_at = None

    # --- training --------------------------------------------------------------------------------
    def advance(self, until_step: int, reply: None = None, finish: bool = False) -> list:
        """Train up to `until_step` (then the strategy's `finish`, if asked), one step at a time so that each is timed.

        Returns `MeasuredStep`s, and last a `PendingExchange` if the strategy is waiting on one: serve it with
        `exchange`, then call `advance` again, which hands the average to the strategy. The average never leaves
        this peer, so a driver's `reply` is always None (the signature is the replica's, for the lockstep driver).
        """
        assert reply is None, "a real peer holds its exchange's average itself"
        assert self._pending is None or self._reply is not None, "advance called before the pending exchange succeeded"
        self._resume_clock()
        reply, self._reply, self._pending = self._reply, None, None
        events: list = []
        while True:
            target = min(until_step, self._next_step + 1)
            t0 = time.perf_counter()
            out = self.replica.advance(target, reply, finish and target == until_step)
            self._step_compute_s += time.perf_counter() - t0
            reply = None
            for event in out:
                if isinstance(event, StepDone):
                    events.append(MeasuredStep(event.step, event.loss, event.flops, self._step_compute_s, self.clock_s()))
                    self._step_compute_s, self._next_step = 0.0, event.step + 1
            if out and not isinstance(out[-1], StepDone):
                events.append(self._hold(out[-1]))
                self._arrived_s = self.clock_s()
                return events
            if self._next_step >= until_step:
                self._paused_at = time.perf_counter()  # the driver evaluates now; that is not training time
                return events
            assert out, f"worker {self.spec.worker} made no progress towards step {until_step}"

    def _hold(self, request) -> PendingExchange:
        name = self.spec.algorithm
        if isinstance(request, (AwaitRequest, ReportRequest)):
            raise NotImplementedError(
                f"algorithm {name!r} uses {'non-blocking exchanges' if isinstance(request, AwaitRequest) else 'swarm progress reports'}, "
                "which the real mode does not run yet; use ddp or diloco, or mode = 'sim'")
        assert isinstance(request, ExchangeRequest), f"unexpected request {request!r}"
        n = self.spec.n_workers
        if not request.blocking or request.sparse:
            raise NotImplementedError(f"algorithm {name!r} asked for a {'sparse' if request.sparse else 'non-blocking'} "
                                      "exchange, which the real mode does not run yet; use ddp or diloco, or mode = 'sim'")
        if request.group is not None and tuple(sorted(request.group)) != tuple(range(n)):
            raise NotImplementedError(f"algorithm {name!r} averages in groups {request.group}; the real mode averages "
                                      "among all workers only so far; use ddp or diloco, or mode = 'sim'")
        if request.tensor.size != self.replica.num_params():
            raise NotImplementedError(f"algorithm {name!r} exchanges {request.tensor.size} numbers; the real mode's "
                                      f"averager holds one tensor the size of the model ({self.replica.num_params()})")
        self._pending = request
        return PendingExchange(request.payload, request.collective, request.group, request.nbytes,
                               request.raw_nbytes, request.weight, int(request.tensor.size))

    def exchange(self, attempt: int) -> ExchangeOutcome:
        """Average the pending tensor with every peer over the real averager; the driver retries all peers together."""
        request = self._pending
        assert request is not None, "exchange called with no pending exchange"
        start_s = self.clock_s()
        if attempt == 0:
            self._idle_s, self._comm_started_s = start_s - self._arrived_s, start_s
            self._exchanges_started += 1
        if self.gloo is not None:
            self._reply, sent, received = self.gloo.weighted_mean(request.tensor, request.weight)
            end_s = self.clock_s()
            return ExchangeOutcome(True, "", self.spec.n_workers, end_s - self._comm_started_s, self._idle_s, end_s,
                                   sent, received)
        with self.averager.get_tensors() as tensors:
            tensors[0].copy_(torch.from_numpy(np.asarray(request.tensor, dtype=np.float32)))
        if self._exchanges_started - 1 in self.options.drop_parts_at and attempt == 0 and self.spec.worker == 0:
            self.averager.drop_parts_once()
        group_size, error, report = 0, "", None
        try:
            report = self.averager.step(gather=self.spec.worker, weight=request.weight,
                                        timeout=self.timeouts.matchmaking_deadline_s)
            group_size = len(report.workers) if report is not None else 0
            if group_size != self.group_size:
                error = f"averaged in a group of {group_size}, not all {self.group_size} workers"
            elif not report.complete:
                # Stepping on it would leave this peer's replica apart from the others for good: repeat the round.
                error = (f"partial average: received {100 * report.received_fraction:.1f}% of the vector, "
                         f"missing workers {list(report.missing_workers)}")
        except Exception as e:  # hivemind raises its own classes and asyncio's; all mean "this attempt failed"
            error = f"{type(e).__name__}: {e}"
        end_s = self.clock_s()
        if not error:
            with self.averager.get_tensors() as tensors:
                self._reply = tensors[0].numpy().copy()
        return ExchangeOutcome(not error, error, group_size, end_s - self._comm_started_s, self._idle_s, end_s,
                               received_fraction=None if report is None else report.received_fraction,
                               missing_workers=() if report is None else report.missing_workers)

    def relay_counters(self) -> dict[Address, tuple[int, int]]:
        return self.relay.relay.snapshot()

    def set_cut(self, clients: list[Address]) -> int:
        """A network partition at this peer's relay: refuse and drop these dial addresses (`cluster.real.partition`)."""
        return self.relay.set_cut(clients)

    def remeet(self, maddrs: list[list[str]]) -> None:
        """After a partition heals, ping the peers it was cut from (`cluster.real.partition.Remeet`), in the
        background: the pings retry for seconds, and the driver's poll must not wait on them."""
        from cluster.real.partition import Remeet

        self._remeeting = self.dht.run_coroutine(Remeet(maddrs), return_future=True)

    def describe(self) -> dict:
        return {"worker": self.spec.worker, "dial_address": self.dial_address, "maddrs": self.visible_maddrs(),
                "relay_address": tuple(self.relay.address), "pid": os.getpid(), "hostname": socket.gethostname(),
                "node_id": _ray_node_id(), "peer_id": self.dht.peer_id.to_base58()}

    # --- evaluation, as in the simulator -------------------------------------------------------------
    def params(self) -> np.ndarray:
        return self.replica.params()

    def evaluate(self, flat_params: np.ndarray | None = None) -> float:
        return self.replica.evaluate(flat_params)

    def num_params(self) -> int:
        return self.replica.num_params()

    # --- teardown ----------------------------------------------------------------------------------
    def crash(self) -> None:
        """SIGKILL this peer, as a machine that fails: every process it started (the DHT and its p2pd, the averagers)
        and then its own process, with its training thread and relay. Nothing is shut down and no one is told."""
        import signal

        import psutil

        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.send_signal(signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)

    def shutdown(self) -> None:
        """Stop the averager, the DHT (and its p2pd) and the relay; kill by pid any child process that outlived them."""
        if self.gloo is not None:
            try:
                self.gloo.close()
            except Exception:  # a rank whose peers are gone cannot leave the group cleanly; the process still exits
                pass
            self.gloo = None
        for name in ("averager", "dht"):
            process = getattr(self, name, None)
            if process is not None and process.is_alive():
                try:
                    process.shutdown()
                except Exception:  # keep going: the pid sweep below still stops it
                    pass
            setattr(self, name, None)
        if self.relay is not None:
            self.relay.stop()
            self.relay = None
        if self._owned:
            import psutil

            for process in self._owned:
                try:
                    process.kill()
                except psutil.NoSuchProcess:  # the normal case: hivemind's shutdown already stopped it
                    pass
            self._owned = []
