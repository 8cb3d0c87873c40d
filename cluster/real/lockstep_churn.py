"""Faults on a real lockstep arm (ddp, diloco): the fault trace kills real peers, the rounds go on among the live
ones, and a restarted peer loads the state and takes part again, as the simulator's `cluster.churn` plays it.

The driver moves the live peers one step at a time, so that between two steps every peer is at a step boundary
(no strategy part-way through a step, every average applied): that is where the trace is played.
- The trace is `cluster.faults.FaultTrace`, the simulator's own, drawn from the run's seed. `leave_step` and
  `return_step` are the simulator's step numbers; `leave_s`, `return_s` and the drawn mtbf/mttr times are seconds of
  the arm's clock (wall time spent training, paused at evaluations and at the boundaries where the trace is played).
- A failure due at step s (by number, or by a time the clock has reached when step s begins) SIGKILLs the peer
  before it computes step s (`RealPeer.crash`: its DHT, p2pd and averager processes, then its actor's process), as
  the simulator takes a peer down before it books that step. `leave` record: `lost_s`, its compute since the last
  round it took part in, thrown away.
- The rounds are among the live peers only: before a round with a new membership every live peer's averager is
  given the membership's group key and size (`cluster.real.lockstep_peer`), just before the round. A lone live peer
  keeps its own tensor. The records name the live peers as `participants` and the others as `absent`.
- A return falls due at the first round at or after its time or step (its time as the clock stood when that round's
  step began), as in the simulator, where the returning peer sits that round out and loads the state at its end: here
  the driver starts a new actor for the worker once the round is over (a process of its own, fresh weights, a new peer
  id), which joins the DHT through the live peers and downloads the state with hivemind's `load_state_from_peers`
  from a live peer. `return` record when the round is over, `join` once the state is applied (`sources`: the donor,
  `state_bytes` as received, `wait_s`: wall seconds from the return until the download began, that is the actor,
  its DHT and its averager starting, and `download_s`); it takes part from the next round on.
- With no peer live nothing trains: the steps pass with no records, returns fall due at each step's boundary, and a
  returning peer starts alone and waits without state for the rest of the run (the lone-restart guard: it serves no
  state and never trains its fresh weights). The evaluation then repeats the last consensus's loss, as the
  simulator evaluates the last consensus again.
- Exchange faults (`faults.exchange`): round r is the arm's r-th exchange, as the simulator's `ChurnExchanges.round`
  counts (every round, a lone peer's included; a stretch with no peer live runs no exchange here, so a trace whose
  rounds come after one is numbered differently from the simulator's). Before round r the driver arms each live
  member's fault of r on its averager (`LockstepPeer.arm_exchange_fault`), which plays it in hivemind's all-reduce
  (`cluster.real.averager`, where: `cluster.real.exchange_faults`): `before`, `sending`, `reducing` SIGKILL the
  peer's whole tree from its averager; `cancel` answers CANCELLED and keeps the peer. A lone live peer runs no
  all-reduce: the driver kills it (`RealPeer.crash`) once its round is over, as the simulator takes it down there.
- How the round ends for the survivors: as hivemind ends it, and as the simulator models it (`cluster.churn`): no
  retry. Each survivor steps on the partial average it received, holding its own values in the failed member's part
  (its reducer is gone); a member that died before or while sending is left out of the parts whose reducers had
  not got its contribution (hivemind bans it; the simulator takes it as having delivered nothing), one that died
  reducing is in the others' parts. So DDP survivors no longer hold the same bits after such a round, by the part's
  width: that is what real peers do, and what `farflung fidelity` compares with the simulator. (Repeating the round
  among the survivors, as a partial round without a fault is, would hide the fault's cost and disagree with the
  simulator's model.) The peer that cancelled steps on its own tensor. `cluster.real.lockstep.PeerExchanges` checks
  that the round failed as its faults say and raises otherwise. The survivors wait as hivemind makes them: a dead
  peer's connections break at once, but a sender that never started (`before`, `cancel`) is banned only after the
  sender timeout (`AveragingTimeouts.next_chunk_timeout_s`, 10 s at least).
- After the round, a peer that died is buried: Ray lets go of its actor, its `leave` record (cause "exchange", the
  phase and round, `back_s` = the round's end + `down`, `lost_s` 0: it had just synchronised) follows the round's
  record, and it is absent from the next rounds; it returns once the clock reaches `back_s`, through the same
  restart and state download as a trace's failure. A `cancel` record for a peer that cancelled.
- Stragglers (`faults.stragglers`): each peer sleeps `PeerFaults.slowdown_s` after each step's compute over
  `[from_s, to_s)` of the arm's clock (`cluster.real.lockstep_peer`); the sleep is in the step's `compute_s`, and
  `straggled_s` shows it apart.
- Partitions (`faults.partition`): at each exchange the sides in force at the arm's clock (`PeerExchanges.now_s`:
  the latest step end any peer reported, so the exchange's start) split the live peers into groups (`groups_of`),
  each averaging apart at the same time (`PeerExchanges.set_groups`); every peer is told its group, a membership
  of its own numbered anew at each cut and heal, so no key is shared across sides or with the swarm before the
  cut. The relays are cut to match (`cluster.real.partition.RelayCuts`), at each step boundary and before each
  round, the dial addresses of a worker's dead peers included. A peer returning during a cut joins the DHT
  through the live peers of its side, its relay is cut and the others' told of its address before it downloads
  the state, so it loads from its side; with no live peer there it waits (the lone-restart guard), and loads at
  the first round's end after the heal. At the heal each peer whose relay refused others pings them again
  (`cluster.real.partition.Remeet`) and the driver waits for the pings, so that the next round's matchmaking
  finds every peer in the DHT; a round that still fails to meet is retried (`RealOptions.max_attempts`). After
  the heal nothing re-synchronises DDP's parameters, as in the simulator. Exchange faults are played in the
  groups the partition makes (a member alone on its side plays its fault as a lone peer does).
Restarting and loading block the driver: the live peers wait at the boundary meanwhile, and the arm's clock does not
run, so those seconds are in the join record rather than in the steps'.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from cluster.driver import ArmPlan, LockstepDriver, consensus
from cluster.faults import FaultsConfig, FaultTrace, Outage
from cluster.real.accounting import Address
from cluster.real.exchange_faults import KILLING, PeerFaults
from cluster.real.partition import RelayCuts, lifted
from cluster.records import EvalRecord, FaultRecord, StepRecord
from trainer.replica import StepDone

LIVE, DOWN, RETURNED = "live", "down", "returned"


def groups_of(live: list[int], sides: list[tuple[int, ...]] | None) -> list[tuple[int, ...]]:
    """A round's groups: the live workers of each side (all of them when the network is whole), in order of each
    group's lowest worker."""
    if sides is None:
        return [tuple(live)]
    groups = [tuple(w for w in live if w in side) for side in sides]
    return sorted((g for g in groups if g), key=min)


