"""Faults on a real swarm arm (collaborative, local-updates): the fault trace kills real peers and starts them again.

`SwarmArm` asks `SwarmChurn` at every poll which peers the trace takes down and which it brings back:
- the trace is `cluster.faults.FaultTrace`, the simulator's own, so a seeded mtbf/mttr trace is drawn from the run's
  seed exactly as the simulator draws it. In real mode `leave_s`/`return_s` and the drawn times are wall-clock
  seconds from the arm's start; `leave_step`/`return_step` are reached when the swarm has trained that many lockstep
  steps' worth of tokens (steps x the arm's tokens per step), so a step means the same amount of training as in the
  simulator. Each is acted on at the driver's next poll (`SwarmArm.POLL_S`).
- a failure SIGKILLs the peer (`RealPeer.crash`: its p2pd, DHT and averager processes, then its actor's process with
  its training thread and relay). Nothing is shut down politely, so the swarm finds out as hivemind peers do: a
  round that times out on it, a progress record and a donor entry in the DHT that go stale until they expire.
- a return starts a new Ray actor rather than reusing the old one's process: a Python thread blocked in hivemind
  cannot be killed, only the process it runs in, and a process of its own is what a restarted volunteer has. The
  new peer has fresh random weights and a new peer id, joins the DHT through the live peers' addresses (alone when
  none is live), builds its hivemind.Optimizer and loads the state before it contributes, under the lone-restart
  guard (`cluster.real.swarm_state`).
- that start (the actor, its DHT, its optimizer, its training thread: seconds) runs on a thread of its own, so the
  driver goes on polling meanwhile: epochs are noticed, snapshots taken and the other workers' outages played at
  their times. The returning worker counts as live only once its peer is up: until then nothing polls, stops or
  kills it, and an outage of it that falls due meanwhile is played at the first poll after it is up (the trace is
  never reordered: each worker's outages come one after the other). A start that fails raises in the driver at its
  next poll (with the arm already failing, it is a note on that error). Whatever ends the arm, it waits for the
  starts under way (each bounded by `startup_timeout_s` per call) and starts no more, so no actor outlives the
  teardown; a peer that comes up after the arm decided to stop is stopped at once and ends with the others (it
  closes no epoch, and is left out of the final evaluation).

Exchange faults and stragglers (`cluster.real.exchange_faults`) are played by the peers themselves: the driver hands
each its own (`arm`, and again to a restarted peer once it is up). A peer that fails in a round dies there, inside
its averager; the driver finds its actor dead at a call (`may_die`: only a worker with a killing fault not yet played
may die, any other death fails the arm) and buries it (`died`): a `leave` with cause "exchange", the `phase` and the
swarm's `round`, the round's epoch as `step`, and a return `down` seconds after it noticed (none without `down`),
played like the trace's returns. A peer that cancels stays: a `cancel` record with the round, when its epoch closed.

A partition (`faults.partition`) is not this module's: the driver cuts and heals the live peers' relays
(`cluster.real.partition`).

Records, as the simulator's (`cluster.churn`): FaultRecord `leave` (the epoch in progress as `step`, the cause, when
the trace brings it back, `lost_s`: its compute in the epoch under way, thrown away), `return` (the new actor starts),
`join` (the state applied: its donor's worker as `sources`, `state_bytes` as received, `wait_s` from the return
until the download that succeeded began, which includes starting the actor, the DHT and the optimizer, and
`download_s`). Records carry the arm's clock and are emitted as they happen (the epochs' records come when the arm
ends), so that what a failed arm went through is on file.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from cluster.driver import ArmPlan
from cluster.faults import FaultsConfig, FaultTrace, Outage
from cluster.real.exchange_faults import KILLING, ArmedRound, PeerFaults
from cluster.records import FaultRecord


class SwarmChurn:
    """The fault trace of one swarm arm, played on its real peers.

    `restart_peer(worker, incarnation, initial_peers, arm_clock)` starts the worker's new peer (a fresh actor that
    joins, builds its optimizer and starts training at `arm_clock()`) and returns its `describe()`; it runs on a
    thread of its own (`restart`), and must be safe to run beside the driver's calls for the other workers. `emit`
    takes the fault records; it is called on the driver's thread only."""

    def __init__(self, faults: FaultsConfig, plan: ArmPlan, peers,
                 restart_peer: Callable[[int, int, list[str], Callable[[], float]], dict],
                 emit: Callable[[FaultRecord], None]):
        n = plan.n_workers
        self.plan, self.peers, self.restart_peer, self.emit = plan, peers, restart_peer, emit
        self.trace = FaultTrace(faults, n, plan.seed)
        self.index = [0] * n  # the next outage of each worker in the trace
        self.outage: list[Outage | None] = [None] * n  # the outage a worker is in
        self.incarnation = [0] * n
        self.returned_s = [0.0] * n
        # One thread per worker at most: a worker has at most one start under way.
        self._starts = ThreadPoolExecutor(max_workers=n, thread_name_prefix="farflung-restart")
        self._closed = False
        self.faults_of: list[PeerFaults] = [PeerFaults()] * n
        self._deaths: list[list[ArmedRound]] = [[] for _ in range(n)]  # each worker's killing faults not yet played

    def arm(self, faults_of: list[PeerFaults]) -> None:
        """The exchange faults and stragglers each worker plays (`cluster.real.exchange_faults.peer_faults`)."""
        self.faults_of = list(faults_of)
        self._deaths = [sorted((r for r in f.rounds if r.phase in KILLING), key=lambda r: r.round) for f in faults_of]

    def may_die(self, worker: int) -> bool:
        """Whether the worker's peer may be found dead: a killing exchange fault of it is still to be played."""
        return bool(self._deaths[worker])

    def died(self, worker: int, now_s: float, lost_s: float) -> ArmedRound:
        """The worker's peer was found dead: it played its next killing fault. Ray lets go of its actor, and the
        `leave` record says where it failed and when it comes back."""
        fault = self._deaths[worker].pop(0)
        back = None if fault.down_s is None else now_s + fault.down_s
        self.outage[worker] = Outage(worker, now_s, back, by_step=False, cause="exchange")
        self.peers.kill(worker, "crash")  # the actor is gone already: this only makes sure Ray has let go of it
        self.emit(FaultRecord(arm=self.plan.name, worker=worker, event="leave", time_s=now_s, step=fault.epoch,
                              cause="exchange", phase=fault.phase, round=fault.round, back_s=back, lost_s=lost_s))
        return fault

    def cancelled(self, worker: int, round_: int, epoch: int, time_s: float) -> None:
        self.emit(FaultRecord(arm=self.plan.name, worker=worker, event="cancel", time_s=time_s, step=epoch,
                              round=round_))

    def _reached(self, at: float, by_step: bool, now_s: float, tokens: int) -> bool:
        return tokens >= at * self.plan.tokens_per_step if by_step else now_s >= at

    def leaving(self, live: list[int], now_s: float, tokens: int) -> list[int]:
        """The live workers whose next outage has begun."""
        due = []
        for w in live:
            o = self.trace.outage(w, self.index[w])
            if o is not None and self._reached(o.leave, o.by_step, now_s, tokens):
                due.append(w)
        return due

    def returning(self, now_s: float, tokens: int) -> list[int]:
        """The failed workers the trace brings back now."""
        return [w for w, o in enumerate(self.outage)
                if o is not None and o.back is not None and self._reached(o.back, o.by_step, now_s, tokens)]

    def kill(self, worker: int, now_s: float, epoch: int, lost_s: float) -> None:
        o = self.outage[worker] = self.trace.outage(worker, self.index[worker])
        self.index[worker] += 1
        self.peers.kill(worker, "crash")
        self.emit(FaultRecord(
            arm=self.plan.name, worker=worker, event="leave", time_s=now_s, step=epoch, cause=o.cause,
            back_s=None if o.by_step else o.back, back_step=int(o.back) if o.by_step and o.back is not None else None,
            lost_s=lost_s))

    def restart(self, worker: int, now_s: float, epoch: int, initial_peers: list[str],
                arm_clock: Callable[[], float]) -> Future:
        """The trace brings the worker back now: its `return` record, then its new peer started on a thread of its
        own. The future gives the new peer's `describe()`, or raises what stopped its start."""
        assert not self._closed, f"worker {worker} restarted after the arm's restarts were closed"
        self.outage[worker] = None
        self.incarnation[worker] += 1
        self.returned_s[worker] = now_s
        self.emit(FaultRecord(arm=self.plan.name, worker=worker, event="return", time_s=now_s, step=epoch))
        return self._starts.submit(self._start, worker, self.incarnation[worker], initial_peers, arm_clock)

    def _start(self, worker: int, incarnation: int, initial_peers: list[str], arm_clock) -> dict:
        described = self.restart_peer(worker, incarnation, initial_peers, arm_clock)
        if self.faults_of[worker]:  # before its first round: it loads the state first
            self.peers.call("set_faults", [(self.faults_of[worker],)], workers=[worker])
        return described

    def close(self) -> None:
        """Wait for the starts under way to end (each is bounded by its own calls' timeouts); start no more."""
        self._closed = True
        self._starts.shutdown(wait=True)

    def joined(self, worker: int, loaded: dict, donor: int) -> None:
        """The restarted peer has applied the swarm's state (`SwarmPeer.progress()["loaded"]`) from worker `donor`
        (-1: a peer outside the arm)."""
        load = loaded["load"]
        self.emit(FaultRecord(
            arm=self.plan.name, worker=worker, event="join", time_s=loaded["loaded_s"], step=load.epoch,
            sources=[donor], state_bytes=load.state_bytes, wait_s=loaded["started_s"] - self.returned_s[worker],
            download_s=loaded["loaded_s"] - loaded["started_s"]))
