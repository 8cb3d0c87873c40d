"""The real mode's arms: N Ray actors, each a real hivemind peer, averaging over real sockets.

`run_real_arm` starts the peers and waits until the swarm is whole, then drives them by the strategy's real mode:
- "lockstep" (ddp, diloco): `cluster.driver.LockstepDriver`, the simulator's own driver, with
  `cluster.real.lockstep.PeerExchanges` carrying out each exchange as a real all-reduce;
- "swarm" (collaborative, local-updates): `cluster.real.swarm_arm.SwarmArm` polls `hivemind.Optimizer` peers that
  train at their own pace; with a fault trace it SIGKILLs peers and restarts them (`cluster.real.swarm_churn`), each
  restart on a thread of its own while the driver goes on polling.
  With a fault trace, `cluster.real.lockstep_churn.LockstepChurnDriver` instead: it SIGKILLs peers at the trace's
  failures, averages among the live peers only, and restarts a returning peer, which loads the state from a live
  one (`cluster.real.lockstep_peer.LockstepPeer`); the peers play the trace's exchange faults (the survivors step
  on the partial average) and stragglers themselves.
Records have the simulator's kinds and fields, plus the real mode's (`measured`, ...); see `results/README.md`.

Start-up is a barrier, because hivemind peers that begin their first exchange seconds apart fail to find a group:
peer 0's DHT comes up first and is the bootstrap, the others join it, every peer starts its averager and lists itself
in the DHT, and only when every peer sees all N listed does training start.

Teardown is unconditional (`cluster.runtime.RayRuntime.close`): each peer's `shutdown` (averager, DHT, p2pd,
relay), then its actor, then Ray if this driver started it, on success, error or Ctrl-C. With kernel shaping the
driver builds every peer's namespace before the peers start (`cluster.shaping.fabric.NamespaceSwitch`) and removes
them all after the peers have stopped, also on error.
"""

from __future__ import annotations

import contextlib
import re
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np

from cluster.driver import ArmPlan, LockstepDriver
from cluster.real.lockstep import PeerExchanges, RealExchangeError
from cluster.real.lockstep_churn import LockstepChurnDriver, LockstepMembers
from cluster.real.lockstep_peer import LockstepPeer
from cluster.faults import FaultsConfig
from cluster.real.options import RealOptions, averaging_timeouts, check_real_arm, check_real_faults
from cluster.real.peer import RealPeer
from cluster.real.swarm import SwarmPeer
from cluster.real.swarm_setup import SwarmSetup, arm_config
from cluster.real.swarm_arm import StateLoadCheck, SwarmArm
from cluster.real.swarm_churn import SwarmChurn
from cluster.records import Record
from cluster.runtime import RayRuntime
from trainer.model import count_params
from trainer.replica import ReplicaSpec
from trainer.strategies import STRATEGIES

__all__ = ["RealArmResult", "RealExchangeError", "SwarmInfo", "new_run_id", "run_real_arm"]


@dataclass(frozen=True)
class SwarmInfo:
    """How a machine elsewhere finds this arm's swarm: a peer's multiaddrs, and the run id (the averager's prefix)."""

    run_id: str
    initial_peers: tuple[str, ...]
    placement: tuple[str, ...] = ()  # the Ray node id each worker runs on, in worker order
    joinable: bool = False  # a swarm arm: `farflung join` can add a peer from elsewhere


@dataclass(frozen=True)
class RealArmResult:
    swarm: SwarmInfo
    # every peer's parameters at the end, in worker order (fetched for the last eval); with faults, the peers holding
    # the state
    final_params: tuple[np.ndarray, ...]
    # A swarm arm with faults: the restarted peers' state loads, checked against what their donors served.
    state_loads: tuple[StateLoadCheck, ...] = ()


