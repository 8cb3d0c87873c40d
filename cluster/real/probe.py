"""The probe protocol: what `farflung doctor` measures against. Every real-run peer serves it on its DHT's daemon
(`RealPeer.join` calls `serve_probe`), so doctor can measure to the "swarm" address a run prints; `farflung doctor
--serve` runs a standalone probe peer (`serve`).

Four libp2p stream handlers, `/farflung/doctor/{echo,sink,source,dialback}/1.0.0`:

    echo       the caller writes PING_BYTES (32) at a time; each is written back, until the caller closes.
    sink       the caller writes an 8-byte big-endian length N (HEADER_BYTES, at most MAX_PROBE_BYTES), then N bytes;
               after the last the server writes one ACK byte (0x06).
    source     the caller writes the same 8-byte length N; the server writes N zero bytes, then closes.
    dialback   request and reply are JSON in hivemind's raw-data framing (`P2P.send_raw_data`: an 8-byte big-endian
               length, then the bytes). Request {"maddrs": [...], "timeout_s": t}: the server dials the caller's own
               peer id (never one it is told) at each of the first MAX_DIALBACK_ADDRS addresses, each from a new
               listen-less daemon, with t capped at MAX_DIALBACK_TIMEOUT_S and at most two requests at once. Reply
               {"observed": where the caller's connection came from, "results": [{"maddr", "ok", "seconds",
               "error"}, ...]}.

A caller that goes away or sends garbage sees its stream close without a reply. Also here, because doctor uses them
too: the p2pd process helpers that stop daemons left behind, and what addresses and p2pd's errors mean.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import sys
import time
from contextlib import closing

ECHO, SINK, SOURCE, DIALBACK = (f"/farflung/doctor/{name}/1.0.0" for name in ("echo", "sink", "source", "dialback"))
HEADER_BYTES = 8  # big-endian length prefix of a sink/source request
PING_BYTES = 32
ACK = b"\x06"
BLOCK_BYTES = 1 << 20
MAX_PROBE_BYTES = 1 << 30  # what a probe server agrees to move for one request
MAX_DIALBACK_ADDRS = 8  # each address gets its own short-lived daemon on the server
MAX_DIALBACK_TIMEOUT_S = 30.0
CGNAT = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT: not RFC 1918, still not reachable from outside


# --- the probe server ----------------------------------------------------------------------------------------------
def serve_probe(dht, timeout_s: float = 30.0) -> None:
    """Register the doctor's probe handlers on a running `hivemind.DHT`'s daemon.

    They are registered from inside the DHT's own process (`run_coroutine`) and run on its event loop, so they answer
    for as long as the DHT lives and need no event loop in the caller (a Ray actor has none). A replica from
    `dht.replicate_p2p()` would serve only while the caller kept an event loop running."""
    dht.run_coroutine(_serve_in_dht, return_future=True).result(timeout_s)


async def _serve_in_dht(_dht, node) -> None:
    await add_probe_handlers(node.p2p)


async def add_probe_handlers(p2p) -> None:
    """Echo (RTT), sink + ack (upload), source (download) and dial-back (reachability) on a `hivemind.p2p.P2P`."""
    dialbacks = asyncio.Semaphore(2)  # a flood of dial-back requests must not start a flood of daemons

    async def echo(info, reader, writer):
        while True:
            writer.write(await reader.readexactly(PING_BYTES))
            await writer.drain()

    async def sink(info, reader, writer):
        left = _requested_bytes(await reader.readexactly(HEADER_BYTES))
        while left:
            chunk = await reader.read(min(left, BLOCK_BYTES))
            if not chunk:
                return
            left -= len(chunk)
        writer.write(ACK)
        await writer.drain()

    async def source(info, reader, writer):
        left, block = _requested_bytes(await reader.readexactly(HEADER_BYTES)), memoryview(bytes(BLOCK_BYTES))
        while left:
            writer.write(block[:min(left, BLOCK_BYTES)])
            await writer.drain()
            left -= min(left, BLOCK_BYTES)

    async def dialback(info, reader, writer):
        from hivemind.p2p import P2P

        request = json.loads(await P2P.receive_raw_data(reader))
        timeout_s = min(float(request["timeout_s"]), MAX_DIALBACK_TIMEOUT_S)
        async with dialbacks:
            # The peer id is the caller's, never one it names: the server only ever confirms who is asking.
            results = await asyncio.gather(*(_dial_back(info.peer_id, str(maddr), timeout_s)
                                             for maddr in request["maddrs"][:MAX_DIALBACK_ADDRS]))
        await P2P.send_raw_data(json.dumps({"observed": str(info.addr), "results": results}).encode(), writer)

    for name, handler in ((ECHO, echo), (SINK, sink), (SOURCE, source), (DIALBACK, dialback)):
        await p2p.add_binary_stream_handler(name, _quietly_closed(handler))


def _quietly_closed(handler):
    async def wrapped(info, reader, writer):
        with closing(writer):
            try:
                await handler(info, reader, writer)
            except (asyncio.IncompleteReadError, ConnectionError, ValueError, KeyError, TypeError):
                pass  # the caller went away or sent garbage; it sees the stream close
    return wrapped


def _requested_bytes(header: bytes) -> int:
    nbytes = int.from_bytes(header, "big")
    if nbytes > MAX_PROBE_BYTES:
        raise ValueError(f"asked for {nbytes} bytes, more than {MAX_PROBE_BYTES}")
    return nbytes


async def _dial_back(peer_id, maddr: str, timeout_s: float) -> dict:
    """Dial `peer_id` at `maddr` from a new, listen-less daemon: its peerstore knows no other address to fall back on
    and it has no connection to reuse, so success means this address answers with that identity."""
    from hivemind.p2p import P2P
    from hivemind.utils.multiaddr import Multiaddr

    start, dialer, error = time.perf_counter(), None, ""
    try:
        address = Multiaddr(maddr)
        if "p2p" in address:
            address = address.decapsulate(Multiaddr(f"/p2p/{address['p2p']}"))
        dialer = await P2P.create(no_listen=True, auto_nat=False, nat_port_map=False, use_relay=False,
                                  dht_mode="client", startup_timeout=timeout_s)
        await asyncio.wait_for(dialer._client.connect(peer_id, [address]), timeout_s)  # P2P has no public connect
    except asyncio.TimeoutError:
        error = f"no answer within {timeout_s:g} s"
    except Exception as e:  # p2pd's, asyncio's and the multiaddr parser's errors all mean "did not answer"
        error = dial_error(e)
    finally:
        if dialer is not None:
            await dialer.shutdown()
    return {"maddr": maddr, "ok": not error, "seconds": time.perf_counter() - start, "error": error}


# --- a standalone probe peer, and the daemons it leaves --------------------------------------------------------------
def serve(host: str, port: int, serve_for_s: float | None, initial_peers: list[str], announce: list[str],
          timeout_s: float) -> int:
    """A standalone probe peer: a DHT with the probe handlers; prints its multiaddrs (one a line, flushed), serves
    until the time is up or Ctrl-C (exit 0), then stops the DHT and its daemon."""
    import hivemind

    before = p2pd_processes()
    dht = hivemind.DHT(initial_peers=initial_peers or None, start=False, host_maddrs=[listen_maddr(host, port)],
                       announce_maddrs=announce or None, startup_timeout=timeout_s)
    try:
        try:
            dht.run_in_background(await_ready=True, timeout=timeout_s)
            serve_probe(dht, timeout_s)
            maddrs = [str(m) for m in dht.get_visible_maddrs()]
        except Exception as e:  # hivemind's own errors (port taken, bootstrap failed) and a timeout
            print(f"FAIL serve: could not start a probe peer: {one_line(e)}\n     fix: "
                  f"{p2pd_fix(e, port, timeout_s)}", file=sys.stderr)
            return 1
        for maddr in maddrs:
            print(maddr, flush=True)
        shown = next((m for m in maddrs if address_kind(m) != "loopback"), maddrs[0])
        print(f"serving doctor probes {f'for {serve_for_s:g} s' if serve_for_s else 'until Ctrl-C'}; on another "
              f"machine: farflung doctor --initial-peers {shown}", file=sys.stderr, flush=True)
        deadline = time.monotonic() + serve_for_s if serve_for_s else float("inf")
        try:
            while dht.is_alive() and time.monotonic() < deadline:
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        except KeyboardInterrupt:  # the normal way to stop serving
            pass
        if not dht.is_alive():
            print("FAIL serve: the DHT process died\n     fix: rerun with --verbose to see why", file=sys.stderr)
            return 1
        return 0
    finally:
        # Taken while they are still descendants: a DHT process terminated the hard way orphans its daemon.
        owned = {pid: p for pid, p in p2pd_processes().items() if pid not in before}
        dht.shutdown()
        stop_leftovers({}, owned)


def p2pd_processes() -> dict:
    """This process's descendant p2pd daemons (psutil handles by pid): each P2P's own, and a DHT process's."""
    import psutil

    found = {}
    for child in psutil.Process().children(recursive=True):
        try:
            if child.name() == "p2pd":
                found[child.pid] = child
        except psutil.Error:  # gone since listed
            pass
    return found


