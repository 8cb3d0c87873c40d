"""`farflung doctor`: can this machine take part in a real run? The command line over the checks of
`cluster.real.doctor_checks` (what each measures, and its timeouts), the probe peer of `cluster.real.probe`
(`--serve`), and `--write-network FILE`, which writes the links measured to the initial peers as an experiment's network
table (`cluster.real.network_file`). Every daemon doctor starts is stopped before it returns, on failure and Ctrl-C too.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

from cluster.real.doctor_checks import FAIL, SKIP, Peer, diagnose
from cluster.real.network_file import write_measured_network
from cluster.real.probe import MAX_PROBE_BYTES, p2pd_processes, serve, stop_leftovers

DEFAULT_BYTES = 4_000_000


# --- command line ----------------------------------------------------------------------------------------------------
def _number(kind, low: float, high: float, hint: str):
    """An argparse type: `kind(text)` in [low, high] (NaN fails both comparisons)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not (low <= value <= high):
            raise argparse.ArgumentTypeError(f"expected {hint}, got {text!r}")
        return value
    return parse


def _size(text: str) -> int:
    from cluster.shaping.verify import parse_size

    size = parse_size(text)
    if size > MAX_PROBE_BYTES:
        raise argparse.ArgumentTypeError(f"at most {MAX_PROBE_BYTES >> 20} MiB (a probe server refuses more); "
                                         f"a few MB measure a link, e.g. 4MB")
    return size


def add_arguments(parser) -> None:
    parser.description = ("Check that this machine can take part in a real run: hivemind's p2pd starts, the DHT "
                          "joins, others can dial this machine, and the latency and bandwidth to each initial peer.")
    parser.add_argument("--initial-peers", action="append", default=[], metavar="MULTIADDR",
                        help="a peer to join and measure to (repeatable): the 'swarm' address a real run prints, or "
                             "one that `farflung doctor --serve` prints")
    parser.add_argument("--serve", action="store_true", help="run a probe peer for others' doctors instead")
    parser.add_argument("--serve-for", type=_number(float, 0.001, 1e9, "seconds, e.g. 600"), metavar="SECONDS",
                        help="with --serve: stop after this long (default: until Ctrl-C)")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0: all interfaces)")
    parser.add_argument("--port", type=_number(int, 0, 65535, "a TCP port 0-65535 (0: any free one)"), default=0,
                        help="TCP port to listen on (default 0: any free one); give the one your real run will use "
                             "to test that it is reachable")
    parser.add_argument("--announce", action="append", default=[], metavar="MULTIADDR",
                        help="address to announce instead of the listening ones, e.g. /ip4/PUBLIC_IP/tcp/PORT for a "
                             "forwarded port (repeatable)")
    parser.add_argument("--timeout", type=_number(float, 0.001, 3600, "seconds up to 3600, e.g. 10"), default=10.0,
                        metavar="SECONDS", help="for starting p2pd, each connection, the DHT join, the dial-back and "
                                                "the latency probe (default 10); transfers get this plus --bytes at "
                                                "1 Mbit/s")
    parser.add_argument("--bytes", type=_size, default=DEFAULT_BYTES, metavar="SIZE",
                        help="bytes each bandwidth transfer moves, e.g. 4MB (default), 16MiB")
    parser.add_argument("--streams", type=_number(int, 1, 64, "a number of streams 1-64, e.g. 4"), default=1,
                        help="parallel streams per transfer (default 1: hivemind's all-reduce uses one per pair of "
                             "peers); libp2p caps the bytes in flight per stream, so over a long round trip one "
                             "stream runs below the link's rate and a few measure the link itself")
    parser.add_argument("--write-network", metavar="FILE",
                        help="write the links measured to the initial peers to FILE as a network table an experiment "
                             "can use (this machine is worker 0, each measured peer the next); see "
                             "cluster/real/network_file.py for what is measured and what is estimated")
    parser.add_argument("--json", action="store_true", help="print the checks as one JSON object")
    parser.add_argument("--verbose", action="store_true", help="show hivemind's and p2pd's log")


