"""`farflung doctor` against a probe server behind a shaping relay (and the network it writes of that link), against
a closed port, and on Ctrl-C; no p2pd may outlive the command that started it."""

import json
import select
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from cluster.network import build_network
from cluster.real.probe import address_kind
from cluster.shaping.relay import RelayThread, ShapingRelay
from experiments import cli

REPO_ROOT = Path(__file__).resolve().parents[2]
# A fresh `python -m experiments.cli` imports torch and hivemind before its daemon starts: seconds on a quiet machine,
# most of a minute on a loaded 2-core one.
STARTUP_S = 90
RATE_BPS, ONE_WAY_S = 20e6, 0.050
# A well-formed peer id that nothing on this machine has.
NOBODY = "12D3KooWPoea5ho9VykyKJZs9Fc62Zr7FUyHL5hVg128Z8HVYN1j"


def _psutil():
    import psutil

    return psutil


def _p2pd_left_by(before: set[int]) -> set[int]:
    """p2pd daemons started since `before` that belong to this test: descendants of this process, or orphans (a
    daemon whose owner died without stopping it is adopted by init). Daemons of other sessions on this host, each
    under its own live parent, are not counted."""
    psutil = _psutil()
    ours = {c.pid for c in psutil.Process().children(recursive=True)}
    left = set()
    for process in psutil.process_iter(["name", "ppid", "status"]):
        if process.info["name"] != "p2pd" or process.pid in before or process.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if process.pid in ours or process.info["ppid"] == 1 or not psutil.pid_exists(process.info["ppid"]):
            left.add(process.pid)
    return left


def _p2pd_pids() -> set[int]:
    return {p.pid for p in _psutil().process_iter(["name"]) if p.info["name"] == "p2pd"}


def _read_line(process: subprocess.Popen, timeout_s: float) -> str:
    ready, _, _ = select.select([process.stdout], [], [], timeout_s)
    exited = process.poll() is not None
    assert ready, f"no output within {timeout_s} s; stderr: {process.stderr.read() if exited else '(still running)'}"
    return process.stdout.readline().strip()


