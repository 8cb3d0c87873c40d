"""Kernel shaping of real peers: `run.shaping = "kernel"` parses (or fails in one line), the namespaces on one bridge
shape what crosses them and leave nothing behind, and a real ddp arm runs behind them."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import threading
import time

import numpy as np
import pytest
from realtools import unshaped_arm

from cluster.collectives import butterfly_allreduce
from cluster.network import Link, Network
from cluster.real import RealOptions, check_real_arm, describe_shaping, run_real_arm
from cluster.shaping import fabric, kernel_shaping_available
from cluster.shaping.fabric import NamespaceSwitch, in_namespace
from cluster.shaping.kernel import tbf_burst_bytes
from experiments.fields import ConfigError
from experiments.spec import parse_spec
from trainer.model import PRESETS, count_params
from trainer.strategies.ddp import DDPSettings

kernel_only = pytest.mark.skipif(not kernel_shaping_available()[0],
                                 reason=f"kernel shaping unavailable: {kernel_shaping_available()[1]}")

REAL = """
[model]
preset = "tiny"
[data]
corpus = "synthetic"
[run]
workers = 2
batch_size = 2
tokens = 1280
mode = "real"
runtime = "ray"
shaping = "{shaping}"
[[arm]]
name = "x"
algorithm = "ddp"
network = {{ uplink = "20Mbit", latency = "{latency}" }}
"""


def _parse(shaping: str, latency: str = "0ms"):
    import tomllib

    return parse_spec(tomllib.loads(REAL.format(shaping=shaping, latency=latency)))


@pytest.fixture
def kernel_here(monkeypatch):
    """The machine's answers, made up: kernel shaping works, netem does not (this project's CI host)."""
    monkeypatch.setattr(fabric, "kernel_shaping_available", lambda: (True, "root, ip and tc present"))
    monkeypatch.setattr(fabric, "netem_available", lambda: False)


def test_kernel_is_a_shaping_choice(kernel_here):
    assert _parse("kernel").run.shaping == "kernel"
    with pytest.raises(ConfigError, match=r"^run\.shaping: .*relay, kernel, none"):
        _parse("netem")


def test_kernel_latency_without_netem_is_one_line_naming_the_fix(kernel_here):
    with pytest.raises(ConfigError) as raised:
        _parse("kernel", latency="20ms")
    message = str(raised.value)
    assert message.startswith("arm.x.shaping: this kernel has tbf but no netem qdisc") and "\n" not in message
    assert "20 ms latency" in message and "run.shaping = 'relay'" in message
    _parse("relay", latency="20ms")  # the relay adds delay in userspace


def test_kernel_unavailable_is_one_line(monkeypatch):
    reason = "kernel shaping needs root (network namespaces, tc); run as root or use shaping = 'relay'"
    monkeypatch.setattr(fabric, "kernel_shaping_available", lambda: (False, reason))
    with pytest.raises(ConfigError, match=r"^arm\.x\.shaping: kernel shaping needs root .* shaping = 'relay'$"):
        _parse("kernel")


def test_kernel_allows_loss_only_through_netem(monkeypatch, kernel_here):
    lossy = Network(links=(Link(20e6, 20e6, 0.0, loss=0.01),) * 2)
    with pytest.raises(ValueError, match=r"^shaping: .*1 % loss of worker 0"):
        check_real_arm("ddp", "none", lossy, shaping="kernel")
    with pytest.raises(ValueError, match=r"^network\.loss: the relay does not drop packets"):
        check_real_arm("ddp", "none", lossy, shaping="relay")
    monkeypatch.setattr(fabric, "netem_available", lambda: True)
    check_real_arm("ddp", "none", lossy, shaping="kernel")


def test_only_the_relay_backend_shapes_in_the_relay():
    link = Link(20e6, 5e6, 0.03)
    network = Network(links=(link,))
    assert RealOptions(shaping="relay").relay_link(link) == link
    for backend in ("kernel", "none"):
        unshaped = RealOptions(shaping=backend).relay_link(link)
        assert unshaped.uplink_bps >= 1e15 and unshaped.one_way_latency_s == 0
    assert RealOptions(shaping="kernel").link_of(network, 0) == link  # what tc is told, and hivemind's bandwidth
    assert describe_shaping("kernel").startswith("kernel: ")


def _run(*args: str) -> str:
    return subprocess.run(args, capture_output=True, text=True, timeout=10, check=True).stdout


def _namespaces(tag: str) -> set[str]:
    return {line.split()[0] for line in _run("ip", "netns", "list").splitlines() if line.startswith(f"ff-{tag}-")}


def _bridge_ports() -> set[str]:
    """The host ends of every switch's veths (ffb<bridge>p<worker>), whoever built them."""
    return {line.split(":")[1].strip().split("@")[0] for line in _run("ip", "-o", "link", "show").splitlines()
            if ": ffb" in line}


