"""Time a bulk transfer through a shaped link: the sender pushes `nbytes`, the receiver acknowledges with one byte.

The clock runs from the first byte sent until the acknowledgement is back, so the transfer is serialized once and the
one-way latency is crossed twice (data out, acknowledgement back):
`expected_seconds = nbytes * 8 / rate_bps + 2 * one_way_latency_s` (the one-byte acknowledgement's own serialization is
negligible). The connection is opened before the clock starts, so the handshake is not counted.

Run as `python -m cluster.shaping.probe --host H --port P --bytes N` this is the receiving end, printing its port once
it listens; the kernel backend starts it inside the namespace.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from cluster.shaping.kernel import NamespaceLink, ShapingUnavailable, kernel_shaping_available
from cluster.shaping.relay import RelayThread, ShapingRelay

ACK = b"\x06"
_REPO_ROOT = Path(__file__).resolve().parents[2]


def expected_seconds(nbytes: int, rate_bps: float, one_way_latency_s: float) -> float:
    return nbytes * 8 / rate_bps + 2 * one_way_latency_s


def timeout_for(nbytes: int, rate_bps: float, one_way_latency_s: float) -> float:
    """A wait that a working link cannot hit: three times the expected transfer plus ten seconds of slack."""
    return 3 * expected_seconds(nbytes, rate_bps, one_way_latency_s) + 10.0


def receive(listener: socket.socket, nbytes: int) -> None:
    """Accept one connection, read exactly `nbytes`, acknowledge, close."""
    conn, _ = listener.accept()
    conn.settimeout(listener.gettimeout())
    with conn:
        left = nbytes
        while left:
            chunk = conn.recv(min(left, 1 << 20))
            if not chunk:
                raise ConnectionError(f"sender closed with {left} of {nbytes} bytes still to come")
            left -= len(chunk)
        conn.sendall(ACK)


def send_and_time(address: tuple[str, int], nbytes: int, timeout_s: float) -> float:
    """Send `nbytes` to a `receive` end through `address`; seconds from the first byte until the acknowledgement."""
    payload = bytes(nbytes)
    with socket.create_connection(address, timeout=timeout_s) as sock:
        start = time.perf_counter()
        sock.sendall(payload)
        if sock.recv(1) != ACK:
            raise ConnectionError(f"no acknowledgement from {address}: the receiver did not get all {nbytes} bytes")
        return time.perf_counter() - start


def time_relay(rate_bps: float, one_way_latency_s: float, nbytes: int) -> float:
    """Sink on loopback, a relay in front of it, the sender on loopback; the data crosses the relay's inbound side."""
    timeout_s = timeout_for(nbytes, rate_bps, one_way_latency_s)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(timeout_s)
        errors: list[BaseException] = []

        def run_sink():
            try:
                receive(listener, nbytes)
            except BaseException as error:  # re-raised in the caller's thread below
                errors.append(error)

        sink = threading.Thread(target=run_sink, name="shaping-probe-sink", daemon=True)
        sink.start()
        relay = ShapingRelay(listener.getsockname()[:2], inbound_bps=rate_bps, outbound_bps=rate_bps,
                             one_way_latency_s=one_way_latency_s)
        with RelayThread(relay) as running:
            seconds = send_and_time(running.address, nbytes, timeout_s)
        sink.join(timeout_s)
        if errors:
            raise errors[0]
    return seconds


def time_kernel(rate_bps: float, one_way_latency_s: float, nbytes: int, name: str | None = None) -> float:
    """Sink inside a fresh namespace behind a shaped veth, the sender on the host; the data crosses its downlink."""
    available, reason = kernel_shaping_available()
    if not available:
        raise ShapingUnavailable(reason)
    timeout_s = timeout_for(nbytes, rate_bps, one_way_latency_s)
    with NamespaceLink(name or f"ff-verify-{os.getpid()}", rate_bps, latency_s=one_way_latency_s) as link:
        sink = subprocess.Popen(
            [*link.exec_prefix, sys.executable, "-m", "cluster.shaping.probe", "--host", link.address, "--port", "0",
             "--bytes", str(nbytes), "--timeout", str(timeout_s)],
            cwd=_REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            port = int(sink.stdout.readline())
            seconds = send_and_time((link.address, port), nbytes, timeout_s)
            if sink.wait(timeout_s) != 0:
                raise RuntimeError(f"namespace sink failed: {sink.stderr.read().strip()}")
        except ValueError:
            sink.kill()
            raise RuntimeError(f"namespace sink did not start: {sink.communicate()[1].strip()}") from None
        finally:
            if sink.poll() is None:
                sink.kill()
            sink.wait()
            sink.stdout.close()
            sink.stderr.close()
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Receiving end of a shaping probe: read N bytes, acknowledge.")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--bytes", type=int, required=True)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the sender")
    args = parser.parse_args(argv)
    with socket.create_server((args.host, args.port)) as listener:
        listener.settimeout(args.timeout)
        print(listener.getsockname()[1], flush=True)
        receive(listener, args.bytes)


if __name__ == "__main__":
    main()