def new_run_id(arm_name: str) -> str:
    """An averager prefix for this arm: readable, unique, without the dots hivemind reserves."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", arm_name).strip("-") or "arm"
    return f"farflung-{stem}-{uuid.uuid4().hex[:8]}"


def run_real_arm(plan: ArmPlan, specs: Sequence[ReplicaSpec], emit: Callable[[Record], None],
                 on_step: Callable[[], None] = lambda: None, *, options: RealOptions = RealOptions(),
                 on_swarm: Callable[[SwarmInfo], None] | None = None,
                 should_stop: Callable[[], bool] = lambda: False, faults: FaultsConfig | None = None) -> RealArmResult:
    """Run one arm with a real hivemind peer per worker, emitting step, comm and eval records as the simulator does.

    `on_swarm` is called once every peer is up, before training starts, with the swarm's address and run id (a
    machine elsewhere would join with them). Returns that `SwarmInfo` and every peer's final parameters.
    Swarm arms (collaborative, local-updates) stop early, at the end of the epoch under way, once `should_stop()`.
    `faults`: a fault trace, played on the real peers (`cluster.real.swarm_churn` for a swarm arm,
    `cluster.real.lockstep_churn` for a lockstep one); final parameters are then those of the peers holding the
    swarm's state.
    """
    assert len(specs) == plan.n_workers and [s.worker for s in specs] == list(range(plan.n_workers))
    try:
        check_real_arm(specs[0].algorithm, plan.codec, plan.network, plan.client_mode, plan.speed_factors,
                       options.shaping, options.allreduce)
        if faults is not None:
            check_real_faults(specs[0].algorithm, faults, allreduce=options.allreduce)
    except ValueError as e:
        raise ValueError(f"arm {plan.name!r}: {e}") from None
    run_id = new_run_id(plan.name)
    nbytes = 4 * count_params(specs[0].model)
    timeouts = averaging_timeouts(plan.network, nbytes, options)
    strategy = STRATEGIES[specs[0].algorithm]
    swarm = strategy.real_mode == "swarm"
    setup = SwarmSetup.of(strategy, specs[0].settings, plan.swarm, plan.n_workers, specs[0].batch_size,
                          plan.codec) if swarm else None
    links = [options.link_of(plan.network, w) for w in range(plan.n_workers)]
    with peer_namespaces(options, links, run_id) as ports:
        return _run_peers(plan, specs, emit, on_step, options, on_swarm, should_stop, run_id, timeouts, setup, links,
                          ports, faults)


@contextlib.contextmanager
def peer_namespaces(options: RealOptions, links, run_id: str):
    """Kernel shaping's namespaces, one per worker (yields their ports), or nothing to build (yields Nones)."""
    if options.shaping != "kernel":
        yield [None] * len(links)
        return
    from cluster.shaping.fabric import NamespaceSwitch

    with NamespaceSwitch(links, tag=run_id.rsplit("-", 1)[-1]) as switch:
        yield list(switch.ports)


def _run_peers(plan, specs, emit, on_step, options, on_swarm, should_stop, run_id, timeouts, setup, links,
               ports, faults) -> RealArmResult:
    swarm = setup is not None
    peer_cls = SwarmPeer if swarm else RealPeer if faults is None else LockstepPeer
    wait_s = options.startup_timeout_s
    # Every actor builds its replica and relay at once; then peer 0's DHT comes up and the others join it.
    # SPREAD: on a Ray cluster the peers go to different nodes, as far-flung peers would be.
    peers = RayRuntime(specs, peer_cls, [(link, options, run_id, port) for link, port in zip(links, ports)],
                       ready_timeout_s=wait_s, max_restarts=0, scheduling_strategy="SPREAD")
    try:
        bootstrap = peers.call("join", [(None,)], workers=[0], timeout_s=wait_s)[0]
        peers.call("join", [(bootstrap,)] * (plan.n_workers - 1), workers=range(1, plan.n_workers), timeout_s=wait_s)
        described = peers.call("describe", timeout_s=wait_s)
        peers.local_pids = [d["pid"] for d in described if d["hostname"] == socket.gethostname()]
        # hivemind's load balancer takes bandwidth in Mbit/s, as in cluster.collectives.butterfly_allreduce.
        bandwidths = [None if options.shaping == "none" else min(l.uplink_bps, l.downlink_bps) / 1e6 for l in links]
        if swarm:
            peers.call("start_optimizer", [(setup, timeouts.request_timeout_s, b) for b in bandwidths], timeout_s=wait_s)
            if not peers.call("publish", [(arm_config(specs[0], setup, plan.name), plan.name)], workers=[0],
                              timeout_s=wait_s)[0]:
                raise RuntimeError("peer 0 could not store the arm's configuration in the DHT")
        elif options.allreduce == "gloo":
            port = peers.call("gloo_port", workers=[0], timeout_s=wait_s)[0]
            host0 = described[0]["dial_address"][0]
            peers.call("start_gloo", [(host0, port, wait_s)] * plan.n_workers, timeout_s=wait_s + 30)
        else:
            peers.call("start_averaging", [(timeouts, b) for b in bandwidths], timeout_s=wait_s)
        _barrier(peers, plan.n_workers, wait_s)
        info = SwarmInfo(run_id, tuple(bootstrap), tuple(d["node_id"] for d in described), joinable=swarm)
        if on_swarm is not None:
            on_swarm(info)
        dial_addresses = [tuple(d["dial_address"]) for d in described]
        if swarm:
            churn = None if faults is None else SwarmChurn(
                faults, plan, peers, partial(_restart_peer, peers, links, ports, options, run_id, setup, timeouts,
                                             bandwidths), emit)
            arm = SwarmArm(peers, plan, specs[0], setup, options, dial_addresses, emit, on_step, should_stop, churn)
            try:
                arm.run()
            finally:
                peers.call("mark_done", workers=[0], timeout_s=wait_s)
        else:
            peers.call("start_clock")
            exchanges = PeerExchanges(peers, plan, timeouts, options, dial_addresses)
            if faults is None:
                arm = LockstepDriver(peers, plan, exchanges, emit, on_step)
            else:
                restart = partial(_restart_lockstep_peer, peers, links, ports, options, run_id, timeouts, bandwidths)
                arm = LockstepChurnDriver(peers, plan, exchanges, emit, on_step, members=LockstepMembers(faults, plan),
                                          restart=restart, load_timeout_s=wait_s)
            arm.run()
        return RealArmResult(info, tuple(arm.last_params), tuple(getattr(arm, "state_loads", ())))
    finally:
        peers.close(timeout_s=30.0)


