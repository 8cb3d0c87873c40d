"""The real mode's driver for one arm: N Ray actors, each a `RealPeer`, averaging over real hivemind sockets.

Same loop shape as `cluster.sim.ArmSimulation`: every peer trains until its strategy asks for an exchange, then all
peers average together, then they train on. The differences are where the time and bytes come from: the wall clock of
each peer and the relays in front of them, instead of the network model. Records have the simulator's kinds and
fields, plus `"measured": true` on comm records; see `results/README.md`.

Start-up is a barrier, because hivemind peers that begin their first exchange seconds apart fail to find a group:
peer 0's DHT comes up first and is the bootstrap, the others join it, every peer starts its averager and lists itself
in the DHT, and only when every peer sees all N listed does training start. Every exchange is then started on all
peers at the same moment (one Ray call each, gathered together) and retried on all of them together if any fails.

Teardown is unconditional: each peer's `shutdown` (averager, DHT, p2pd, relay), then its actor, then Ray if this
driver started it, on success, error or Ctrl-C.
"""

from __future__ import annotations

import re
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from cluster.real.accounting import RoundBytes, attribute, counters_delta
from cluster.real.options import AveragingTimeouts, RealOptions, averaging_timeouts, check_real_arm
from cluster.real.peer import ExchangeOutcome, MeasuredStep, PendingExchange, RealPeer
from cluster.real.swarm import SWARM_ALGORITHMS, SwarmPeer, SwarmSetup, arm_config
from cluster.real.swarm_arm import SwarmArm
from cluster.runtime import kill_actors, start_ray
from cluster.sim import ArmPlan, average, eval_points
from trainer.model import count_params
from trainer.replica import ReplicaSpec


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
    final_params: tuple[np.ndarray, ...]  # every peer's parameters at the end, in worker order (fetched for the last eval)


class RealExchangeError(RuntimeError):
    pass


