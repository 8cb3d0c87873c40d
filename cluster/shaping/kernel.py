"""Kernel traffic control: one network namespace per peer, joined to the host by a veth pair shaped with tc.

`NamespaceLink` builds `host veth (10.213.x.1/30) <-> namespace veth (10.213.x.2/30)` and shapes each end's egress:
the namespace side carries the peer's uplink, the host side its downlink (traffic into the peer). Rate is a `tbf`
qdisc; delay, jitter and loss are a `netem` qdisc above it, on both ends, so a round trip between host and namespace
crosses `latency_s` twice (once each way), as with the relay. Only addresses on the veth pairs made here are used.

Some kernels (this project's CI host among them) have tbf but not netem. Asking such a kernel for latency, jitter or
loss raises `ShapingUnavailable` instead of silently running an unshaped link; the relay backend adds delay in
userspace.
netem with jitter may reorder packets (TCP copes; the relay never reorders).

tc counts whole frames, so a bulk TCP stream's goodput is ~4.5 % below the configured rate (1448 payload bytes per
1514-byte frame); the relay counts payload bytes only. Real links carry the headers too, so neither is wrong, but a
kernel-shaped transfer takes ~4.5 % longer than the relay's or the sim's for the same payload.

Everything here shells out to `ip` and `tc` (iproute2): pyroute2 would avoid the subprocesses, but it is not a
dependency, and these commands are what a person debugging a run would type anyway.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import re
import shutil
import subprocess
import sys
import threading

_COMMAND_TIMEOUT_S = 10.0  # one ip/tc call; they finish in milliseconds unless the host is wedged
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_SUBNET = "10.213.{index}.{host}"
_TBF_BURST_BYTES = 16 * 1024  # one relay chunk, so both backends let an idle link send the same first burst
_setup_lock = threading.Lock()
_probe_counter = itertools.count()


class ShapingUnavailable(RuntimeError):
    """The requested shaping cannot be done on this machine; the message says what is missing and what to do."""


def _run(*args: str) -> str:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise RuntimeError(f"`{' '.join(args)}` failed: {error}") from None
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(args)}` failed: {done.stderr.strip() or f'exit {done.returncode}'}")
    return done.stdout


@contextlib.contextmanager
def _scratch_namespace():
    """A throwaway namespace holding a veth pair that never touches the host's interfaces."""
    name = f"ff-probe-{os.getpid()}-{next(_probe_counter)}"
    _run("ip", "netns", "add", name)
    try:
        _run("ip", "-n", name, "link", "add", "probe0", "type", "veth", "peer", "name", "probe1")
        _run("ip", "-n", name, "link", "set", "probe0", "up")
        yield name
    finally:
        _run("ip", "netns", "del", name)  # deleting the namespace deletes the veth pair inside it


@functools.lru_cache(maxsize=1)
def kernel_shaping_available() -> tuple[bool, str]:
    """(True, what works) if this process can build shaped namespace links, else (False, why not and what to do)."""
    if sys.platform != "linux":
        return False, (f"kernel shaping needs Linux network namespaces and tc, this is {sys.platform}; "
                       "use shaping = 'relay'")
    if os.geteuid() != 0:
        return False, "kernel shaping needs root (network namespaces, tc); run as root or use shaping = 'relay'"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return False, f"`{tool}` not found; install iproute2 or use shaping = 'relay'"
    try:
        with _scratch_namespace() as name:
            _run("ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "probe0", "root", "tbf", "rate", "1mbit",
                 "burst", str(_TBF_BURST_BYTES), "limit", "65536")
    except RuntimeError as error:
        return False, f"could not build a tbf-shaped veth in a network namespace ({error}); use shaping = 'relay'"
    return True, "root, ip and tc present; network namespaces, veth and tbf work"