def _restart_peer(peers: RayRuntime, links, ports, options: RealOptions, run_id: str, setup: SwarmSetup, timeouts,
                  bandwidths, worker: int, incarnation: int, initial_peers: list[str],
                  arm_clock: Callable[[], float]) -> dict:
    """A failed swarm peer's return: a new actor, its DHT through the live peers (alone if none is), its optimizer,
    and its training loop on the arm's clock; the lone-restart guard keeps it out until it has loaded the state.

    Runs on a thread of its own while the driver polls the other peers (`SwarmChurn.restart`): it touches only this
    worker's actor slot (`RayRuntime.respawn`) and `local_pids`, and every call is bounded, so that the driver's
    wait for it at the arm's end is."""
    wait_s = options.startup_timeout_s
    peers.respawn(worker, (links[worker], options, run_id, ports[worker]), ready_timeout_s=wait_s, holds_state=False,
                  incarnation=incarnation)
    peers.call("join", [(initial_peers or None,)], workers=[worker], timeout_s=wait_s)
    described = peers.call("describe", workers=[worker], timeout_s=wait_s)[0]
    if described["hostname"] == socket.gethostname():
        peers.local_pids.append(described["pid"])
    peers.call("start_optimizer", [(setup, timeouts.request_timeout_s, bandwidths[worker])], workers=[worker],
               timeout_s=wait_s)
    peers.call("start_clock", [(arm_clock(),)], workers=[worker], timeout_s=wait_s)
    peers.call("start_training", [(options.swarm_timeout_s,)], workers=[worker], timeout_s=wait_s)
    return described


def _restart_lockstep_peer(peers: RayRuntime, links, ports, options: RealOptions, run_id: str, timeouts, bandwidths,
                           worker: int, initial_peers: list[str], arm_clock_s: float) -> dict:
    """A failed lockstep peer's return: a new actor without the state, its DHT through the live peers (alone if none
    is), its averager sharing nothing yet, and its clock at the arm's time (`cluster.real.lockstep_churn`)."""
    wait_s = options.startup_timeout_s
    peers.respawn(worker, (links[worker], options, run_id, ports[worker]), ready_timeout_s=wait_s, holds_state=False)
    peers.call("join", [(initial_peers or None,)], workers=[worker], timeout_s=wait_s)
    described = peers.call("describe", workers=[worker], timeout_s=wait_s)[0]
    if described["hostname"] == socket.gethostname():
        peers.local_pids.append(described["pid"])
    peers.call("start_averaging", [(timeouts, bandwidths[worker])], workers=[worker], timeout_s=wait_s)
    peers.call("start_clock", [(arm_clock_s,)], workers=[worker], timeout_s=wait_s)
    return described


def _barrier(peers: RayRuntime, n: int, timeout_s: float) -> None:
    """Every peer lists itself in the DHT; return once every peer sees all n listed."""
    if not all(peers.call("announce", timeout_s=timeout_s)):
        raise RuntimeError("a peer could not store its address in the DHT; is the bootstrap peer reachable?")
    deadline = time.monotonic() + timeout_s
    while True:
        seen = peers.call("peers_seen", timeout_s=timeout_s)
        if all(len(s) == n for s in seen):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"after {timeout_s:.0f} s the peers still see only these workers in the DHT: {seen}; "
                               "check that they can reach each other's announced addresses")
        time.sleep(0.2)