class LockstepMembers:
    """Who is live, gone or back without state in a real lockstep arm, as the trace says (no peers here)."""

    def __init__(self, faults: FaultsConfig, plan: ArmPlan):
        n = plan.n_workers
        self.plan, self.faults = plan, faults
        self.trace = FaultTrace(faults, n, plan.seed)
        self.status = [LIVE] * n
        self.index = [0] * n  # each worker's next outage in the trace
        self.outage: list[Outage | None] = [None] * n  # the outage a worker is in
        self.number = 0  # the membership's number in the run: one more at every leave and join, cut and heal

    def live(self) -> list[int]:
        return [w for w, s in enumerate(self.status) if s == LIVE]

    def waiting(self) -> list[int]:
        """Workers back without the state."""
        return [w for w, s in enumerate(self.status) if s == RETURNED]

    def leaving(self, step: int, now_s: float) -> list[int]:
        """The live workers whose next outage has begun by step `step`, whose compute starts at `now_s`."""
        due = []
        for w in self.live():
            o = self.trace.outage(w, self.index[w])
            if o is not None and (o.leave <= step if o.by_step else o.leave <= now_s):
                due.append(w)
        return due

    def returning(self, step: int, now_s: float) -> list[int]:
        """The gone workers the trace brings back by step `step`, begun at `now_s`."""
        return [w for w, o in enumerate(self.outage) if self.status[w] == DOWN and o is not None and o.back is not None
                and (o.back <= step if o.by_step else o.back <= now_s)]

    def leave(self, w: int, step: int, now_s: float, lost_s: float) -> FaultRecord:
        o = self.outage[w] = self.trace.outage(w, self.index[w])
        self.index[w] += 1
        self.status[w] = DOWN
        self.number += 1
        return FaultRecord(arm=self.plan.name, worker=w, event="leave", time_s=now_s, step=step, cause=o.cause,
                           back_s=None if o.by_step else o.back,
                           back_step=int(o.back) if o.by_step and o.back is not None else None, lost_s=lost_s)

    def exchange_faults(self, round_: int, members: tuple[int, ...]) -> dict[int, str]:
        """The members' exchange faults of the arm's round `round_`: worker -> phase."""
        return {w: f.phase for w in members if (f := self.faults.exchange_fault(w, round_)) is not None}

    def failed(self, w: int, step: int, now_s: float, round_: int) -> FaultRecord:
        """The worker's exchange fault of `round_` was played at `now_s`: gone until `down` later (a leave), or it
        cancelled and stays."""
        fault = self.faults.exchange_fault(w, round_)
        if fault.phase not in KILLING:
            return FaultRecord(arm=self.plan.name, worker=w, event="cancel", time_s=now_s, step=step, round=round_)
        back = None if fault.down_s is None else now_s + fault.down_s
        self.outage[w] = Outage(w, now_s, back, by_step=False, cause="exchange")
        self.status[w] = DOWN
        self.number += 1
        return FaultRecord(arm=self.plan.name, worker=w, event="leave", time_s=now_s, step=step, cause="exchange",
                           phase=fault.phase, round=round_, back_s=back, lost_s=0.0)

    def peer_faults(self, w: int) -> PeerFaults:
        """What worker `w`'s peer plays itself: its straggling (its exchange faults are armed round by round)."""
        return PeerFaults(stragglers=tuple(s for s in self.faults.stragglers if s.worker == w))

    def returned(self, w: int, step: int, now_s: float) -> FaultRecord:
        self.status[w], self.outage[w] = RETURNED, None
        return FaultRecord(arm=self.plan.name, worker=w, event="return", time_s=now_s, step=step)

    def joined(self, w: int, step: int, now_s: float, loaded: dict, wait_s: float) -> FaultRecord:
        self.status[w] = LIVE
        self.number += 1
        return FaultRecord(arm=self.plan.name, worker=w, event="join", time_s=now_s, step=step,
                           sources=[loaded["donor"]], state_bytes=loaded["state_bytes"], wait_s=wait_s,
                           download_s=loaded["download_s"])