def stop_leftovers(before: dict, candidates: dict | None = None) -> None:
    """Kill daemons (`candidates`, default this process's descendant daemons now) not in `before` that outlived their
    owner's shutdown, e.g. after a Ctrl-C mid-start. A psutil handle refuses to signal a pid since reused."""
    import psutil

    for pid, process in (p2pd_processes() if candidates is None else candidates).items():
        if pid not in before:
            try:
                process.kill()
                process.wait(5)
            except psutil.Error:  # the normal case: its owner's shutdown already stopped it
                pass


# --- what addresses and errors mean, to both sides -------------------------------------------------------------------
def address_kind(maddr: str) -> str:
    """'loopback', 'private', 'carrier-grade NAT', 'public', 'relayed', 'name' or 'other' for a multiaddr string."""
    parts = maddr.split("/")
    if "p2p-circuit" in parts:
        return "relayed"
    for proto in ("ip4", "ip6"):
        if proto in parts and parts.index(proto) + 1 < len(parts):
            try:
                ip = ipaddress.ip_address(parts[parts.index(proto) + 1])
            except ValueError:
                return "other"
            if ip.is_loopback:
                return "loopback"
            if ip.version == 4 and ip in CGNAT:
                return "carrier-grade NAT"
            if ip.is_private or ip.is_link_local:
                return "private"
            return "public" if ip.is_global else "other"
    return "name" if any(p.startswith("dns") for p in parts) else "other"


