"""A real hivemind all-reduce of a model's worth of float32 among N peers on shaped links, against its lower bound.

For each --backend (relay: the userspace relay; kernel: tc in per-peer namespaces) and each --rate it starts N real
peers exactly as a real ddp arm does (`cluster.real.peer.RealPeer`: relay, DHT, `ExactAverager`, the part size and
timeouts of `cluster.real.options`), each in its own process, and runs --repeats all-reduces of a vector the size of
--model (`trainer.model.count_params`). It prints, per backend and rate:

- `bound_s`: the alpha-beta lower bound for the exchange, `cluster.collectives.butterfly_allreduce` on the same links
  (each peer sends and receives 2 (N-1)/N of the vector at its link's rate, plus one latency per phase);
- `measured_s`: the median over rounds of the slowest peer's `averager.step` (matchmaking + all-reduce), and
  `ratio` = measured / bound;
- `allreduce_s`: the median over rounds of the slowest peer's time from its group formed to the all-reduce done
  (`RoundReport.allreduce_s`), its ratio to the bound (`allreduce_ratio`), and `matchmaking_s` = what the step took
  besides (hivemind's matchmaking: DHT declarations, join requests, the leader's group assembly);
- `sent_mb`: the bytes each peer's relay counted as sent per round (median over peers and rounds), against
  `formula_mb` = 2 (N-1)/N of the vector: the difference is libp2p's and protobuf's framing and the RPCs.

    python bench/real_exchange.py                                    # relay and kernel, 100 and 20 Mbit/s, 4 peers
    python bench/real_exchange.py --backends kernel --rates 100Mbit --repeats 8 --json

Needs root for the kernel backend (it is skipped, with the reason, where unavailable). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's farflung, however it is started

from cluster.collectives import butterfly_allreduce  # noqa: E402
from cluster.network import Link, Network, parse_bandwidth, parse_duration  # noqa: E402
from cluster.real.options import RealOptions, averaging_timeouts, check_real_arm  # noqa: E402
from cluster.real.runtime import new_run_id, peer_namespaces  # noqa: E402
from trainer.model import PRESETS, count_params  # noqa: E402


def _log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def _peer_main(conn, worker: int, n: int, model: str, link: Link, options: RealOptions, run_id: str, port) -> None:
    """One peer's process: build a RealPeer, then answer the parent's commands until "stop"."""
    mp.set_start_method("fork", force=True)  # hivemind forks its averager, as it does in a Ray worker
    import numpy as np
    import torch

    from cluster.real.peer import RealPeer
    from trainer.data import DataConfig
    from trainer.replica import OptimConfig, ReplicaSpec
    from trainer.strategies.ddp import DDPSettings

    spec = ReplicaSpec(worker=worker, n_workers=n, seed=0, model=PRESETS[model],
                       data=DataConfig(corpus="synthetic", synthetic_bytes=200_000), optim=OptimConfig(),
                       batch_size=1, total_steps=1, algorithm="ddp", settings=DDPSettings(),
                       eval_batches=1, torch_threads=1)
    peer = None
    try:
        peer = RealPeer(spec, link, options, run_id, port)
        while True:
            command, args = conn.recv()
            if command == "stop":
                break
            if command == "join":
                conn.send(("ok", peer.join(*args)))
            elif command == "average":
                timeouts, bandwidth = args
                size = peer.start_averaging(timeouts, bandwidth)
                with peer.averager.get_tensors() as tensors:  # the values do not change the bytes (codec none)
                    tensors[0].copy_(torch.from_numpy(np.random.default_rng(worker).standard_normal(size,
                                                                                                    np.float32)))
                conn.send(("ok", (peer.describe(), peer.announce())))
            elif command == "seen":
                conn.send(("ok", peer.peers_seen()))
            elif command == "step":
                before = peer.relay_counters()
                start = time.perf_counter()
                report = peer.averager.step(gather=worker, weight=1.0, timeout=peer.timeouts.matchmaking_deadline_s)
                wall = time.perf_counter() - start
                conn.send(("ok", {"wall_s": wall, "allreduce_s": report.allreduce_s,
                                  "group": len(report.workers), "complete": report.complete,
                                  "before": before, "after": peer.relay_counters()}))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        if peer is not None:
            peer.shutdown()


class _Peers:
    """N peer processes and their pipes; `call` sends one command to some peers and gathers their answers."""

    def __init__(self, n, model, links, options, run_id, ports):
        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        for w in range(n):
            parent, child = ctx.Pipe()
            # Not daemonic: a peer starts hivemind's processes. `close` stops (or kills) every one of them.
            proc = ctx.Process(target=_peer_main, args=(child, w, n, model, links[w], options, run_id, ports[w]))
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)

    def call(self, command, args_per_peer, workers=None, timeout_s=300.0):
        workers = range(len(self.conns)) if workers is None else workers
        for w, args in zip(workers, args_per_peer):
            self.conns[w].send((command, args))
        answers = []
        for w in workers:
            if not self.conns[w].poll(timeout_s):
                raise TimeoutError(f"peer {w} did not answer {command!r} in {timeout_s:.0f} s")
            status, value = self.conns[w].recv()
            if status != "ok":
                raise RuntimeError(f"peer {w} failed on {command!r}:\n{value}")
            answers.append(value)
        return answers

    def close(self):
        for conn in self.conns:
            try:
                conn.send(("stop", ()))
            except OSError:
                pass
        for proc in self.procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join()


def measure(backend: str, rate_bps: float, latency_s: float, n: int, model: str, repeats: int) -> dict:
    """All-reduce rounds among n peers on identical links of `rate_bps` each way and one-way `latency_s`."""
    from cluster.real.accounting import attribute, counters_delta

    link = Link(uplink_bps=rate_bps, downlink_bps=rate_bps, one_way_latency_s=latency_s)
    network = Network(links=(link,) * n)
    nbytes = 4 * count_params(PRESETS[model])
    bound = butterfly_allreduce(network, list(range(n)), nbytes)
    row = {"backend": backend, "rate_mbit": rate_bps / 1e6, "latency_ms": latency_s * 1e3, "n": n, "model": model,
           "vector_mb": nbytes / 1e6, "bound_s": bound.time_s, "formula_mb": 2 * (n - 1) / n * nbytes / 1e6}
    options = RealOptions(shaping=backend)
    try:
        check_real_arm("ddp", "none", network, shaping=backend)
    except ValueError as error:
        return {**row, "skipped": str(error)}
    timeouts = averaging_timeouts(network, nbytes, options)
    run_id = new_run_id(f"bench-{backend}")
    links = [options.link_of(network, w) for w in range(n)]
    t0 = time.perf_counter()
    with peer_namespaces(options, links, run_id) as ports:
        peers = _Peers(n, model, links, options, run_id, ports)
        try:
            bootstrap = peers.call("join", [(None,)], workers=[0])[0]
            peers.call("join", [(bootstrap,)] * (n - 1), workers=range(1, n))
            described = [d for d, _ in peers.call("average", [(timeouts, rate_bps / 1e6)] * n)]
            deadline = time.monotonic() + 120
            while not all(len(s) == n for s in peers.call("seen", [()] * n)):
                if time.monotonic() > deadline:
                    raise TimeoutError("the peers never all saw each other in the DHT")
                time.sleep(0.2)
            startup_s = time.perf_counter() - t0
            dial = [tuple(d["dial_address"]) for d in described]
            rounds = []
            for r in range(repeats):
                out = peers.call("step", [()] * n, timeout_s=timeouts.call_timeout_s)
                moved = attribute([counters_delta(o["before"], o["after"]) for o in out], dial)
                rounds.append({"wall_s": max(o["wall_s"] for o in out),
                               "allreduce_s": max(o["allreduce_s"] for o in out),
                               "complete": all(o["complete"] and o["group"] == n for o in out),
                               "sent_mb": statistics.median(moved.bytes_sent) / 1e6})
                _log(f"  {backend} {rate_bps / 1e6:g} Mbit round {r}: step {rounds[-1]['wall_s']:.2f} s, "
                     f"all-reduce {rounds[-1]['allreduce_s']:.2f} s (bound {bound.time_s:.2f} s)")
        finally:
            peers.close()
    measured = statistics.median(r["wall_s"] for r in rounds)
    allreduce = statistics.median(r["allreduce_s"] for r in rounds)
    return {**row, "startup_s": startup_s, "rounds": len(rounds), "complete": all(r["complete"] for r in rounds),
            "measured_s": measured, "ratio": measured / bound.time_s, "allreduce_s": allreduce,
            "allreduce_ratio": allreduce / bound.time_s, "matchmaking_s": measured - allreduce,
            "sent_mb": statistics.median(r["sent_mb"] for r in rounds),
            "walls_s": [r["wall_s"] for r in rounds], "allreduces_s": [r["allreduce_s"] for r in rounds]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", choices=("relay", "kernel", "none"), default=["relay", "kernel"],
                        help="none: no shaping, the machine's own floor for the same exchange (the bound is still "
                             "the shaped link's)")
    parser.add_argument("--rates", nargs="+", type=parse_bandwidth, default=[100e6, 20e6], help="e.g. 100Mbit 20Mbit")
    parser.add_argument("--latency", type=parse_duration, default=0.0, help="one-way per link, e.g. 10ms (default 0)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--model", choices=sorted(PRESETS), default="small")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    rows, load_before = [], os.getloadavg()[0]
    for backend in args.backends:
        for rate in args.rates:
            _log(f"{backend}, {rate / 1e6:g} Mbit/s, {args.workers} peers, {args.model}:")
            rows.append(measure(backend, rate, args.latency, args.workers, args.model, args.repeats))
    machine = (f"{platform.machine()} Linux {platform.release()}, {os.cpu_count()} CPUs, load average "
               f"{load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end")
    if args.json:
        print(json.dumps({"machine": machine, "rows": rows}, indent=1))
        return 0
    print(machine)
    print(f"{'backend':8} {'Mbit/s':>7} {'bound s':>8} {'step s':>7} {'ratio':>6} {'a-r s':>6} {'a-r ratio':>9} "
          f"{'match s':>7} {'sent MB':>8} {'formula MB':>10}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['backend']:8} {r['rate_mbit']:7g} skipped: {r['skipped']}")
            continue
        print(f"{r['backend']:8} {r['rate_mbit']:7g} {r['bound_s']:8.3f} {r['measured_s']:7.3f} {r['ratio']:6.2f} "
              f"{r['allreduce_s']:6.3f} {r['allreduce_ratio']:9.2f} {r['matchmaking_s']:7.3f} {r['sent_mb']:8.2f} "
              f"{r['formula_mb']:10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
