"""`farflung join`: a machine elsewhere joins a running real experiment (no Ray needed) and trains with it.

A real run prints, for every arm, `<arm>: swarm <multiaddr> run id <id>`. On another machine:

    farflung join --initial-peers <multiaddr> [--run-id <id>]

1. A short-lived client DHT reads the runs listed in the swarm (`cluster.real.swarm.RUNS_KEY`) and the arm's
   configuration (`CONFIG_KEY`): model, data, optimizer and hivemind settings. Without `--run-id` the swarm must list
   exactly one run.
2. This machine builds the same replica (its own data shard: worker n of n + 1) and a `hivemind.Optimizer` peer with
   the same settings, behind a relay that counts its bytes (unshaped: this machine's own link is what it is).
3. Before its first step it downloads the current parameters and optimizer state from a peer that holds them
   (`load_state_from_peers`), and until then neither trains nor offers its own state: were the run's peers all
   gone, it waits (up to `--timeout`, exit status 1) instead of starting the swarm again from its initial weights
   (the lone-restart guard, `cluster.real.swarm_state`). From then on it accumulates samples towards the swarm's
   epochs and averages with the others; a step that finds it behind again loads the state again.
4. It prints one line per epoch it closes (and one when it loads the state) and leaves when the run marks itself
   finished, after closing `--epochs` epochs, or on Ctrl-C, stopping every process it started.

Only swarm arms (collaborative, local-updates) can be joined: lockstep arms (ddp, diloco) average in groups of exactly
their configured workers.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time

from cluster.real.messages import EpochRecord
from cluster.real.swarm import CONFIG_KEY, RUNS_KEY
from cluster.real.swarm_setup import SwarmSetup


def _secret() -> bytes | None:
    """The run secret of the swarm to join, from this machine's environment (`cluster.real.secret`)."""
    from cluster.real.secret import run_secret

    try:
        return run_secret()
    except ValueError as e:
        raise JoinError(str(e)) from None