def p2pd_fix(error: Exception, port: int, timeout_s: float) -> str:
    import platform

    text = str(error).lower()
    if "address already in use" in text:
        return f"port {port} is taken: pick another --port, or stop what listens on it"
    if "failed to start in" in text:
        return (f"p2pd did not report ready within {timeout_s:g} s: on a loaded machine raise --timeout; "
                "--verbose shows p2pd's own log")
    if "not found" in text or "format" in text or isinstance(error, OSError):
        return ("hivemind's bundled p2pd cannot run here: reinstall it (pip install --force-reinstall --no-deps "
                f"hivemind==1.1.12); on a platform without a prebuilt p2pd ({platform.system()}/"
                f"{platform.machine()}), build it: HIVEMIND_BUILDGO=1 pip install hivemind==1.1.12 (needs Go)")
    return "rerun with --verbose to see p2pd's log; if the binary is damaged, pip install --force-reinstall hivemind"


def dial_error(error: Exception) -> str:
    """p2pd's 'failed to dial: ... all dials failed\\n * [/ip4/...] dial tcp4 ...: connection refused' -> the cause."""
    text = str(error).strip()
    return one_line(text.rsplit("] ", 1)[-1] if "] " in text else text)


def one_line(error) -> str:
    return " ".join(str(error).split())[:300]


def listen_maddr(host: str, port: int) -> str:
    return f"/ip{ipaddress.ip_address(host).version}/{host}/tcp/{port}"

