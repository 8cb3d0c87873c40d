"""The checks of `farflung doctor` (the command line is `cluster.real.doctor`): can this machine take part in a real
run? Each check gives one line, "ok"/"FAIL"/"skip" and what it measured; a failure adds one line saying what to do.

    p2pd       hivemind's bundled libp2p daemon starts here (the binary fits this platform, the port is free).
    dht        a hivemind DHT node on that daemon joins `--initial-peers` and has a peer in its routing table.
    reachable  can others dial this machine? An initial peer dials each address this peer announces, from a fresh
               libp2p identity (so a new connection, not the one this peer opened), and reports which answered.
               p2pd's control API does not expose AutoNAT's verdict; a dial-back is the same test, made on purpose.
               Without initial peers the addresses are only classified (loopback, private, public).
    latency    median round trip of small messages on one libp2p stream to each initial peer.
    upload     `--bytes` sent on one libp2p stream, timed from the first byte until the receiver acknowledges the
    download   last; and the same the other way. One measured round trip is in that span (first byte out, last ack
               back); it is subtracted. This is the rate of one stream, which is what hivemind's all-reduce uses
               between two peers; libp2p's multiplexer caps the bytes in flight per stream, so over a long round trip
               it is below the link's rate (one stream at 20 Mbit/s and 100 ms RTT: ~17 Mbit/s), and `--streams 4`
               measures the link itself, comparable with an experiment file's `uplink`/`downlink`.

The far end of these checks is the probe protocol of `cluster.real.probe`: handlers on a running DHT's daemon.
Real-run peers serve them, so doctor can measure to the "swarm" address a run prints; `farflung doctor --serve` runs a
standalone probe peer.
Every daemon doctor starts is stopped before it returns, on failure and Ctrl-C too.

Timeouts: `--timeout` bounds the daemon's start, each connection, the DHT join, the dial-back (per address, all at
once) and the latency probe; a transfer gets `--timeout` plus the time `--bytes` take at 1 Mbit/s, the slowest link
worth training over (a slower one fails its check rather than hang).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from contextlib import closing
from dataclasses import dataclass, field

from cluster.real.probe import (ACK, BLOCK_BYTES, DIALBACK, ECHO, HEADER_BYTES, MAX_DIALBACK_ADDRS, PING_BYTES, SINK,
                                SOURCE, address_kind, dial_error, listen_maddr, one_line, p2pd_fix)

ROUNDS = 9  # timed round trips, after one untimed that opens the stream
MIN_USEFUL_BPS = 1e6
OK, FAIL, SKIP = "ok", "FAIL", "skip"


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # OK, FAIL or SKIP
    figure: str  # what was measured, for a person
    fix: str = ""  # what to do, one line; for SKIP, how to run the check
    peer: str = ""  # the initial peer measured, host:port
    values: dict = field(default_factory=dict)  # the figures as numbers, for --json


# --- the checks ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Peer:
    maddr: str
    peer_id: object  # hivemind PeerID
    address: object  # the multiaddr without /p2p/
    label: str  # host:port


async def diagnose(peers: list[Peer], host: str, port: int, announce: list[str], timeout_s: float,
                   nbytes: int, streams: int = 1) -> list[Check]:
    """The checks, in order, from a new daemon listening on `host:port`; it is stopped before this returns, when
    cancelled (Ctrl-C) too."""
    from hivemind.p2p import P2P

    start = time.perf_counter()
    try:
        p2p = await P2P.create(host_maddrs=[listen_maddr(host, port)], announce_maddrs=announce or None,
                               startup_timeout=timeout_s)
        startup_s = time.perf_counter() - start
    except Exception as e:  # the daemon's own errors, and OSError from a binary that cannot run here
        await asyncio.sleep(0.1)  # let asyncio reap the exited daemon before the loop closes (else it warns)
        return [Check("p2pd", FAIL, f"did not start: {one_line(e)}", p2pd_fix(e, port, timeout_s)),
                *(Check(name, SKIP, "p2pd did not start") for name in ("dht", "reachable"))]
    try:
        from hivemind import __version__

        announced = [str(m) for m in await p2p.get_visible_maddrs(latest=True)]
        checks = [Check("p2pd", OK, f"started in {startup_s:.2f} s (hivemind {__version__}), peer id {p2p.peer_id}",
                        values={"startup_s": startup_s})]
        errors = await asyncio.gather(*(_connect(p2p, p, timeout_s) for p in peers))  # "" where it connected
        reached = [p for p, error in zip(peers, errors) if not error]
        checks.append(await _check_dht(p2p, peers, reached, errors, timeout_s))
        checks.append(await _check_reachable(p2p, announced, peers, reached, timeout_s, port))
        for peer in reached:
            checks += await _measure(p2p, peer, timeout_s, nbytes, streams)
        return checks
    finally:
        await p2p.shutdown()


async def _connect(p2p, peer: Peer, timeout_s: float) -> str:
    """Open a connection to `peer` at exactly its given address; "" or why not."""
    try:
        await asyncio.wait_for(p2p._client.connect(peer.peer_id, [peer.address]), timeout_s)
        return ""
    except asyncio.TimeoutError:
        return f"no answer within {timeout_s:g} s"
    except Exception as e:  # p2pd reports every dial failure as ControlFailure with the socket error inside
        return dial_error(e)


async def _check_dht(p2p, peers: list[Peer], reached: list[Peer], errors: list[str], timeout_s: float) -> Check:
    from hivemind.dht.node import DHTNode

    if not peers:
        return Check("dht", SKIP, "no --initial-peers given, nothing to join",
                     "to test joining, pass --initial-peers with the address a real run prints when it starts "
                     "('swarm /ip4/.../p2p/... run id ...'), or one `farflung doctor --serve` prints elsewhere")
    if not reached:
        answers = "; ".join(f"{p.label}: {error}" for p, error in zip(peers, errors))
        return Check("dht", FAIL, f"none of {len(peers)} initial peers answered: {answers}",
                     "check the address (copy the whole 'swarm ...' multiaddr of a run that is still going), and that "
                     "this machine can open TCP connections to that host and port (firewall, VPN); "
                     "`farflung doctor --serve --port P` on that machine tests the link without a run")
    start = time.perf_counter()
    try:  # hivemind's join: pings answered within bootstrap_timeout, then a search for neighbours up to the same
        # deadline; twice that leaves the search's last request time to finish
        node = await asyncio.wait_for(DHTNode.create(p2p=p2p, initial_peers=[p.maddr for p in reached],
                                                     bootstrap_timeout=timeout_s), 2 * timeout_s)
    except Exception as e:  # hivemind raises RuntimeError when no initial peer answers a DHT ping
        return Check("dht", FAIL, f"connected to {len(reached)} of {len(peers)} initial peers, but the DHT did not "
                     f"join: {one_line(e) or 'no DHT answer within ' + format(timeout_s, 'g') + ' s'}",
                     "the peer answers but runs no hivemind DHT: give the 'swarm' address of a real run or of "
                     "`farflung doctor --serve`, not another service's")
    try:
        seen = len(node.protocol.routing_table.peer_id_to_uid)
    finally:
        await node.shutdown()
    seconds = time.perf_counter() - start
    unreached = "; ".join(f"{p.label}: {error}" for p, error in zip(peers, errors) if error)
    figure = (f"joined through {len(reached)} of {len(peers)} initial peers in {seconds:.2f} s; {seen} peer(s) in "
              f"the routing table" + (f"; unreachable: {unreached}" if unreached else ""))
    if seen == 0:
        return Check("dht", FAIL, figure, "the swarm answered but shared no peers: it may be shutting down; retry "
                     "with the address of a run that is going", values={"join_s": seconds, "peers_seen": seen})
    return Check("dht", OK, figure, values={"join_s": seconds, "peers_seen": seen})


async def _check_reachable(p2p, announced: list[str], peers: list[Peer], reached: list[Peer], timeout_s: float,
                           port: int) -> Check:
    from hivemind.p2p import P2P

    kinds = {maddr: address_kind(maddr) for maddr in announced}
    listed = ", ".join(f"{_short(m)} ({k})" for m, k in kinds.items())
    if not reached:
        why = "no initial peer answered, so none could dial back" if peers else "not verified"
        how = "" if peers else ("to verify, rerun with --initial-peers of a running run, or of `farflung doctor "
                                "--serve` on a machine elsewhere: it dials this machine back")
        return Check("reachable", SKIP, f"announced {listed}; {why}. {what_addresses_mean(kinds.values())}", how,
                     values={"announced": kinds})
    asker = reached[0]
    try:
        _, reader, writer = await p2p.call_binary_stream_handler(asker.peer_id, DIALBACK)
        with closing(writer):
            request = {"maddrs": announced[:MAX_DIALBACK_ADDRS], "timeout_s": timeout_s}
            await P2P.send_raw_data(json.dumps(request).encode(), writer)
            # The server starts one daemon per address (up to `timeout_s`), then dials (up to `timeout_s`).
            reply = json.loads(await asyncio.wait_for(P2P.receive_raw_data(reader), 2 * timeout_s + 5))
    except Exception as e:  # the peer lacks the handler, or went away
        return Check("reachable", FAIL, f"{asker.label} did not dial back: {one_line(e) or 'no reply'}",
                     _no_probe_fix(asker), asker.label, {"announced": kinds})
    answered = [r for r in reply["results"] if r["ok"]]
    results = "; ".join(f"{_short(r['maddr'])} ({kinds.get(r['maddr'], '?')}) "
                        f"{'answered in %.2f s' % r['seconds'] if r['ok'] else r['error']}" for r in reply["results"])
    observed = reply.get("observed", "")
    figure = (f"{len(answered)} of {len(reply['results'])} announced addresses answered {asker.label}'s dial-back: "
              f"{results}; it sees this machine as {_short(observed)}")
    values = {"announced": kinds, "dialback": reply["results"], "observed": observed}
    if not answered:
        return Check("reachable", FAIL, figure, _unreachable_fix(port, observed), asker.label, values)
    return Check("reachable", OK, figure, peer=asker.label, values=values)


async def _measure(p2p, peer: Peer, timeout_s: float, nbytes: int, streams: int) -> list[Check]:
    checks, rtt_s = [], None
    try:
        rtts, via = await asyncio.wait_for(_round_trips(p2p, peer), timeout_s)
        rtt_s = statistics.median(rtts)
        checks.append(Check("latency", OK, f"median RTT {rtt_s * 1e3:.1f} ms over {len(rtts)} round trips (min "
                            f"{min(rtts) * 1e3:.1f}, max {max(rtts) * 1e3:.1f} ms){_via(peer, via)}", peer=peer.label,
                            values={"rtt_ms": rtt_s * 1e3, "rtts_ms": [r * 1e3 for r in rtts], "via": via}))
    except Exception as e:  # TimeoutError, or p2pd's error for a peer that lacks the handler
        checks.append(Check("latency", FAIL, f"no echo: {one_line(e) or f'none within {timeout_s:g} s'}",
                            _no_probe_fix(peer), peer.label))
    transfer_timeout_s = timeout_s + nbytes * 8 / MIN_USEFUL_BPS
    shares = [nbytes // streams + (i < nbytes % streams) for i in range(streams)]
    for name, transfer in (("upload", _upload), ("download", _download)):
        start = time.perf_counter()
        try:
            vias = await asyncio.wait_for(asyncio.gather(*(transfer(p2p, peer, share) for share in shares)),
                                          transfer_timeout_s)
        except asyncio.TimeoutError:
            checks.append(Check(name, FAIL, f"{nbytes / 1e6:.2f} MB not done within {transfer_timeout_s:.0f} s",
                                f"the link moves less than {MIN_USEFUL_BPS / 1e6:g} Mbit/s, too slow to train over: "
                                f"use a wired connection or another network, or measure again with fewer --bytes",
                                peer.label))
            continue
        except Exception as e:  # the peer lacks the handler, or the stream broke
            checks.append(Check(name, FAIL, f"transfer failed: {one_line(e)}", _no_probe_fix(peer), peer.label))
            continue
        seconds = time.perf_counter() - start
        wire_s = seconds - rtt_s if rtt_s is not None and seconds > 2 * rtt_s else seconds
        mbps = nbytes * 8 / wire_s / 1e6
        checks.append(Check(name, OK, f"{mbps:.1f} Mbit/s ({nbytes / 1e6:.2f} MB on {streams} stream"
                            f"{'s' if streams > 1 else ''}, acknowledged in {seconds:.3f} s, "
                            f"{'one RTT' if wire_s != seconds else 'no RTT'} subtracted){_via(peer, vias[0])}",
                            peer=peer.label, values={"mbit_s": mbps, "bytes": nbytes, "streams": streams,
                                                     "seconds": seconds, "via": vias[0]}))
    return checks


async def _round_trips(p2p, peer: Peer) -> tuple[list[float], str]:
    info, reader, writer = await p2p.call_binary_stream_handler(peer.peer_id, ECHO)
    with closing(writer):
        payload, rtts = bytes(PING_BYTES), []
        for i in range(ROUNDS + 1):  # the first also negotiates the stream's protocol
            start = time.perf_counter()
            writer.write(payload)
            await writer.drain()
            await reader.readexactly(PING_BYTES)
            if i:
                rtts.append(time.perf_counter() - start)
    return rtts, str(info.addr)


async def _upload(p2p, peer: Peer, nbytes: int) -> str:
    info, reader, writer = await p2p.call_binary_stream_handler(peer.peer_id, SINK)
    with closing(writer):
        left, block = nbytes, memoryview(bytes(BLOCK_BYTES))
        writer.write(nbytes.to_bytes(HEADER_BYTES, "big"))
        while left:
            writer.write(block[:min(left, BLOCK_BYTES)])
            await writer.drain()
            left -= min(left, BLOCK_BYTES)
        if await reader.readexactly(1) != ACK:
            raise ConnectionError("the receiver did not acknowledge")
        return str(info.addr)


async def _download(p2p, peer: Peer, nbytes: int) -> str:
    info, reader, writer = await p2p.call_binary_stream_handler(peer.peer_id, SOURCE)
    with closing(writer):
        left = nbytes
        writer.write(nbytes.to_bytes(HEADER_BYTES, "big"))
        await writer.drain()
        while left:
            chunk = await reader.read(min(left, BLOCK_BYTES))
            if not chunk:
                raise ConnectionError(f"the sender closed with {left} of {nbytes} bytes still to come")
            left -= len(chunk)
        return str(info.addr)


# --- what addresses and errors mean ----------------------------------------------------------------------------------
def what_addresses_mean(kinds) -> str:
    kinds = set(kinds)
    if kinds & {"public", "name"}:
        return "A public address is announced: peers anywhere can dial it unless a firewall drops the port."
    if kinds & {"private", "carrier-grade NAT"}:
        return ("Private addresses only: machines on the same network or VPN can dial this one, others cannot "
                "(NAT); to join from elsewhere, forward a TCP port to it and --announce your public address.")
    if kinds == {"loopback"}:
        return "Loopback only: only this machine can dial it; listen on --host 0.0.0.0 or this machine's address."
    return "No address that others can be told of."


def _unreachable_fix(port: int, observed: str) -> str:
    """`observed`: where the dialling peer saw this machine's connection come from, its public address if NATed."""
    ip = "/".join(observed.split("/")[1:3]) if address_kind(observed) == "public" else "ip4/PUBLIC_IP"
    where = f"TCP port {port}" if port else "a fixed TCP port (rerun with --port P)"
    return (f"others cannot open connections to this machine: forward {where} to it on your router/firewall and "
            f"announce it, --announce /{ip}/tcp/{port or 'P'}; or join with `farflung join --client-mode` (it then "
            f"dials out only, and collaborative arms accept it)")


def _no_probe_fix(peer: Peer) -> str:
    return (f"{peer.label} accepts connections but does not answer the doctor's probes: it runs an older farflung, "
            f"or is overloaded; run `farflung doctor --serve` on that machine and point --initial-peers at it")


def _short(maddr: str) -> str:
    return maddr.split("/p2p/")[0]


def _via(peer: Peer, via: str) -> str:
    return "" if via == str(peer.address) else f" (over {via})"