@functools.lru_cache(maxsize=1)
def netem_available() -> bool:
    """Whether the kernel has the netem qdisc (delay, jitter, loss), tried on a veth in a throwaway namespace."""
    if not kernel_shaping_available()[0]:
        return False
    with _scratch_namespace() as name:
        try:
            _run("ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "probe0", "root", "netem", "delay", "1ms")
        except RuntimeError:
            return False
    return True


def tbf_burst_bytes(rate_bps: float) -> int:
    """What tbf lets an idle link send at once: one relay chunk, or 1 ms at the rate if more (a timer tick's worth)."""
    return max(_TBF_BURST_BYTES, int(rate_bps / 8 * 1e-3))


def _qdiscs(rate_bps: float, latency_s: float, jitter_s: float, loss: float) -> list[list[str]]:
    """tc arguments (after `tc qdisc add dev DEV`) for one end: netem on top when it has work, tbf beneath it."""
    # The queue holds 100 ms of traffic (at least 64 KiB): a host TCP flow then never loses packets at the qdisc (at
    # 12 KiB a 5 Mbit/s flow collapsed to a fifth of its rate), and a bulk flow adds at most ~100 ms of queueing
    # delay for others sharing the link, about what a home router's buffer does.
    tbf = ["tbf", "rate", f"{rate_bps:.0f}bit", "burst", str(tbf_burst_bytes(rate_bps)),
           "limit", str(max(64 * 1024, int(rate_bps / 8 * 0.1)))]
    if not (latency_s or jitter_s or loss):
        return [["root", "handle", "1:", *tbf]]
    netem = ["netem", "limit", "100000", "delay", f"{latency_s * 1e6:.0f}us"]
    if jitter_s:
        netem.append(f"{jitter_s * 1e6:.0f}us")
    if loss:
        netem += ["loss", f"{loss * 100:g}%"]
    return [["root", "handle", "1:", *netem], ["parent", "1:1", "handle", "10:", *tbf]]


class NamespaceLink:
    """A network namespace `name` reachable from the host at `address`, behind a shaped veth pair.

    `rate_bps` is the namespace's uplink and also its downlink unless `downlink_bps` is given; `latency_s`, `jitter_s`
    and `loss` apply on each end (so per direction). Use as a context manager; run the peer with `exec_prefix + argv`.
    The namespace and veth pair are removed on exit, whatever happened inside.
    """

    def __init__(self, name: str, rate_bps: float, latency_s: float = 0.0, jitter_s: float = 0.0, loss: float = 0.0,
                 downlink_bps: float | None = None):
        if not _NAME_RE.match(name):
            raise ValueError(f"namespace name must be 1-64 of A-Z a-z 0-9 _ . -, got {name!r}")
        downlink_bps = rate_bps if downlink_bps is None else downlink_bps
        if not (rate_bps > 0 and downlink_bps > 0):
            raise ValueError(f"rates must be above 0 bit/s, got rate_bps={rate_bps}, downlink_bps={downlink_bps}")
        if not (latency_s >= 0 and jitter_s >= 0 and 0 <= loss <= 1):
            raise ValueError(f"need latency_s >= 0, jitter_s >= 0 and 0 <= loss <= 1, got {latency_s}, {jitter_s}, "
                             f"{loss}")
        self.name, self.uplink_bps, self.downlink_bps = name, rate_bps, downlink_bps
        self.latency_s, self.jitter_s, self.loss = latency_s, jitter_s, loss
        self.host_veth = self.ns_veth = self.host_address = self.address = None
        self.exec_prefix = ["ip", "netns", "exec", name]

    def _free_index(self) -> int:
        links = _run("ip", "-o", "link", "show")
        addresses = _run("ip", "-o", "-4", "addr", "show")
        for index in range(256):
            if f"ffshape{index}h" not in links and _SUBNET.format(index=index, host=1) + "/" not in addresses:
                return index
        raise RuntimeError("all 256 10.213.x.0/30 subnets are taken; remove stale ffshape* veths (ip link del ...)")

    def __enter__(self) -> "NamespaceLink":
        available, reason = kernel_shaping_available()
        if not available:
            raise ShapingUnavailable(reason)
        if (self.latency_s or self.jitter_s or self.loss) and not netem_available():
            wanted = " and ".join(f"{figure} {what}" for figure, what in (
                (f"{self.latency_s * 1e3:g} ms", "latency"), (f"{self.jitter_s * 1e3:g} ms", "jitter"),
                (f"{self.loss * 100:g} %", "loss")) if not figure.startswith("0 "))
            raise ShapingUnavailable(
                f"netem is not available in this kernel: kernel shaping cannot add {wanted}; use the relay backend "
                "(shaping = 'relay'), which adds delay in userspace, or load the netem module (modprobe sch_netem)")
        if os.path.exists(f"/var/run/netns/{self.name}"):
            raise ShapingUnavailable(f"network namespace {self.name!r} already exists; remove it "
                                     f"(ip netns del {self.name}) or choose another name")
        with _setup_lock:
            index = self._free_index()
            self.host_veth, self.ns_veth = f"ffshape{index}h", f"ffshape{index}n"
            self.host_address = _SUBNET.format(index=index, host=1)
            self.address = _SUBNET.format(index=index, host=2)
            _run("ip", "netns", "add", self.name)
            try:
                self._build()
            except BaseException:
                self._teardown()
                raise
        return self

    def _build(self) -> None:
        ns = ("ip", "-n", self.name)
        _run("ip", "link", "add", self.host_veth, "type", "veth", "peer", "name", self.ns_veth, "netns", self.name)
        _run("ip", "addr", "add", f"{self.host_address}/30", "dev", self.host_veth)
        _run("ip", "link", "set", self.host_veth, "up")
        _run(*ns, "addr", "add", f"{self.address}/30", "dev", self.ns_veth)
        _run(*ns, "link", "set", self.ns_veth, "up")
        _run(*ns, "link", "set", "lo", "up")
        for qdisc in _qdiscs(self.downlink_bps, self.latency_s, self.jitter_s, self.loss):
            _run("tc", "qdisc", "add", "dev", self.host_veth, *qdisc)
        for qdisc in _qdiscs(self.uplink_bps, self.latency_s, self.jitter_s, self.loss):
            _run(*self.exec_prefix, "tc", "qdisc", "add", "dev", self.ns_veth, *qdisc)

    def _teardown(self) -> None:
        # The veth goes first: deleting one end deletes the pair at once, whereas a namespace is destroyed
        # asynchronously after `ip netns del`, which would leave the host end visible for a moment.
        steps = ((f"veth {self.host_veth}", f"/sys/class/net/{self.host_veth}", ("ip", "link", "del", self.host_veth)),
                 (f"namespace {self.name}", f"/var/run/netns/{self.name}", ("ip", "netns", "del", self.name)))
        failures = []
        for what, path, command in steps:
            if os.path.exists(path):
                try:
                    _run(*command)
                except RuntimeError as error:
                    failures.append(f"{what}: {error}")
        if failures:
            raise RuntimeError(f"could not remove {'; '.join(failures)}")

    def __exit__(self, *exc) -> None:
        self._teardown()
