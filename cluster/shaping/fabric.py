"""Kernel shaping for a whole swarm: one network namespace per peer, every namespace on one Linux bridge.

    namespace ff-<tag>-0 (10.214.b.1) --veth [tbf: uplink 0]--+                +--[tbf: downlink 1] veth--> ff-<tag>-1
                                                              +-- bridge ffbrB +
    namespace ff-<tag>-2 (10.214.b.3) <--veth [tbf: downlink 2]+                +--[tbf: uplink 3]   veth--  ff-<tag>-3

Each peer's access link is its veth pair: the namespace end's egress is the peer's uplink, the bridge end's egress
its downlink (traffic switched to it), each a `tbf` qdisc, with `netem` above it for latency and jitter when the
kernel has netem (`kernel._qdiscs`). A byte from peer i to peer j crosses i's uplink then j's downlink, and the
one-way latency between them is latency_i + latency_j, as in `cluster.network.Network.pair_latency_s`. The bridge
switches frames between namespaces, so the host needs no IP forwarding and none of its own interfaces or sysctls is
touched; the bridge has no address, so nothing on the host can reach the peers but through a namespace.

`in_namespace(name)` moves the calling thread into a namespace for the duration of a `with` block: sockets it opens
and processes it forks live there (the peer's relay thread, and hivemind's DHT process with its p2pd), while the
rest of the process (a Ray actor's connections to its raylet) stays on the host.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from cluster.network import Link
from cluster.shaping.kernel import ShapingUnavailable, _qdiscs, _run, kernel_shaping_available, netem_available

_CLONE_NEWNET = 0x40000000  # <sched.h>
_SUBNET = "10.214.{bridge}.{host}"  # 10.213.x.0/30 are NamespaceLink's; libp2p refuses 192.0.2.0/24 (TEST-NET-1)
_MAX_PEERS = 250
_lock = threading.Lock()


@dataclass(frozen=True)
class NamespacePort:
    """Where one peer lives: its namespace's name and its address there (what it listens on and announces)."""

    namespace: str
    address: str


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"setns: {os.strerror(error)}")


def require_namespace(name: str) -> str:
    """The namespace's path, or ShapingUnavailable if it is not on this machine."""
    path = f"/var/run/netns/{name}"
    if not os.path.exists(path):
        raise ShapingUnavailable(f"network namespace {name!r} does not exist on this machine: kernel shaping needs "
                                 "every peer on the machine that runs the experiment (run.shaping = 'relay' spans "
                                 "machines)")
    return path


@contextlib.contextmanager
def in_namespace(name: str):
    """Run the body with this thread in network namespace `name`; back in the thread's own namespace afterwards."""
    path = require_namespace(name)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(path, os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)


def check_links(links: Sequence[Link]) -> None:
    """Raise ShapingUnavailable (one line: what is missing, what to do) if these links cannot be built here."""
    available, reason = kernel_shaping_available()
    if not available:
        raise ShapingUnavailable(reason)
    if len(links) > _MAX_PEERS:
        raise ShapingUnavailable(f"kernel shaping puts at most {_MAX_PEERS} peers on one bridge, got {len(links)}; "
                                 "use shaping = 'relay'")
    wants_netem = [w for w, l in enumerate(links) if l.one_way_latency_s > 0 or l.jitter_s > 0 or l.loss > 0]
    if wants_netem and not netem_available():
        link = links[wants_netem[0]]
        raise ShapingUnavailable(
            f"this kernel has tbf but no netem qdisc, so kernel shaping cannot add the {link.one_way_latency_s * 1e3:g} "
            f"ms latency / {link.jitter_s * 1e3:g} ms jitter / {link.loss * 100:g} % loss of worker {wants_netem[0]}'s "
            "link; set latency, jitter and loss to 0, use run.shaping = 'relay' (delay in userspace), or load netem "
            "(modprobe sch_netem)")