def _timed_transfer(src, dst, nbytes: int) -> float:
    """Seconds for `nbytes` from namespace `src` to a sink in `dst` until its one-byte acknowledgement is back."""
    ready, port, errors = threading.Event(), [], []

    def sink():
        try:
            with in_namespace(dst.namespace), socket.create_server((dst.address, 0)) as server:
                server.settimeout(30)
                port.append(server.getsockname()[1])
                ready.set()
                conn, _ = server.accept()
                with conn:
                    left = nbytes
                    while left:
                        left -= len(conn.recv(1 << 20))
                    conn.sendall(b"\x06")
        except BaseException as error:
            errors.append(error)
            ready.set()

    thread = threading.Thread(target=sink, daemon=True)
    thread.start()
    assert ready.wait(30) and not errors, errors
    with in_namespace(src.namespace), socket.create_connection((dst.address, port[0]), timeout=30) as conn:
        start = time.perf_counter()
        conn.sendall(bytes(nbytes))
        assert conn.recv(1) == b"\x06"
        seconds = time.perf_counter() - start
    thread.join(30)
    assert not errors, errors
    return seconds


@kernel_only
def test_a_byte_crosses_the_senders_uplink_and_the_receivers_downlink():
    # Worker 0 uploads at 40 Mbit/s, worker 1 downloads at 8: the slower of the two sets the pace, in both cases
    # counted in whole frames by tc, so a payload takes at least its own bits over the rate and about 4.5 % longer.
    links = [Link(uplink_bps=40e6, downlink_bps=40e6, one_way_latency_s=0.0),
             Link(uplink_bps=40e6, downlink_bps=8e6, one_way_latency_s=0.0)]
    nbytes = 2_000_000
    tag = f"kt{os.getpid()}"
    with NamespaceSwitch(links, tag=tag) as switch:
        assert _namespaces(tag) == {f"ff-{tag}-0", f"ff-{tag}-1"}
        index = switch.bridge.removeprefix("ffbr")
        ports = {f"ffb{index}p{w}" for w in range(2)}
        assert ports <= _bridge_ports()
        into_1 = _timed_transfer(switch.ports[0], switch.ports[1], nbytes)
        into_0 = _timed_transfer(switch.ports[1], switch.ports[0], nbytes)
    print(f"0 -> 1: {into_1:.3f} s, 1 -> 0: {into_0:.3f} s")
    # tbf lets an idle link send one burst at once; every other byte waits for its tokens.
    assert into_1 >= (nbytes - tbf_burst_bytes(8e6)) * 8 / 8e6  # worker 1's 8 Mbit/s downlink
    assert (nbytes - tbf_burst_bytes(40e6)) * 8 / 40e6 <= into_0 < nbytes * 8 / 8e6  # 40 Mbit/s each side
    assert not _namespaces(tag) and not ports & _bridge_ports()


@kernel_only
def test_the_switch_is_removed_when_the_body_fails():
    tag = f"ktfail{os.getpid()}"
    with pytest.raises(RuntimeError, match="boom"):
        with NamespaceSwitch([Link(20e6, 20e6, 0.0)] * 2, tag=tag) as switch:
            assert len(_namespaces(tag)) == 2
            raise RuntimeError("boom")
    assert not _namespaces(tag) and not os.path.exists(f"/sys/class/net/{switch.bridge}")


@pytest.fixture
def fresh_ray():
    import ray

    if ray.is_initialized():
        pytest.skip("needs to start (and stop) its own local Ray")
    yield
    if ray.is_initialized():
        ray.shutdown()


@kernel_only
@pytest.mark.ray
@pytest.mark.hivemind
def test_a_ddp_arm_behind_kernel_shaping_takes_at_least_the_wire_time(fresh_ray):
    n, steps, rate = 2, 3, 2e6
    plan, specs = unshaped_arm("ddp-kernel", n, steps, seed=3, algorithm="ddp", settings=DDPSettings())
    plan = dataclasses.replace(plan, network=Network(links=(Link(rate, rate, 0.0),) * n))
    seen = {}

    def on_swarm(swarm):  # while the peers are up: where they listen and what tc was told on each uplink
        seen["maddr"] = swarm.initial_peers[0]
        seen["tag"] = tag = swarm.run_id.rsplit("-", 1)[-1]
        seen["uplinks"] = [_run("ip", "netns", "exec", ns, "tc", "qdisc", "show") for ns in sorted(_namespaces(tag))]

    records = []
    result = run_real_arm(plan, specs, records.append, options=RealOptions(shaping="kernel"), on_swarm=on_swarm)
    assert seen["maddr"].startswith("/ip4/10.214.")
    assert len(seen["uplinks"]) == n and all("tbf" in q and "rate 2Mbit" in q for q in seen["uplinks"])
    assert not _namespaces(seen["tag"])

    assert all(np.array_equal(result.final_params[0], p) for p in result.final_params[1:])
    comms = [r for r in records if r.kind == "comm"]
    nbytes = 4 * count_params(PRESETS["tiny"])
    bound = butterfly_allreduce(plan.network, list(range(n)), nbytes).time_s
    assert len(comms) == steps and bound == pytest.approx(nbytes * 8 / rate)  # 2 peers: each sends its other half
    for c in comms:
        # The relays count payload; tc held each peer's uplink to 2 Mbit/s after one burst, so no exchange beat its
        # own bytes at that rate.
        assert all(sent >= nbytes for sent in c.bytes_sent), c.bytes_sent
        assert c.comm_s >= (max(c.bytes_sent) - tbf_burst_bytes(rate)) * 8 / rate, (c.comm_s, c.bytes_sent)
