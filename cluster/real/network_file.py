"""`farflung doctor --write-network FILE`: the links doctor measured to its initial peers, as an experiment's network.

A volunteer group measures its machines from one of them, then simulates which algorithm suits those links. Worker 0
is the machine doctor ran on; worker j is the j-th initial peer whose latency, upload and download all measured
(peers that failed a check are left out and named in the file's comment).

The file is TOML of plain `key = value` lines (worker overrides as dotted keys, `workers.1.uplink = ...`), so it reads
as a `[network]` table on its own and can be pasted below an arm's `[arm.network]` header. The figures:

- Bandwidth. A transfer from worker i to worker j runs at min(i's uplink, j's downlink) (`cluster.network`). Peer j's
  uplink is what doctor downloaded from it and its downlink what doctor uploaded to it; this machine's uplink and
  downlink are the most it reached with any peer. Pairs with this machine then get exactly the measured rates; pairs of
  peers assume that each peer's rate to this machine was its own access link's (not so where this machine's link was
  the bottleneck: measure from the best-connected machine).
- Latency. Row and column 0 of `latency_matrix` are measured: one-way = median RTT / 2. Pairs of peers were not
  measured; each is filled with the sum of the two peers' one-way latencies to this machine, the path through here,
  an upper bound where latencies obey the triangle inequality. Replace them with figures doctor measures from those
  machines.
- Jitter and loss are not measured and stay 0.
"""

from __future__ import annotations

import os
import tempfile
import tomllib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from cluster.real.doctor_checks import FAIL, OK, Check, Peer

MEASURED = ("latency", "upload", "download")


@dataclass(frozen=True)
class MeasuredPeer:
    peer: Peer
    rtt_s: float  # median round trip
    upload_bps: float  # this machine -> the peer
    download_bps: float  # the peer -> this machine


def measured_peers(checks: list[Check], peers: list[Peer]) -> tuple[list[MeasuredPeer], list[str]]:
    """The peers whose latency, upload and download all measured, in the order given, and why each other one was
    left out ('host:port (check: figure)')."""
    measured, left_out = [], []
    for peer in {p.label: p for p in peers}.values():  # a peer given twice is one worker
        found = {c.name: c for c in checks if c.peer == peer.label and c.name in MEASURED}
        failed = [found.get(name) or Check(name, "missing", "not measured") for name in MEASURED
                  if name not in found or found[name].status != OK]
        if failed:
            left_out.append(f"{peer.label} ({'; '.join(f'{c.name}: {c.figure}' for c in failed)})")
            continue
        measured.append(MeasuredPeer(peer, found["latency"].values["rtt_ms"] / 1e3,
                                     found["upload"].values["mbit_s"] * 1e6, found["download"].values["mbit_s"] * 1e6))
    return measured, left_out


def _mbit(bps: float) -> str:
    return f'"{bps / 1e6:.3f}Mbit"'


def _ms(seconds: float) -> str:
    return f'"{seconds * 1e3:.3f}ms"'


def network_text(measured: list[MeasuredPeer], left_out: list[str], nbytes: int, streams: int,
                 when: datetime) -> str:
    """The network table (with its comment) for this machine and the measured peers."""
    assert measured, "a network needs at least one measured peer"
    n = len(measured) + 1
    one_way = [0.0] + [m.rtt_s / 2 for m in measured]
    rows = [[0.0 if i == j else one_way[i] + one_way[j] for j in range(n)] for i in range(n)]
    lines = [f"# Links measured by `farflung doctor` on {when:%Y-%m-%d %H:%M} UTC from this machine (worker 0) to "
             f"{len(measured)} peer{'s' * (len(measured) > 1)}:"]
    lines += [f"#   worker {j}: {m.peer.label}  RTT {m.rtt_s * 1e3:.1f} ms (median), upload to it "
              f"{m.upload_bps / 1e6:.1f} Mbit/s, download from it {m.download_bps / 1e6:.1f} Mbit/s  ({m.peer.maddr})"
              for j, m in enumerate(measured, 1)]
    lines += [f"#   left out, not measured: {why}" for why in left_out]
    lines += [
        f"# Transfers of {nbytes / 1e6:.2f} MB each way on {streams} stream{'s' * (streams > 1)} "
        f"(hivemind's all-reduce uses one per pair of peers).",
        f"# Use as an arm's network with run.workers = {n}: paste these lines below an [arm.network] header.",
        "# Pairs with worker 0 are measured; a pair of peers is estimated: its transfers run at the sender's measured",
        "# rate to here or the receiver's from here, whichever is less, and its latency is the sum of both peers'",
        "# latencies to here (the path through this machine). Measure from those machines to replace them.",
        "# Jitter and loss were not measured.",
        f"uplink = {_mbit(max(m.upload_bps for m in measured))}  # worker 0: the most it reached with any peer",
        f"downlink = {_mbit(max(m.download_bps for m in measured))}",
        'latency = "0ms"  # not used: latency_matrix gives every pair',
        "latency_matrix = [",
        *(f"    [{', '.join(_ms(s) for s in row)}]," for row in rows),
        "]",
    ]
    for j, m in enumerate(measured, 1):
        lines += [f"workers.{j}.uplink = {_mbit(m.download_bps)}", f"workers.{j}.downlink = {_mbit(m.upload_bps)}"]
    return "\n".join(lines) + "\n"


def write_network(path: str | Path, text: str) -> None:
    """Write `text` to `path` whole or not at all (a temporary file in the same folder, renamed over it)."""
    from cluster.network import build_network

    table = tomllib.loads(text)
    build_network(table, len(table["latency_matrix"]))  # an invariant: doctor writes what an experiment can read
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def write_measured_network(path: str | Path, checks: list[Check], peers: list[Peer], nbytes: int,
                           streams: int) -> Check:
    """Write the measured links to `path`; the outcome as doctor's "network" check."""
    measured, left_out = measured_peers(checks, peers)
    if not measured:
        return Check("network", FAIL, f"nothing written to {path}: no initial peer measured latency, upload and "
                     "download", "fix the failed checks above first; the file needs at least one measured peer")
    try:
        write_network(path, network_text(measured, left_out, nbytes, streams, datetime.now(timezone.utc)))
    except OSError as e:
        return Check("network", FAIL, f"could not write {path}: {e.strerror or e}",
                     "give --write-network a path in a folder you can write to")
    n = len(measured) + 1
    return Check("network", OK, f"wrote {path}: {n} workers (this machine and {len(measured)} measured peer"
                 f"{'s' * (len(measured) > 1)}{f'; {len(left_out)} left out' if left_out else ''}); use it as an "
                 f"arm's network with run.workers = {n}", values={"path": str(path), "workers": n})