@pytest.fixture(scope="module")
def probe_server():
    """`farflung doctor --serve` on loopback, and a relay in front shaped to 20 Mbit/s and 50 ms each way."""
    before = _p2pd_pids()
    server = subprocess.Popen([sys.executable, "-m", "experiments.cli", "doctor", "--serve", "--host", "127.0.0.1",
                               "--serve-for", "300"], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        maddr = _read_line(server, STARTUP_S)
        _, _, host, _, port, _, peer_id = maddr.split("/")
        with RelayThread(ShapingRelay((host, int(port)), inbound_bps=RATE_BPS, outbound_bps=RATE_BPS,
                                      one_way_latency_s=ONE_WAY_S)) as relay:
            relayed = f"/ip4/127.0.0.1/tcp/{relay.address[1]}/p2p/{peer_id}"
            yield {"server": server, "before": before, "relayed": relayed, "relay_port": relay.address[1]}
    finally:  # the last test stops it with Ctrl-C; if that test did not run or failed, stop it here
        _stop(server)
        server.stdout.close()
        server.stderr.close()


def _stop(process: subprocess.Popen) -> None:
    """Ctrl-C, then kill the whole tree: killing only the top process would orphan its DHT process and daemon."""
    psutil = _psutil()
    if process.poll() is None:
        tree = psutil.Process(process.pid).children(recursive=True)
        process.send_signal(signal.SIGINT)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
        for child in tree:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
    process.wait(10)


@pytest.mark.hivemind
def test_doctor_measures_the_shaped_link_and_writes_it_as_a_network(probe_server, capsys, tmp_path):
    before = _p2pd_pids()
    start = time.perf_counter()
    code = cli.main(["doctor", "--host", "127.0.0.1", "--initial-peers", probe_server["relayed"], "--json",
                     "--write-network", str(tmp_path / "measured.toml")])
    seconds = time.perf_counter() - start
    result = json.loads(capsys.readouterr().out)
    checks = {c["name"]: c for c in result["checks"]}
    print(json.dumps({name: c["figure"] for name, c in checks.items()}, indent=1), f"{seconds:.1f} s")
    assert code == 0 and result["ok"], result
    assert [c["status"] for c in result["checks"]] == ["ok"] * 7
    assert list(checks) == ["p2pd", "dht", "reachable", "latency", "upload", "download", "network"]
    assert checks["dht"]["values"]["peers_seen"] == 1
    assert checks["reachable"]["values"]["dialback"][0]["ok"]  # the server dialled this loopback address back
    # Everything crossed the relay (the server also listens directly; a measurement over that would read ~0.3 ms).
    relay_address = f"/ip4/127.0.0.1/tcp/{probe_server['relay_port']}"
    assert {checks[n]["values"]["via"] for n in ("latency", "upload", "download")} == {relay_address}
    # 2 x 50 ms. The relay never delivers early, so below 100 ms means a measurement bypassed it; above, only
    # scheduling adds (unix-socket hops to the daemons ~0.3 ms, relay wake-ups late by 5-12 ms on a busy 2-core host,
    # which a median of 9 mostly discards: 101-103 ms seen). Timing the stream's opening too would add a whole RTT.
    assert 99.5 <= checks["latency"]["values"]["rtt_ms"] <= 115
    # 20 Mbit/s within 25 %. One libp2p stream is flow-controlled per stream, so at 100 ms it reads ~17 Mbit/s here
    # (4 streams: 19.5-20); timing only the writes (not the acknowledgement) or skipping the relay reads 100s.
    for name in ("upload", "download"):
        assert 15 <= checks[name]["values"]["mbit_s"] <= 25, checks[name]["figure"]
    # The file is a 2-worker network (this machine, the relayed peer) with the link as measured, within the same
    # bounds; its figures are the checks' own, rounded to 1 us and 1 kbit/s.
    assert checks["network"]["values"]["workers"] == 2
    print((tmp_path / "measured.toml").read_text())
    network = build_network(tomllib.loads((tmp_path / "measured.toml").read_text()), 2)
    assert network.pair_latency_s(0, 1) == network.pair_latency_s(1, 0)
    assert network.pair_latency_s(0, 1) == pytest.approx(checks["latency"]["values"]["rtt_ms"] / 2e3, abs=1e-6)
    assert 49.75e-3 <= network.pair_latency_s(0, 1) <= 57.5e-3
    upload, download = network.pair_bandwidth_bps(0, 1), network.pair_bandwidth_bps(1, 0)
    assert upload == pytest.approx(checks["upload"]["values"]["mbit_s"] * 1e6, abs=1e3)
    assert download == pytest.approx(checks["download"]["values"]["mbit_s"] * 1e6, abs=1e3)
    assert 15e6 <= upload <= 25e6 and 15e6 <= download <= 25e6
    assert _p2pd_left_by(before) == set()


@pytest.mark.hivemind
def test_ctrl_c_stops_doctor_and_its_daemon(probe_server):
    psutil = _psutil()
    # 40 MB at 20 Mbit/s is 16 s of transfer: Ctrl-C lands while doctor is measuring.
    doctor = subprocess.Popen([sys.executable, "-m", "experiments.cli", "doctor", "--host", "127.0.0.1",
                               "--initial-peers", probe_server["relayed"], "--bytes", "40MB"],
                              cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, daemons = time.monotonic() + STARTUP_S, []
        while not daemons and time.monotonic() < deadline and doctor.poll() is None:
            time.sleep(0.1)
            daemons = [c for c in psutil.Process(doctor.pid).children() if c.name() == "p2pd"]
        assert daemons, "doctor started no p2pd"
        time.sleep(1.0)  # into the DHT join and the measurements
        doctor.send_signal(signal.SIGINT)
        assert doctor.wait(20) == 130, doctor.stderr.read()
        assert not daemons[0].is_running() or daemons[0].status() == psutil.STATUS_ZOMBIE
    finally:
        _stop(doctor)
        doctor.communicate()


@pytest.mark.hivemind
def test_probe_server_stops_on_ctrl_c_and_leaves_no_daemon(probe_server):
    server = probe_server["server"]
    assert server.poll() is None, "the probe server stopped early"
    server.send_signal(signal.SIGINT)
    assert server.wait(20) == 0, server.stderr.read()
    assert _p2pd_left_by(probe_server["before"]) == set()


@pytest.mark.hivemind
def test_unreachable_initial_peer_fails_with_a_fix_within_the_timeout(capsys):
    before = _p2pd_pids()
    start = time.perf_counter()
    code = cli.main(["doctor", "--host", "127.0.0.1", "--timeout", "5",
                     "--initial-peers", f"/ip4/127.0.0.1/tcp/9/p2p/{NOBODY}"])
    seconds = time.perf_counter() - start
    out = capsys.readouterr().out
    print(out, f"{seconds:.1f} s")
    assert code == 1
    lines = out.splitlines()
    dht = next(i for i, line in enumerate(lines) if line.startswith("FAIL dht"))
    assert "127.0.0.1:9" in lines[dht] and "connection refused" in lines[dht]
    assert lines[dht + 1].lstrip().startswith("fix: check the address")
    assert lines[-1] == "1 check(s) failed, 1 skipped"  # reachability: nobody answered who could dial back
    assert seconds < 5
    assert _p2pd_left_by(before) == set()


def test_bad_arguments_exit_2_naming_the_flag(capsys):
    assert cli.main(["doctor", "--initial-peers", "/ip4/127.0.0.1/tcp/9"]) == 2
    assert "--initial-peers: '/ip4/127.0.0.1/tcp/9' is not a multiaddr with a peer id" in capsys.readouterr().err
    assert cli.main(["doctor", "--host", "localhost"]) == 2
    assert "--host: expected an IP address" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        cli.main(["doctor", "--bytes", "2GiB"])
    assert exit_.value.code == 2 and "argument --bytes: at most 1024 MiB" in capsys.readouterr().err


@pytest.mark.parametrize("maddr, kind", [
    ("/ip4/127.0.0.1/tcp/1/p2p/x", "loopback"), ("/ip4/192.168.1.20/tcp/1", "private"),
    ("/ip4/10.1.2.3/tcp/1", "private"), ("/ip4/100.72.0.1/tcp/1", "carrier-grade NAT"),
    ("/ip4/8.8.8.8/tcp/1", "public"), ("/ip6/::1/tcp/1", "loopback"), ("/ip6/2001:4860::8888/tcp/1", "public"),
    ("/dns4/example.org/tcp/1", "name"), ("/ip4/8.8.8.8/tcp/1/p2p/x/p2p-circuit", "relayed"),
])
def test_address_kinds(maddr, kind):
    assert address_kind(maddr) == kind
