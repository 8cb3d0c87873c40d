"""`doctor --write-network`: measured checks become a network table that `build_network` reads back to the measured
figures, pairs of peers estimated as the module says; bad paths fail before anything is measured. No daemon starts
here (the measurement itself is tested against a shaped probe peer in test_doctor.py)."""

import tomllib
from datetime import datetime, timezone
from pathlib import Path

import pytest

from cluster.network import build_network
from cluster.real.doctor_checks import FAIL, OK, Check, Peer
from cluster.real.network_file import measured_peers, network_text, write_measured_network, write_network
from experiments import cli
from experiments.spec import parse_spec

DEMO = Path(__file__).resolve().parents[2] / "experiments" / "demo.toml"
PEERS = [Peer(f"/ip4/10.0.0.{i}/tcp/31337/p2p/12D3KooWpeer{i}", None, None, f"10.0.0.{i}:31337") for i in (1, 2, 3)]


def _measured(peer: Peer, rtt_ms: float, up_mbit: float, down_mbit: float) -> list[Check]:
    return [Check("latency", OK, "", peer=peer.label, values={"rtt_ms": rtt_ms}),
            Check("upload", OK, "", peer=peer.label, values={"mbit_s": up_mbit}),
            Check("download", OK, "", peer=peer.label, values={"mbit_s": down_mbit})]


CHECKS = [Check("p2pd", OK, "started"), *_measured(PEERS[0], 100.0, 20.0, 40.0), *_measured(PEERS[1], 30.0, 80.0, 8.0),
          Check("latency", FAIL, "no echo: timed out", peer=PEERS[2].label)]


def test_written_figures_rebuild_the_measured_links():
    measured, left_out = measured_peers(CHECKS, PEERS + PEERS[:1])  # the first peer given twice is one worker
    assert [m.peer for m in measured] == PEERS[:2]
    assert left_out == ["10.0.0.3:31337 (latency: no echo: timed out; upload: not measured; download: not measured)"]
    text = network_text(measured, left_out, 4_000_000, 1, datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc))
    assert text.startswith("# Links measured by `farflung doctor` on 2026-12-01 12:00 UTC from this machine (worker 0) "
                           "to 2 peers:\n#   worker 1: 10.0.0.1:31337  RTT 100.0 ms")
    assert "left out, not measured: 10.0.0.3:31337" in text
    network = build_network(tomllib.loads(text), 3)
    approx = pytest.approx
    # Measured: one-way = RTT / 2 to each peer; this machine's upload is the peer's downlink and the reverse.
    assert network.pair_latency_s(0, 1) == network.pair_latency_s(1, 0) == approx(0.050, rel=1e-12)
    assert network.pair_latency_s(0, 2) == approx(0.015, rel=1e-12)
    assert (network.pair_bandwidth_bps(0, 1), network.pair_bandwidth_bps(1, 0)) == (approx(20e6), approx(40e6))
    assert (network.pair_bandwidth_bps(0, 2), network.pair_bandwidth_bps(2, 0)) == (approx(80e6), approx(8e6))
    # Estimated: the path through this machine, and each peer's rate to or from here as its access link.
    assert network.pair_latency_s(1, 2) == approx(0.065, rel=1e-12)
    assert network.pair_bandwidth_bps(1, 2) == approx(min(40e6, 80e6))
    assert network.pair_bandwidth_bps(2, 1) == approx(min(8e6, 20e6))


def test_the_file_pastes_under_an_arms_network_header():
    measured, left_out = measured_peers(CHECKS, PEERS)
    text = network_text(measured, left_out, 4_000_000, 1, datetime.now(timezone.utc))
    experiment = tomllib.loads(f'[[arm]]\nname = "measured"\nalgorithm = "diloco"\n[arm.network]\n{text}')
    assert experiment["arm"][0]["network"] == tomllib.loads(text)
    raw = tomllib.loads(DEMO.read_text())
    raw["run"]["workers"] = 3
    raw["arm"][2]["network"] = experiment["arm"][0]["network"]
    assert parse_spec(raw).arms[2].network == build_network(tomllib.loads(text), 3)


def test_nothing_measured_writes_nothing(tmp_path):
    target = tmp_path / "net.toml"
    check = write_measured_network(target, CHECKS[:1] + CHECKS[-1:], PEERS, 4_000_000, 1)
    assert check.status == FAIL and check.figure.startswith(f"nothing written to {target}")
    assert list(tmp_path.iterdir()) == []
    check = write_measured_network(target, CHECKS, PEERS, 4_000_000, 1)
    assert check.status == OK and check.values == {"path": str(target), "workers": 3}
    assert list(tmp_path.iterdir()) == [target]


def test_a_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "net.toml"
    target.write_text("old")
    measured, left_out = measured_peers(CHECKS, PEERS)
    text = network_text(measured, left_out, 4_000_000, 1, datetime.now(timezone.utc))

    def broken(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("cluster.real.network_file.os.replace", broken)
    with pytest.raises(OSError):
        write_network(target, text)
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


@pytest.mark.parametrize("argv, message", [
    (["--write-network", "net.toml"], "--write-network: needs the machines to measure, --initial-peers"),
    (["--serve", "--write-network", "net.toml"], "--write-network: needs the machines to measure"),
    (["--initial-peers", "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWPoea5ho9VykyKJZs9Fc62Zr7FUyHL5hVg128Z8HVYN1j",
      "--write-network", "no/such/folder/net.toml"], "--write-network: 'no/such/folder/net.toml' is a folder or in"),
])
def test_bad_write_network_exits_2_before_measuring(argv, message, capsys):
    assert cli.main(["doctor", *argv]) == 2
    assert message in capsys.readouterr().err