def new_run_id(arm_name: str) -> str:
    """An averager prefix for this arm: readable, unique, without the dots hivemind reserves."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", arm_name).strip("-") or "arm"
    return f"farflung-{stem}-{uuid.uuid4().hex[:8]}"


class _Peers:
    """The Ray actors of one arm; `call` runs a method on every peer at once and returns the results in worker order."""

    def __init__(self):
        self.actors: list = []
        self.local_pids: list[int] = []  # actor processes on this machine, to see them gone before close returns

    def call(self, method: str, args: Sequence[tuple] | None = None, workers: Sequence[int] | None = None,
             timeout_s: float | None = None) -> list:
        import ray

        workers = range(len(self.actors)) if workers is None else workers
        args = args or [()] * len(workers)
        futures = [getattr(self.actors[w], method).remote(*a) for w, a in zip(workers, args)]
        try:
            return ray.get(futures, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"{method} did not return on every peer within {timeout_s:.0f} s") from None

    def close(self, timeout_s: float) -> None:
        import ray

        if self.actors:
            # Stop the hivemind processes first: a killed actor would leave its DHT, averager and p2pd behind.
            refs = [a.shutdown.remote() for a in self.actors]
            ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        kill_actors(self.actors)
        self.actors = []
        _wait_for_exit(self.local_pids, timeout_s)
        self.local_pids = []


class RealArm:
    def __init__(self, peers: _Peers, plan: ArmPlan, timeouts: AveragingTimeouts, options: RealOptions,
                 dial_addresses: list, emit: Callable[[dict], None], on_step: Callable[[], None] = lambda: None):
        self.peers, self.plan, self.timeouts, self.options = peers, plan, timeouts, options
        self.dial_addresses = dial_addresses
        self.emit, self.on_step = emit, on_step
        self.round = 0
        self.steps_completed = 0
        self.time_s = 0.0  # the arm's clock: the latest any peer has reported
        self.last_params: list[np.ndarray] = []

    def run(self) -> None:
        plan = self.plan
        self.evaluate(step=0)
        for until in eval_points(plan.total_steps, plan.eval_every_steps):
            self.advance(until, finish=until == plan.total_steps)
            self.evaluate(until)

    def advance(self, until_step: int, finish: bool) -> None:
        while True:
            events = self.peers.call("advance", [(until_step, finish)] * self.plan.n_workers)
            pending = self.account_compute(events)
            if pending is None:
                return
            self.exchange(pending)

    def account_compute(self, events: list[list]) -> list[PendingExchange] | None:
        plan = self.plan
        steps = [[e for e in evs if isinstance(e, MeasuredStep)] for evs in events]
        assert len({len(s) for s in steps}) == 1, "workers left lockstep"
        for done in zip(*steps):
            for w, d in enumerate(done):
                self.time_s = max(self.time_s, d.time_s)
                self.emit({
                    "kind": "step", "arm": plan.name, "worker": w, "step": d.step,
                    "tokens": (d.step + 1) * plan.tokens_per_step, "loss": d.loss,
                    "time_s": d.time_s, "compute_s": d.compute_s,
                })
            self.on_step()
            self.steps_completed = done[0].step + 1
        tails = [evs[-1] if evs and isinstance(evs[-1], PendingExchange) else None for evs in events]
        if all(t is None for t in tails):
            return None
        assert all(t is not None for t in tails), "only some workers made a request"
        return tails

    def exchange(self, requests: list[PendingExchange]) -> None:
        first = requests[0]
        assert all((r.payload, r.numel) == (first.payload, first.numel) for r in requests), \
            f"workers asked for different exchanges: {requests}"
        n = self.plan.n_workers
        before = self.peers.call("relay_counters")
        errors: list[str] = []
        for attempt in range(self.options.max_attempts):
            outcomes: list[ExchangeOutcome] = self.peers.call(
                "exchange", [(attempt,)] * n, timeout_s=self.timeouts.call_timeout_s)
            if all(o.ok for o in outcomes):
                break
            errors.append("; ".join(f"worker {w}: {o.error}" for w, o in enumerate(outcomes) if not o.ok))
        else:
            raise RealExchangeError(
                f"arm {self.plan.name!r}: averaging {first.payload!r} at step {self.steps_completed} failed "
                f"{self.options.max_attempts} times (" + " | ".join(errors) + "). Check that every peer can reach the "
                f"others' announced addresses; on slow links raise max_attempts, or the timeouts derived from the "
                f"network ({self.timeouts})")
        after = self.peers.call("relay_counters")
        moved = attribute([counters_delta(b, a) for b, a in zip(before, after)], self.dial_addresses)
        gloo = outcomes[0].bytes_sent is not None
        if gloo:  # gloo's sockets bypass the relays; the kernel counted them
            moved = RoundBytes(tuple(o.bytes_sent for o in outcomes), tuple(o.bytes_received for o in outcomes), 0)
        end_s = max(o.end_s for o in outcomes)
        self.time_s = max(self.time_s, end_s)
        self.emit({
            "kind": "comm", "arm": self.plan.name, "round": self.round, "group": 0, "step": self.steps_completed,
            # What ran: hivemind's butterfly all-reduce (or gloo's), whatever the strategy would have liked.
            "collective": "gloo_allreduce" if gloo else "butterfly", "requested_collective": first.collective,
            "payload": first.payload, "participants": list(range(n)),
            # gloo sends the float32 tensor and its weight, whatever the codec (the file must say codec = "none").
            "message_bytes": 4 * (first.numel + 1) if gloo else max(r.nbytes for r in requests),
            "raw_bytes": max(r.raw_nbytes for r in requests),
            "bytes_sent": list(moved.bytes_sent), "bytes_received": list(moved.bytes_received),
            "bytes_unattributed": moved.unattributed,
            "comm_s": max(o.comm_s for o in outcomes), "comm_s_per_worker": [o.comm_s for o in outcomes],
            "blocking": True, "idle_s": [o.idle_s for o in outcomes], "time_s": end_s, "staleness": 0,
            "attempts": len(errors) + 1, "measured": True,
        })
        self.round += 1

    def evaluate(self, step: int) -> None:
        params = self.last_params = self.peers.call("params")
        identical = all(np.array_equal(params[0], p) for p in params[1:])
        consensus = params[0] if identical else average(params)
        loss = self.peers.call("evaluate", [(consensus,)], workers=[0])[0]
        norm = float(np.linalg.norm(consensus)) or 1.0
        spread = 0.0 if identical else float(np.mean([np.linalg.norm(p - consensus) for p in params])) / norm
        self.emit({
            "kind": "eval", "arm": self.plan.name, "step": step, "tokens": step * self.plan.tokens_per_step,
            "time_s": self.time_s, "loss": loss, "param_spread": spread,
        })


def run_real_arm(plan: ArmPlan, specs: Sequence[ReplicaSpec], emit: Callable[[dict], None],
                 on_step: Callable[[], None] = lambda: None, *, options: RealOptions = RealOptions(),
                 on_swarm: Callable[[SwarmInfo], None] | None = None,
                 should_stop: Callable[[], bool] = lambda: False) -> RealArmResult:
    """Run one arm with a real hivemind peer per worker, emitting step, comm and eval records as the simulator does.

    `on_swarm` is called once every peer is up, before training starts, with the swarm's address and run id (a
    machine elsewhere would join with them). Returns that `SwarmInfo` and every peer's final parameters.
    Swarm arms (collaborative, local-updates) stop early, at the end of the epoch under way, once `should_stop()`.
    """
    import ray

    assert len(specs) == plan.n_workers and [s.worker for s in specs] == list(range(plan.n_workers))
    try:
        check_real_arm(specs[0].algorithm, plan.codec, plan.network, plan.client_mode, plan.speed_factors,
                       options.shaping, options.allreduce)
    except ValueError as e:
        raise ValueError(f"arm {plan.name!r}: {e}") from None
    run_id = new_run_id(plan.name)
    nbytes = 4 * count_params(specs[0].model)
    timeouts = averaging_timeouts(plan.network, nbytes, options)
    swarm = specs[0].algorithm in SWARM_ALGORITHMS
    setup = SwarmSetup.of(specs[0].algorithm, specs[0].settings, plan.n_workers, specs[0].batch_size,
                          plan.codec) if swarm else None
    started_ray = start_ray()
    peers = _Peers()
    try:
        cpus = float(ray.cluster_resources().get("CPU", 1.0))
        # SPREAD: on a Ray cluster the peers go to different nodes, as far-flung peers would be.
        actor_cls = ray.remote(SwarmPeer if swarm else RealPeer).options(
            num_cpus=min(1.0, cpus / plan.n_workers), max_restarts=0, scheduling_strategy="SPREAD")
        links = [options.link_of(plan.network, w) for w in range(plan.n_workers)]
        wait_s = options.startup_timeout_s
        # Every actor builds its replica and relay at once; then peer 0's DHT comes up and the others join it.
        peers.actors = [actor_cls.remote(spec, link, options, run_id) for spec, link in zip(specs, links)]
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
            arm = SwarmArm(peers, plan, specs[0], setup, options, dial_addresses, emit, on_step, should_stop)
            try:
                arm.run()
            finally:
                peers.call("mark_done", workers=[0], timeout_s=wait_s)
        else:
            peers.call("start_clock")
            arm = RealArm(peers, plan, timeouts, options, dial_addresses, emit, on_step)
            arm.run()
        return RealArmResult(info, tuple(arm.last_params))
    finally:
        peers.close(timeout_s=30.0)
        if started_ray and ray.is_initialized():
            ray.shutdown()


def _wait_for_exit(pids: list[int], timeout_s: float) -> None:
    """ray.kill returns before the process is gone; wait (bounded) so that a caller sees its processes stopped."""
    import psutil

    processes = []
    for pid in pids:
        try:
            processes.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=timeout_s)


def _barrier(peers: _Peers, n: int, timeout_s: float) -> None:
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