class LockstepChurnDriver(LockstepDriver):
    """The lockstep driver over the live peers of a fault trace (see the module docstring).

    `restart(worker, initial_peers, arm_clock_s)` starts the worker's new peer (sharing no state) joined through
    `initial_peers` (alone if empty) and returns its `describe()`; `load_timeout_s` bounds its state download."""

    REMEET_TIMEOUT_S = 30.0  # `Remeet`'s five tries a second apart, each a dial and a ping, with room for a busy host

    def __init__(self, workers, plan: ArmPlan, exchanges, emit, on_step=lambda: None, *, members: LockstepMembers,
                 restart: Callable[[int, list[str], float], dict], load_timeout_s: float):
        super().__init__(workers, plan, exchanges, emit, on_step)
        self.members, self.restart, self.load_timeout_s = members, restart, load_timeout_s
        n = plan.n_workers
        self.unsynced_s = [0.0] * n  # compute since the worker's last round
        self.round_step = [-1] * n  # the step of the worker's last round
        self.returned_at: dict[int, float] = {}  # worker -> wall time of its return
        self.last_loss: float | None = None
        self._faults_set = False
        self.cuts = RelayCuts(members.faults, n) if members.faults.partition else None
        self.former: dict[Address, int] = {}  # dial address of a worker's earlier peer -> worker
        self._sides: list | None = None  # the sides of the last rounds' groups
        self.remeets: list[tuple[int, list[int], int]] = []  # at each heal: (worker, workers it pinged, answered)

    def _set_faults(self, workers: list[int]) -> None:
        """Hand the workers' peers their straggling, if any."""
        slow = [w for w in workers if self.members.peer_faults(w)]
        if slow:
            self.workers.call("set_faults", [(self.members.peer_faults(w),) for w in slow], workers=slow)

    def advance(self, until_step: int, finish: bool) -> None:
        members, exchanges = self.members, self.exchanges
        if not self._faults_set:
            self._set_faults(members.live())
            self._faults_set = True
        for step in range(self.steps_completed, until_step):
            now_s = exchanges.now_s
            for w in members.leaving(step, now_s):
                self._kill(w)
                self.emit(members.leave(w, step, now_s, self.unsynced_s[w]))
            due = members.returning(step, now_s)
            live = members.live()
            if not live:  # nothing trains; the guard holds whoever comes back
                self._returns(due, step)
                self.steps_completed = step + 1
                self.on_step()
                continue
            self._play_cuts()
            rounds = exchanges.round
            self._advance_live(live, step + 1, finish and step + 1 == until_step)
            if exchanges.round > rounds:
                self._returns(due, step)
                self._joins(step)

    def _advance_live(self, live: list[int], until_step: int, finish: bool) -> None:
        while live:
            events = self.workers.call("advance", [(until_step, None, finish)] * len(live), workers=live)
            steps = [[e for e in evs if isinstance(e, StepDone)] for evs in events]
            assert len({len(s) for s in steps}) == 1, "workers left lockstep"
            for done in zip(*steps):
                for w, d in zip(live, done):
                    self.book_step(w, d)
                self.on_step()
                self.steps_completed = done[0].step + 1
            tails = [evs[-1] if evs and not isinstance(evs[-1], StepDone) else None for evs in events]
            if all(t is None for t in tails):
                return
            assert all(t is not None for t in tails), "only some workers made a request"
            round_, step = self.exchanges.round, self.steps_completed
            self._regroup(live, step)
            faults = self.members.exchange_faults(round_, tuple(live))
            _, records = self.exchanges.exchange(tails, step, faults=faults)
            for w in live:
                self.round_step[w] = step
            for record in records:
                self.emit(record)
            end_s = self.exchanges.now_s
            for w in sorted(self.exchanges.failed):
                record = self.members.failed(w, step, end_s, round_)
                if record.event == "leave":
                    self._kill(w)  # dead already, but for a lone peer: Ray lets go of it
                    live = [v for v in live if v != w]
                self.emit(record)

    def _regroup(self, live: list[int], step: int) -> None:
        """The round about to start: its groups, the sides in force now (`cluster.faults.FaultsConfig.sides` at the
        arm's clock) each split to its live peers, with the relays cut to match; each peer is told its group (a
        membership of its own, numbered anew at each cut and heal) if that changed."""
        self._play_cuts()
        sides = self.members.faults.sides(self.exchanges.now_s, self.plan.n_workers)
        groups = groups_of(live, sides)
        if sides != self._sides:
            self.members.number += 1  # a group key of its own for each side, and for the swarm healed
            self._sides = sides
        elif tuple(groups) == self.exchanges.groups:
            return
        side = {w: g for g in groups for w in g}
        self.workers.call("set_members", [(list(side[w]), self.members.number, step) for w in live], workers=live)
        self.exchanges.set_groups(groups)

    def _play_cuts(self) -> None:
        """Tell the up peers' relays the partition in force at the arm's clock (cut, changed or healed), once per
        change; at a heal, each peer that refused others pings them again and the driver waits for the pings
        (`cluster.real.partition`), so that the next round's matchmaking finds every peer in the DHT."""
        if self.cuts is None:
            return
        up = sorted(self.members.live() + self.members.waiting())
        before = dict(self.cuts.applied)
        changes = self.cuts.due(self.exchanges.now_s, up, self.exchanges.dial_addresses, self.former)
        if not changes:
            return
        self.workers.call("set_cut", [(sorted(c),) for c in changes.values()], workers=list(changes))
        # Every relay is told first, so that the pings find the way open at both ends.
        freed = {w: [v for v in vs if v in up] for w, vs in
                 lifted(before, changes, self.exchanges.dial_addresses).items()}
        freed = {w: vs for w, vs in freed.items() if vs}
        if not freed:
            return
        maddrs = dict(zip(up, self.workers.call("visible_maddrs", workers=up)))
        self.workers.call("remeet", [([maddrs[v] for v in vs],) for vs in freed.values()], workers=list(freed))
        answered = self.workers.call("remeet_done", [(self.REMEET_TIMEOUT_S,)] * len(freed), workers=list(freed),
                                     timeout_s=self.REMEET_TIMEOUT_S + 30)
        self.remeets += [(w, vs, a) for (w, vs), a in zip(freed.items(), answered)]

    def _kill(self, w: int) -> None:
        self.workers.kill(w, "crash")
        if self.cuts is not None:
            self.cuts.forget(w)  # its relay died with it

    def book_step(self, w: int, d: StepDone) -> None:
        plan = self.plan
        time_s, compute_s = self.exchanges.step_done(w, d)
        self.emit(StepRecord(arm=plan.name, worker=w, step=d.step, tokens=(d.step + 1) * plan.tokens_per_step,
                             loss=d.loss, time_s=time_s, compute_s=compute_s,
                             straggled_s=getattr(d, "straggled_s", 0.0) or None))
        self.unsynced_s[w] = 0.0 if self.round_step[w] == d.step else self.unsynced_s[w] + d.compute_s

    def _reachable(self, w: int, peers: list[int]) -> list[int]:
        """Of `peers`, those on worker `w`'s side of the partition in force at the arm's clock (all when whole)."""
        if self.cuts is None:
            return peers
        side = self.cuts.side_of(w, self.exchanges.now_s)
        return [v for v in peers if v in side]

    def _returns(self, due: list[int], step: int) -> None:
        """The workers due back: their `return` records, and new peers, joined through the live ones on their side
        (whose relays are then told of them, and they of the partition)."""
        live = self.members.live()
        maddrs = dict(zip(live, self.workers.call("visible_maddrs", workers=live))) if live else {}
        for w in due:
            self.emit(self.members.returned(w, step, self.exchanges.now_s))
            self.returned_at[w] = time.perf_counter()
            initial = [m for v in self._reachable(w, live) for m in maddrs[v]]
            described = self.restart(w, initial, self.exchanges.now_s)
            if self.cuts is not None:  # its former peer's address stays cut too, as in the swarm arms
                self.former[tuple(self.exchanges.dial_addresses[w])] = w
            self.exchanges.dial_addresses[w] = tuple(described["dial_address"])
            self._set_faults([w])
        if due:
            self._play_cuts()

    def _joins(self, step: int) -> None:
        """Every worker back without state loads it from a live peer on its side (none: it waits)."""
        self._play_cuts()
        for w in self.members.waiting():
            if not self._reachable(w, self.members.live()):
                continue  # the lone-restart guard: no one to load from, so it waits with no state
            wait_s = time.perf_counter() - self.returned_at[w]
            loaded = self.workers.call("load_state", [(self.load_timeout_s,)], workers=[w],
                                       timeout_s=self.load_timeout_s + 30)[0]
            if loaded is None:
                raise RuntimeError(f"arm {self.plan.name!r}: worker {w} found no live peer serving the state within "
                                   f"{self.load_timeout_s:.0f} s at step {step}; check that the peers reach each "
                                   "other, or raise startup_timeout")
            assert loaded["step"] == self.steps_completed, f"worker {w} loaded the state of step {loaded['step']}"
            self.unsynced_s[w], self.round_step[w] = 0.0, -1
            self.emit(self.members.joined(w, step, self.exchanges.now_s, loaded, wait_s))

    def evaluate(self, step: int) -> None:
        live = self.members.live()
        # With no peer live the swarm's state is what the last evaluation saw: the same parameters, the same loss.
        params = self.workers.call("params", workers=live) if live else self.last_params
        self.last_params = params
        model, spread = consensus(params)
        if live:
            self.last_loss = self.workers.call("evaluate", [(model,)], workers=[live[0]])[0]
        self.emit(EvalRecord(arm=self.plan.name, step=step, tokens=step * self.plan.tokens_per_step,
                             time_s=self.exchanges.now_s, loss=self.last_loss, param_spread=spread))
