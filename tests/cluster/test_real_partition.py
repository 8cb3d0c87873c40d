"""Network partitions on real peers (`cluster.real.partition`): the cut in the shaping relays, the driver's timing of
cut and heal, and 4 real collaborative peers on Ray over loopback split into two sides for a while.
"""

from __future__ import annotations

import socket
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from cluster.faults import parse_faults


# --- the relay's cut, on loopback ----------------------------------------------------------------------------------
class _Echo:
    """A TCP server that echoes what it receives and counts the connections it accepted."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn):
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)


def _dial(relay_address, from_port: int) -> socket.socket:
    """A connection from a fixed local port, as libp2p dials from its listening port."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", from_port))
    s.settimeout(5.0)
    s.connect(tuple(relay_address))
    return s


def _echoes(s: socket.socket, payload: bytes) -> bool:
    """Whether the payload comes back whole; False if the relay closed or reset the connection."""
    try:
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = s.recv(65536)
            if not chunk:
                return False
            got += chunk
        return got == payload
    except (ConnectionError, OSError):
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_cut_relay_refuses_and_drops_its_cut_clients_and_accepts_them_again_once_lifted():
    from cluster.real.accounting import CountingRelay
    from cluster.shaping.relay import RelayThread

    echo = _Echo()
    cut_port, other_port = _free_port(), _free_port()
    cut_client, other_client = ("127.0.0.1", cut_port), ("127.0.0.1", other_port)
    try:
        with RelayThread(CountingRelay(echo.server.getsockname()[:2], 1e9, 1e9)) as relay:
            a, b = _dial(relay.address, cut_port), _dial(relay.address, other_port)
            assert _echoes(a, b"x" * 1000) and _echoes(b, b"y" * 500)
            assert relay.set_cut([cut_client]) == 1  # a's connection closed; b's stays
            assert not _echoes(a, b"x" * 1000)
            assert _echoes(b, b"y" * 500)
            a.close()
            accepted = echo.accepted
            refused = _dial(relay.address, cut_port)  # the relay accepts the TCP handshake, then closes at once
            assert not _echoes(refused, b"z" * 100)
            refused.close()
            assert echo.accepted == accepted and relay.relay.refused == 1  # the target never saw it
            counts = relay.relay.snapshot()
            # Through the relay: 1000 bytes each way for a before the cut, 500 + 500 for b; nothing after it for a.
            assert counts[cut_client] == (1000, 1000) and counts[other_client] == (1000, 1000)
            assert relay.set_cut([]) == 0
            again = _dial(relay.address, cut_port)
            assert _echoes(again, b"w" * 300)
            again.close()
            b.close()
            assert relay.relay.snapshot()[cut_client] == (1300, 1300) and echo.accepted == accepted + 1
            assert (relay.relay.bytes_inbound, relay.relay.bytes_outbound) == (2300, 2300)
    finally:
        echo.server.close()