class NamespaceSwitch:
    """Namespaces `ff-<tag>-<worker>` for `links`, on one bridge, shaped as the module docstring draws.

    Use as a context manager: everything is built on entry (or, if any step fails, removed again) and removed on exit,
    whatever happened inside. `ports[w]` is where worker w lives."""

    def __init__(self, links: Sequence[Link], tag: str):
        if not links:
            raise ValueError("a namespace switch needs at least one link")
        if not all(l.uplink_bps > 0 and l.downlink_bps > 0 for l in links):
            raise ValueError("every link's uplink_bps and downlink_bps must be above 0")
        self.links, self.tag = tuple(links), tag
        self.bridge: str | None = None
        self.ports: tuple[NamespacePort, ...] = ()
        self._made: list[tuple[str, str]] = []  # (namespace, its veth's bridge end), as built

    def _free_index(self) -> int:
        links = _run("ip", "-o", "link", "show")
        for index in range(256):
            if f"ffbr{index}:" not in links and f"ffbr{index}@" not in links:
                return index
        raise RuntimeError("all 256 ffbr* bridges are taken; remove stale ones (ip link del ffbrN)")

    def __enter__(self) -> "NamespaceSwitch":
        check_links(self.links)
        names = [f"ff-{self.tag}-{w}" for w in range(len(self.links))]
        taken = [n for n in names if os.path.exists(f"/var/run/netns/{n}")]
        if taken:
            raise ShapingUnavailable(f"network namespace {taken[0]!r} already exists; remove it (ip netns del "
                                     f"{taken[0]}) or run again (the tag is new each run)")
        with _lock:
            index = self._free_index()
            self.bridge = f"ffbr{index}"
            try:
                _run("ip", "link", "add", self.bridge, "type", "bridge")
                _run("ip", "link", "set", self.bridge, "up")
                ports = []
                for worker, (name, link) in enumerate(zip(names, self.links)):
                    ports.append(self._attach(index, worker, name, link))
                self.ports = tuple(ports)
            except BaseException:
                self._teardown()
                raise
        return self

    def _attach(self, index: int, worker: int, name: str, link: Link) -> NamespacePort:
        host_veth, ns_veth = f"ffb{index}p{worker}", f"ffb{index}p{worker}n"
        address = _SUBNET.format(bridge=index, host=worker + 1)
        _run("ip", "netns", "add", name)
        self._made.append((name, host_veth))
        _run("ip", "link", "add", host_veth, "type", "veth", "peer", "name", ns_veth, "netns", name)
        _run("ip", "link", "set", host_veth, "master", self.bridge)
        _run("ip", "link", "set", host_veth, "up")
        _run("ip", "-n", name, "addr", "add", f"{address}/24", "dev", ns_veth)
        _run("ip", "-n", name, "link", "set", ns_veth, "up")
        _run("ip", "-n", name, "link", "set", "lo", "up")
        for qdisc in _qdiscs(link.downlink_bps, link.one_way_latency_s, link.jitter_s, link.loss):
            _run("tc", "qdisc", "add", "dev", host_veth, *qdisc)
        for qdisc in _qdiscs(link.uplink_bps, link.one_way_latency_s, link.jitter_s, link.loss):
            _run("ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", ns_veth, *qdisc)
        return NamespacePort(name, address)

    def _teardown(self) -> None:
        # Each veth first: deleting one end deletes the pair at once, whereas `ip netns del` destroys a namespace
        # (and the veth in it) asynchronously. Then the namespaces, then the bridge; keep going past a failure.
        failures = []
        for name, host_veth in self._made:
            for path, command in ((f"/sys/class/net/{host_veth}", ("ip", "link", "del", host_veth)),
                                  (f"/var/run/netns/{name}", ("ip", "netns", "del", name))):
                if os.path.exists(path):
                    try:
                        _run(*command)
                    except RuntimeError as error:
                        failures.append(str(error))
        self._made = []
        if self.bridge is not None and os.path.exists(f"/sys/class/net/{self.bridge}"):
            try:
                _run("ip", "link", "del", self.bridge)
            except RuntimeError as error:
                failures.append(str(error))
        if failures:
            raise RuntimeError(f"could not remove kernel shaping: {'; '.join(failures)}")

    def __exit__(self, *exc) -> None:
        self._teardown()