class JoinError(Exception):
    """A user-facing problem: one line, naming the flag or what to check."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--initial-peers", action="append", default=[], metavar="MULTIADDR", required=True,
                        help="a peer of the run, as printed when it started (repeatable)")
    parser.add_argument("--run-id", help="the run to join, as printed when it started (default: the only run the "
                                         "swarm lists)")
    parser.add_argument("--host", help="address this machine listens on and announces (default: the address it uses "
                                       "to reach the first initial peer)")
    parser.add_argument("--client-mode", action="store_true",
                        help="accept no incoming connections (behind NAT or a firewall; see farflung doctor)")
    parser.add_argument("--epochs", type=int, help="leave after closing this many epochs (default: until the run ends)")
    parser.add_argument("--threads", type=int, help="torch threads for training (default: torch's choice)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds to find the run and start, and to find a peer serving its state (default 60)")
    parser.add_argument("--out", help="write this machine's epoch records here, one JSON object per line")


def main(args: argparse.Namespace) -> int:
    try:
        return join(args)
    except JoinError as e:
        print(f"farflung join: error: {e}", file=sys.stderr)
        return 2


def _check(args: argparse.Namespace) -> None:
    from hivemind.utils.multiaddr import Multiaddr

    for maddr in args.initial_peers:
        try:
            address = Multiaddr(maddr)
        except Exception:
            raise JoinError(f"--initial-peers: {maddr!r} is not a multiaddr; copy the one a real run prints, e.g. "
                            "/ip4/203.0.113.5/tcp/31337/p2p/12D3KooW...") from None
        if "p2p" not in [p.name for p in address.protocols()]:
            raise JoinError(f"--initial-peers: {maddr!r} lacks the /p2p/<peer id> part; copy the whole address a "
                            "real run prints")
    if args.epochs is not None and args.epochs < 1:
        raise JoinError(f"--epochs: must be at least 1, got {args.epochs}")
    if args.threads is not None and args.threads < 1:
        raise JoinError(f"--threads: must be at least 1, got {args.threads}")
    if not 0 < args.timeout < float("inf"):
        raise JoinError(f"--timeout: must be positive, got {args.timeout}")


def default_host(initial_peer: str) -> str:
    """The local address the OS picks to reach the first initial peer (no packet is sent)."""
    from hivemind.utils.multiaddr import Multiaddr

    address = Multiaddr(initial_peer)
    for proto in ("ip4", "dns4", "dns"):
        try:
            remote = address.value_for_protocol(proto)
        except Exception:
            continue
        if remote:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((remote, 9))
                return s.getsockname()[0]
    return "127.0.0.1"


def find_run(initial_peers: list[str], run_id: str | None, timeout_s: float) -> tuple[str, dict]:
    """(run id, arm configuration) read from the swarm by a client DHT that is shut down again."""
    import hivemind

    from cluster.real.processes import authorizer

    dht = hivemind.DHT(initial_peers=initial_peers, client_mode=True, start=False, authorizer=authorizer(_secret()))
    try:
        try:
            dht.run_in_background(await_ready=True, timeout=timeout_s)
        except Exception as e:
            raise JoinError(f"--initial-peers: could not reach {', '.join(initial_peers)} ({type(e).__name__}: {e}); "
                            "check the address and that the run is still going (farflung doctor helps)") from None
        deadline = time.monotonic() + timeout_s
        while True:
            listed = dht.get(RUNS_KEY, latest=True)
            runs = {k: v.value for k, v in listed.value.items()} if listed and isinstance(listed.value, dict) else {}
            if run_id is None and len(runs) == 1:
                run_id = next(iter(runs))
            if run_id is not None:
                found = dht.get(CONFIG_KEY.format(run_id=run_id), latest=True)
                if found is not None:
                    return run_id, json.loads(found.value)
            if time.monotonic() > deadline:
                break
            time.sleep(1.0)
    finally:
        dht.shutdown()
    if run_id is None and len(runs) > 1:
        listing = "; ".join(f"{k}: {v}" for k, v in sorted(runs.items()))
        raise JoinError(f"--run-id: the swarm lists {len(runs)} runs ({listing}); pass the one to join")
    if run_id is None:
        raise JoinError("--initial-peers: the swarm lists no joinable run (only collaborative and local-updates arms "
                        "can be joined, while they run); check the address a real run printed")
    raise JoinError(f"--run-id: the swarm has no run {run_id!r}"
                    + (f"; it lists {', '.join(sorted(runs))}" if runs else "")
                    + "; copy the id a real run printed")


def replica_spec(config: dict, threads: int | None):
    """This machine's replica: the arm's model, data and optimizer, with a data shard of its own."""
    from trainer.data import DataConfig
    from trainer.model import GPTConfig
    from trainer.replica import OptimConfig, ReplicaSpec
    from trainer.strategies import STRATEGIES

    n = int(config["n_workers"])
    return ReplicaSpec(
        worker=n, n_workers=n + 1, seed=int(config["seed"]), model=GPTConfig(**config["model"]),
        data=DataConfig(**config["data"]), optim=OptimConfig(**config["optim"]), batch_size=int(config["batch_size"]),
        total_steps=int(config["total_steps"]), algorithm=config["algorithm"],
        settings=STRATEGIES[config["algorithm"]].Settings(**config["settings"]), codec=config["codec"],
        eval_batches=int(config["eval_batches"]), torch_threads=threads,
    )


def join(args: argparse.Namespace) -> int:
    from cluster.network import Link, Network
    from cluster.real.options import UNSHAPED_BPS, RealOptions, averaging_timeouts
    from cluster.real.swarm import SwarmPeer

    _check(args)
    run_id, config = find_run(args.initial_peers, args.run_id, args.timeout)
    spec = replica_spec(config, args.threads)
    setup = SwarmSetup(**config["setup"])
    host = args.host or default_host(args.initial_peers[0])
    options = RealOptions(shaping="none", host=host, startup_timeout_s=args.timeout, secret=_secret())
    print(f"joining {config['arm']} ({config['algorithm']}, {config['n_workers']} peers) run id {run_id} as {host}",
          flush=True)
    unshaped = Link(uplink_bps=UNSHAPED_BPS, downlink_bps=UNSHAPED_BPS, one_way_latency_s=0.0)
    # This machine's link is what it is: unshaped, and hivemind's timeouts derived from nothing else.
    network = Network(links=(unshaped,) * int(config["n_workers"]))
    # A machine that joins holds no state of its own: were the swarm's peers all gone, its initial weights must not
    # become the swarm's, nor be served to peers that come back (the lone-restart guard, cluster.real.swarm_state).
    peer = SwarmPeer(spec, unshaped, options, run_id, holds_state=False)
    out = open(args.out, "w") if args.out else None
    try:
        peer.join(args.initial_peers, client_mode=args.client_mode)
        timeouts = averaging_timeouts(network, 4 * peer.num_params(), options)
        peer.start_optimizer(setup, timeouts.request_timeout_s, None)
        print(f"this peer: {' '.join(peer.visible_maddrs()) or '(client mode)'}", flush=True)
        if not peer.await_state(args.timeout, keep_going=lambda: not peer.swarm_done()):
            print(f"farflung join: no peer of the run served its state within {args.timeout:g} s (--timeout), or the "
                  "run ended; this machine trained and served nothing: join again once the run's peers are up",
                  file=sys.stderr)
            return 1
        print(f"caught up: loaded the swarm's state, epoch 0 -> {peer.opt.local_epoch}", flush=True)
        last_check = [time.monotonic()]

        def on_epoch(record: EpochRecord) -> None:
            if record.loaded_state:
                print(f"caught up: loaded the swarm's state, epoch {record.epoch} -> {peer.opt.local_epoch}",
                      flush=True)
            else:
                loss = "-" if record.loss is None else f"{record.loss:.4f}"
                print(f"epoch {record.epoch}: {record.swarm_peers} peers, {record.samples} samples from this machine, "
                      f"loss {loss}, step {record.step_s:.2f} s", flush=True)
            if out is not None:
                out.write(json.dumps(record.__dict__) + "\n")
                out.flush()

        def keep_going() -> bool:
            if time.monotonic() - last_check[0] < 2.0:
                return True
            last_check[0] = time.monotonic()
            return not peer.swarm_done()

        records = peer.train(max_wall_s=float("inf"), max_epochs=args.epochs, on_epoch=on_epoch,
                             keep_going=keep_going)
        contributed = sum(r.samples for r in records)
        closed = sum(not r.loaded_state for r in records)
        print(f"left at epoch {peer.opt.local_epoch} after closing {closed} epochs, {contributed} samples contributed",
              flush=True)
        return 0
    except KeyboardInterrupt:
        print("farflung join: interrupted; left the swarm", file=sys.stderr)
        return 130
    finally:
        if out is not None:
            out.close()
        peer.shutdown()