def _argument_error(args) -> str:
    """'--flag: what is wrong and the fix', or ''. Needs hivemind (its multiaddr parser), so runs after parsing."""
    from hivemind.utils.multiaddr import Multiaddr

    try:
        ipaddress.ip_address(args.host)
    except ValueError:
        return f"--host: expected an IP address to listen on, such as 0.0.0.0 or 127.0.0.1, got {args.host!r}"
    if args.write_network is not None:
        if args.serve or not args.initial_peers:
            return ("--write-network: needs the machines to measure, --initial-peers (and not --serve); e.g. "
                    "--initial-peers /ip4/203.0.113.5/tcp/31337/p2p/12D3KooW... --write-network measured.toml")
        target = Path(args.write_network)
        if target.is_dir() or not target.parent.is_dir():
            return (f"--write-network: {args.write_network!r} is a folder or in no existing folder; give a file path "
                    f"such as measured.toml")
    for flag, maddrs in (("--initial-peers", args.initial_peers), ("--announce", args.announce)):
        for text in maddrs:
            try:
                maddr = Multiaddr(text)
            except Exception:  # the parser raises several classes for malformed text
                maddr = None
            if flag == "--initial-peers" and (maddr is None or "p2p" not in maddr):
                return (f"--initial-peers: {text!r} is not a multiaddr with a peer id; copy the whole address a run "
                        f"prints after 'swarm', e.g. /ip4/203.0.113.5/tcp/31337/p2p/12D3KooW...")
            if flag == "--announce" and (maddr is None or "tcp" not in maddr or maddr["tcp"] == "0"):
                return f"--announce: {text!r} is not a multiaddr with a TCP port, e.g. /ip4/203.0.113.5/tcp/31337"
    return ""


def _peers(initial_peers: list[str]) -> list[Peer]:
    from hivemind.p2p import PeerID
    from hivemind.utils.multiaddr import Multiaddr

    peers = []
    for text in initial_peers:
        maddr = Multiaddr(text)
        address = maddr.decapsulate(Multiaddr(f"/p2p/{maddr['p2p']}"))
        parts = str(address).split("/")
        label = f"{parts[2]}:{parts[4]}" if len(parts) > 4 else str(address)
        peers.append(Peer(text, PeerID.from_base58(maddr["p2p"]), address, label))
    return peers


def main(args) -> int:
    error = _argument_error(args)
    if error:
        print(f"farflung doctor: error: {error}", file=sys.stderr)
        return 2
    hivemind_log = logging.getLogger("hivemind")
    level = hivemind_log.level
    if not args.verbose:  # hivemind logs every failed dial; doctor's lines say what matters
        hivemind_log.setLevel(logging.CRITICAL)
    before = p2pd_processes()
    try:
        if args.serve:
            return serve(args.host, args.port, args.serve_for, args.initial_peers, args.announce, args.timeout)
        peers = _peers(args.initial_peers)
        checks = asyncio.run(diagnose(peers, args.host, args.port, args.announce, args.timeout, args.bytes,
                                      args.streams))
    finally:
        stop_leftovers(before)
        hivemind_log.setLevel(level)
    if args.write_network is not None:
        checks.append(write_measured_network(args.write_network, checks, peers, args.bytes, args.streams))
    failed = [c for c in checks if c.status == FAIL]
    if args.json:
        print(json.dumps({"ok": not failed, "checks": [asdict(c) for c in checks]}, indent=1, default=str))
    else:
        for c in checks:
            print(f"{c.status:4} {c.name:9} {c.peer + '  ' if c.peer else ''}{c.figure}")
            if c.fix:
                print(f"     {'fix' if c.status == FAIL else 'how'}: {c.fix}")
        skipped = sum(c.status == SKIP for c in checks)
        print((f"{len(failed)} check(s) failed" if failed else "all checks passed")
              + (f", {skipped} skipped" if skipped else ""))
    return 1 if failed else 0

