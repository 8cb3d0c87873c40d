import hashlib
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cluster.shaping import (NamespaceLink, RelayThread, ShapingRelay, ShapingUnavailable, describe,
                             kernel_shaping_available, netem_available, verify)

REPO_ROOT = Path(__file__).resolve().parents[2]


def _run_threads(*targets, timeout_s: float) -> None:
    """Run each target in its own thread and re-raise the first failure here, so a test cannot hang on one."""
    errors = []

    def guarded(target):
        try:
            target()
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(target,), daemon=True) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout_s)
    assert not any(thread.is_alive() for thread in threads), f"a transfer thread is still running after {timeout_s} s"
    if errors:
        raise errors[0]


def _recv_exactly(sock: socket.socket, nbytes: int) -> bytes:
    parts, left = [], nbytes
    while left:
        part = sock.recv(min(left, 1 << 20))
        assert part, f"connection closed with {left} of {nbytes} bytes missing"
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


@pytest.fixture
def listener():
    with socket.create_server(("127.0.0.1", 0)) as sock:
        sock.settimeout(20)
        yield sock


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@pytest.fixture
def no_leftover_namespaces():
    # Only names this process makes (ff-verify-PID, ff-probe-PID-N, ff-test-PID): other processes on the host may
    # create and remove namespaces of their own meanwhile.
    ours = lambda: {name for name in _namespaces() if name.startswith("ff-") and str(os.getpid()) in name}
    before = ours()
    yield
    assert ours() == before, f"left behind: {ours() - before}"


kernel_only = pytest.mark.skipif(not kernel_shaping_available()[0],
                                 reason=f"kernel shaping unavailable: {kernel_shaping_available()[1]}")


def test_relay_rate_and_latency_compose_like_a_link():
    # 8 MB at 20 Mbit/s is 3.2 s on the wire, plus 50 ms for the data and 50 ms for the acknowledgement.
    slow = verify("relay", 20e6, 0.050, 8_000_000)
    assert slow.expected_seconds == pytest.approx(3.3)
    assert slow.seconds == pytest.approx(3.3, rel=0.15)
    assert slow.throughput_bps < 20e6
    # 0.64 s + 2 x 5 ms = 0.65 s: 5.08 times faster. Each transfer alone may be 15 % off; overheads (timer wake-ups,
    # the GIL on a 2-core host) only ever add time and weigh more on the short transfer, so the ratio's band is
    # asymmetric around 5.08: [4, 6] admits the fast link running up to 27 % slow or 15 % fast, while a relay that
    # ignored latency (ratio 5.0 -> still in band, caught by the absolute check above) or applied the rate to only one
    # of the two (ratio 1 or 25) fails.
    fast = verify("relay", 100e6, 0.005, 8_000_000)
    assert fast.expected_seconds == pytest.approx(0.65)
    ratio = slow.seconds / fast.seconds
    print(f"relay: 20 Mbit/50 ms {slow.seconds:.3f} s (expected {slow.expected_seconds:.3f}), 100 Mbit/5 ms "
          f"{fast.seconds:.3f} s (expected {fast.expected_seconds:.3f}), ratio {ratio:.2f}")
    assert 4 <= ratio <= 6


def test_relay_preserves_bytes_both_ways_on_one_connection(listener):
    rng = random.Random(7)
    to_peer, from_peer = rng.randbytes(3_000_000), rng.randbytes(2_000_000)
    received = {}
    # Jitter of 3 ms against 16 KiB chunks every ~0.5 ms: many chunks would overtake each other if the relay allowed it.
    relay = ShapingRelay(listener.getsockname(), inbound_bps=300e6, outbound_bps=200e6, one_way_latency_s=0.002,
                         jitter_s=0.003, seed=1)
    with RelayThread(relay) as running, socket.create_connection(running.address, timeout=20) as client:
        peer, _ = listener.accept()
        peer.settimeout(20)
        with peer:
            _run_threads(lambda: client.sendall(to_peer),
                         lambda: received.__setitem__("peer", _recv_exactly(peer, len(to_peer))),
                         lambda: peer.sendall(from_peer),
                         lambda: received.__setitem__("client", _recv_exactly(client, len(from_peer))),
                         timeout_s=20)
        assert hashlib.sha256(received["peer"]).hexdigest() == hashlib.sha256(to_peer).hexdigest()
        assert hashlib.sha256(received["client"]).hexdigest() == hashlib.sha256(from_peer).hexdigest()
        assert (relay.bytes_inbound, relay.bytes_outbound) == (len(to_peer), len(from_peer))


