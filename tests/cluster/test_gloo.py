"""`allreduce = "gloo"`: a lockstep arm's exchanges as torch.distributed all-reduces, bytes counted by the kernel.

The byte counter is checked against a transfer of known size; a 3-peer DDP arm (15-30 s) against the ring
all-reduce's formula, and its peers must end bit-for-bit equal.
"""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

from realtools import unshaped_arm

from cluster.network import Link, Network
from cluster.real import RealOptions, check_real_arm, run_real_arm
from cluster.real.gloo import tcp_bytes
from trainer.model import PRESETS, count_params
from trainer.strategies.ddp import DDPSettings


def test_tcp_bytes_counts_a_transfer_of_known_size():
    size = 3_000_017
    with socket.create_server(("127.0.0.1", 0)) as server:
        received = bytearray()

        def serve():
            conn, _ = server.accept()
            with conn:
                before = tcp_bytes(conn.fileno())
                conn.sendall(b"r")  # the client sends only now: nothing can arrive before `before`
                while len(received) < size:
                    received.extend(conn.recv(1 << 20))
                conn.sendall(b"k")
                done.wait(10)  # closing sooner would put this side's FIN into the client's count
                after = tcp_bytes(conn.fileno())
                counts.append((after[0] - before[0], after[1] - before[1]))

        counts: list = []
        done = threading.Event()
        thread = threading.Thread(target=serve)
        thread.start()
        with socket.create_connection(server.getsockname()[:2]) as client:
            assert client.recv(1) == b"r"
            before = tcp_bytes(client.fileno())
            client.sendall(b"x" * size)
            assert client.recv(1) == b"k"
            after = tcp_bytes(client.fileno())
            done.set()
            thread.join(10)
    assert (after[0] - before[0], after[1] - before[1]) == (size, 1)
    assert counts == [(1 + 1, size)]  # "r" and "k"


def test_gloo_is_refused_where_it_cannot_run():
    net = Network(links=(Link(1e8, 1e8, 0.01),) * 2)
    with pytest.raises(ValueError, match="^allreduce: gloo's sockets bypass the shaping relays"):
        check_real_arm("ddp", "none", net, shaping="relay", allreduce="gloo")
    with pytest.raises(ValueError, match="^codec"):
        check_real_arm("ddp", "fp16", net, shaping="none", allreduce="gloo")
    with pytest.raises(ValueError, match="^allreduce: 'gloo' averages lockstep arms"):
        check_real_arm("collaborative", "none", net, shaping="none", allreduce="gloo")


@pytest.mark.ray
@pytest.mark.hivemind  # the peers find each other through hivemind's DHT
def test_ddp_over_gloo_ends_equal_and_sends_what_a_ring_sends():
    n, steps = 3, 8
    plan, specs = unshaped_arm("ddp-gloo", n, steps, seed=1, algorithm="ddp", settings=DDPSettings())
    records: list[dict] = []
    result = run_real_arm(plan, specs, records.append, options=RealOptions(shaping="none", allreduce="gloo"))
    assert all(np.array_equal(result.final_params[0], p) for p in result.final_params[1:])
    evals = [r for r in records if r.kind == "eval"]
    assert evals[-1].loss < evals[0].loss
    comms = [r for r in records if r.kind == "comm"]
    assert len(comms) == steps and all(r.collective == "gloo_allreduce" for r in comms)
    payload = 4 * (count_params(PRESETS["tiny"]) + 1)  # the gradients and the weight, float32
    ring = 2 * (n - 1) / n * payload  # what each rank sends in a ring all-reduce
    for r in comms:
        assert r.message_bytes == payload
        for sent, received in zip(r.bytes_sent, r.bytes_received):
            assert ring <= sent <= 1.05 * ring and ring <= received <= 1.05 * ring, (sent, received, ring)