def test_relay_latency_alone_adds_one_latency_each_way(listener):
    latency_s = 0.030
    relay = ShapingRelay(listener.getsockname(), inbound_bps=1e12, outbound_bps=1e12, one_way_latency_s=latency_s)
    with RelayThread(relay) as running, socket.create_connection(running.address, timeout=10) as client:
        peer, _ = listener.accept()
        peer.settimeout(10)
        with peer:
            round_trips = []
            for _ in range(5):
                start = time.perf_counter()
                client.sendall(b"ping")
                peer.sendall(_recv_exactly(peer, 4))
                assert _recv_exactly(client, 4) == b"ping"
                round_trips.append(time.perf_counter() - start)
    # Never early (a chunk is held until its due time). Late only by scheduling: the fastest of five round trips is
    # within 10 ms of 60 ms even on a loaded 2-core host; a relay that doubled or dropped the latency misses by 30+ ms.
    assert min(round_trips) >= 2 * latency_s - 1e-3, round_trips
    assert min(round_trips) <= 2 * latency_s + 0.010, round_trips


def test_relay_connections_share_the_link(listener):
    # Two 1 MB uploads at once through a 20 Mbit/s downlink: 0.8 s together, not 0.4 s each in parallel.
    relay = ShapingRelay(listener.getsockname(), inbound_bps=20e6, outbound_bps=20e6)
    with RelayThread(relay) as running:
        clients = [socket.create_connection(running.address, timeout=10) for _ in range(2)]
        peers = [listener.accept()[0] for _ in range(2)]
        try:
            start = time.perf_counter()
            _run_threads(*(lambda c=c: c.sendall(bytes(1_000_000)) for c in clients),
                         *(lambda p=p: _recv_exactly(p, 1_000_000) for p in peers), timeout_s=10)
            seconds = time.perf_counter() - start
        finally:
            for sock in clients + peers:
                sock.close()
    assert seconds == pytest.approx(0.8, rel=0.15)


def test_relay_rejects_a_zero_rate():
    with pytest.raises(ValueError, match="above 0 bit/s"):
        ShapingRelay(("127.0.0.1", 9), inbound_bps=0, outbound_bps=1e6)


def test_verify_cli_prints_measured_expected_and_mechanism():
    done = subprocess.run([sys.executable, "-m", "cluster.shaping.verify", "--rate", "50Mbit", "--latency", "10ms",
                           "--bytes", "1MB", "--backend", "relay",
                           "--tolerance", "1"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=30)
    # The tolerance is wide because this checks the command's plumbing; timing accuracy is the tests above.
    assert done.returncode == 0, done.stdout + done.stderr
    assert "expected  0.180 s" in done.stdout  # 1 MB * 8 / 50 Mbit/s + 2 x 10 ms
    assert "measured" in done.stdout and "mechanism relay: userspace asyncio" in done.stdout


def test_describe_names_the_mechanism_and_rejects_unknown_backends():
    assert describe("relay").startswith("relay: userspace asyncio")
    assert describe("kernel").startswith("kernel: ")
    with pytest.raises(ValueError, match="unknown shaping backend 'netem'; known: relay, kernel"):
        describe("netem")


@kernel_only
def test_kernel_tbf_link_moves_4mb_at_20mbit(no_leftover_namespaces):
    # tc counts frames, headers included, so a bulk stream's payload arrives ~4.5 % later than 1.6 s (1.67 s seen).
    result = verify("kernel", 20e6, 0.0, 4_000_000)
    print(f"kernel: 20 Mbit {result.seconds:.3f} s (expected {result.expected_seconds:.3f}), {result.mechanism}")
    assert result.expected_seconds == pytest.approx(1.6)
    assert result.seconds == pytest.approx(1.6, rel=0.20)


@kernel_only
def test_kernel_latency_without_netem_is_an_error(no_leftover_namespaces):
    if netem_available():
        pytest.skip("this kernel has netem, so kernel shaping can add latency; nothing to refuse")
    refusal = r"netem is not available.*cannot add 50 ms latency.*shaping = 'relay'"
    with pytest.raises(ShapingUnavailable, match=refusal):
        with NamespaceLink(f"ff-test-{os.getpid()}", 20e6, latency_s=0.050):
            pass


@kernel_only
def test_kernel_latency_with_netem():
    if not netem_available():
        pytest.skip("this kernel has no netem qdisc (sch_netem), so kernel shaping cannot add latency")
    result = verify("kernel", 20e6, 0.020, 4_000_000)
    assert result.seconds == pytest.approx(1.64, rel=0.20)


@kernel_only
def test_namespace_link_is_removed_even_when_the_body_fails(no_leftover_namespaces):
    name = f"ff-test-{os.getpid()}"
    with pytest.raises(RuntimeError, match="boom"):
        with NamespaceLink(name, 20e6) as link:
            assert name in _namespaces() and os.path.exists(f"/sys/class/net/{link.host_veth}")
            raise RuntimeError("boom")
    assert name not in _namespaces()
    assert not os.path.exists(f"/sys/class/net/{link.host_veth}")
