"""Faults and churn in the simulator's lockstep arms, with hivemind's semantics (`cluster.faults` says what happens).

The replicas still move in lockstep (the driver's protocol), but a peer that is gone contributes nothing: its steps are
neither booked nor recorded, its exchanges are groups of one that cost nothing and are not recorded, and its
parameters are left out of the consensus. What it computes meanwhile is thrown away when it returns, since a
returning peer loads the state of a live one (`trainer.replica_state`), as `load_state_from_peers` does.

- A peer leaves at a step or simulated time (its compute since its last round is lost), or during an exchange.
- An exchange proceeds without the peers that are gone (hivemind's matchmaking forms the group of those that
  answer), split into the sides of a partition in force when it starts.
- A peer failing in a butterfly exchange (hivemind's `allreduce.py`, and the fault kinds of its fault-tolerance
  tests): `before`: after the group has formed and the parts were assigned, before it sends anything; `sending`:
  while it sends. Either way the reducers wait `sender_timeout`, ban it and average without it, and its own part
  is lost (here a sender that dies while sending is taken to have delivered none of its parts; hivemind keeps the
  parts it had received, `TensorPartReducer.on_sender_failed`). `reducing`: its contribution is in the others'
  parts but its part is lost. A lost part is not re-requested: each survivor keeps its own values for it
  (`TensorPartContainer.register_failed_reducer`), and the survivors wait `reducer_timeout` for it. `cancel`: the
  peer stays, keeps its own tensor, and its part is lost at once (CANCELLED), without a timeout. A ring all-reduce
  is treated the same way with its N equal chunks as the parts.
- A returning peer loads the state at the end of the first round after its return, from `state_sources` live peers
  on its side (the fastest links to it first, then the lowest index), paying `collectives.state_download` on its
  downlink and their uplinks; until then it does not contribute. With no live peer on its side it waits: it is never
  a source while it has no state, and it never starts the swarm again from fresh weights (the lone-restart guard).
"""

from __future__ import annotations

from dataclasses import astuple, replace

import numpy as np
import torch

from cluster.checkpoint import NO_CHECKPOINTS, Checkpoints
from cluster.collectives import butterfly_average, state_download
from cluster.driver import ArmPlan, LockstepDriver, average, evaluate_consensus
from cluster.faults import FaultsConfig, FaultTrace, Outage
from cluster.records import CommRecord, FaultRecord
from cluster.sim import ModelledExchanges, Reduced
from trainer.compression import transmit
from trainer.robust import aggregate
from trainer.replica import StepDone

LIVE, DOWN, RETURNED = "live", "down", "returned"


class ChurnExchanges(ModelledExchanges):
    """`ModelledExchanges` with a fault trace: who is live, who is gone, who waits for the state."""

    def __init__(self, plan: ArmPlan, faults: FaultsConfig):
        super().__init__(plan)
        self.faults = faults
        self.trace = FaultTrace(faults, plan.n_workers, plan.seed)
        n = plan.n_workers
        self.status = [LIVE] * n
        self.outage_index = [0] * n
        self.outage: list[Outage | None] = [None] * n  # the outage a worker is in
        self.left_s = [0.0] * n
        self.returned_s = [0.0] * n
        self.unsynced_s = [0.0] * n  # compute since the worker's last round: lost if it fails
        self.synced_s = [0.0] * n  # when the worker's last round ended
        self.down_until: list[tuple[float | None, bool]] = [(None, False)] * n  # (back, by_step) of an exchange fault
        self.workers = None  # set by the driver: joins read and write replicas' state
        self.pending: list = []  # fault records not yet emitted
        self._hidden: set[tuple[int, tuple[int, ...]]] = set()  # (round, group) of a gone peer's group of one
        self._absent: dict[tuple[int, tuple[int, ...]], list[int]] = {}
        self._faulted: dict[int, object] = {}  # worker -> ExchangeFault, this round
        self._patched: dict[int, np.ndarray] = {}
        self._waited: dict[int, float] = {}
        self._lost: dict[tuple[int, ...], tuple[list[int], list[float]]] = {}
        self._sent: tuple | None = None  # a group with a failing member: its contributions as sent (`contributions`)

    # --- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """`ModelledExchanges.state_dict` and who is where in the trace (at a boundary no fault record is pending),
        with what the records of rounds still in flight need: the hidden groups, the absent and the lost parts."""
        assert not self.pending, "a checkpoint is taken between steps, once their fault records are out"
        return super().state_dict() | {"churn": {
            "status": list(self.status), "outage_index": list(self.outage_index),
            "outage": [None if o is None else astuple(o) for o in self.outage], "left_s": list(self.left_s),
            "returned_s": list(self.returned_s), "unsynced_s": list(self.unsynced_s),
            "synced_s": list(self.synced_s), "down_until": [list(d) for d in self.down_until],
            "hidden": [(r, list(g)) for r, g in sorted(self._hidden)],
            "absent": [(r, list(g), a) for (r, g), a in self._absent.items()],
            "lost": [(list(g), missing, fractions) for g, (missing, fractions) in self._lost.items()],
            "trace": self.trace.state_dict()}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        c = state["churn"]
        self.status, self.outage_index = list(c["status"]), list(c["outage_index"])
        self.outage = [None if o is None else Outage(*o) for o in c["outage"]]
        self.left_s, self.returned_s = list(c["left_s"]), list(c["returned_s"])
        self.unsynced_s, self.synced_s = list(c["unsynced_s"]), list(c["synced_s"])
        self.down_until = [tuple(d) for d in c["down_until"]]
        self._hidden = {(r, tuple(g)) for r, g in c["hidden"]}
        self._absent = {(r, tuple(g)): list(a) for r, g, a in c["absent"]}
        self._lost = {tuple(g): (list(m), list(f)) for g, m, f in c["lost"]}
        self.trace.load_state_dict(c["trace"])

    # --- time --------------------------------------------------------------------------------
    def compute_seconds(self, worker: int, flops: float) -> float:
        return flops / (self.plan.flops_per_second(worker) * self.faults.speed(worker, self.clock.now_s[worker]))

    def request_made(self, worker: int, request) -> None:
        if self.status[worker] == LIVE:
            before = self.clock.now_s[worker]
            super().request_made(worker, request)
            self.unsynced_s[worker] += self.clock.now_s[worker] - before

    def step_start_s(self, worker: int) -> float:
        """When the worker's current step began, or its last round ended if later: a failure inside a round the
        worker took part in counts from the round's end."""
        return max(self.clock.now_s[worker] - self.step_compute_s[worker], self.synced_s[worker])

    # --- membership ------------------------------------------------------------------------
    def next_outage(self, worker: int) -> Outage | None:
        return self.trace.outage(worker, self.outage_index[worker])

    def failure_in(self, worker: int, step: int, until_s: float) -> float | None:
        """When the live worker fails in the step it is computing (started at `step_start_s`), if it does by
        `until_s` or by this step's number; None if it does not."""
        o = self.next_outage(worker)
        if o is None:
            return None
        start = self.step_start_s(worker)
        if o.by_step:
            return start if o.leave <= step else None
        return max(o.leave, start) if o.leave <= until_s else None

    def leave(self, worker: int, time_s: float, step: int, cause: str, phase: str | None = None,
              back: float | None = None, by_step: bool = False, round_: int | None = None, waited: float | None = None) -> None:
        """The worker is gone from `time_s`: what it computed since its last round is lost (`waited`: worker-seconds
        the others waited for it in an exchange)."""
        lost = max(0.0, self.unsynced_s[worker] + time_s - self.clock.now_s[worker])
        if cause != "exchange":
            self.outage[worker] = self.next_outage(worker)
            self.outage_index[worker] += 1
            back, by_step = self.outage[worker].back, self.outage[worker].by_step
        self.down_until[worker] = (back, by_step)
        self.status[worker], self.left_s[worker] = DOWN, time_s
        self.clock.now_s[worker] = time_s
        self.step_compute_s[worker] = self.unsynced_s[worker] = 0.0
        self.pending.append(FaultRecord(arm=self.plan.name, worker=worker, event="leave", time_s=time_s, step=step,
                                        cause=cause, phase=phase, round=round_, back_s=None if by_step else back,
                                        back_step=int(back) if by_step and back is not None else None, lost_s=lost,
                                        timeout_s=waited))

    def _returns(self, step: int, now_s: float) -> None:
        for w in range(self.plan.n_workers):
            back, by_step = self.down_until[w]
            if self.status[w] != DOWN or back is None or (step < back if by_step else now_s < back):
                continue
            t = now_s if by_step else back
            self.status[w], self.returned_s[w] = RETURNED, t
            self.clock.now_s[w] = max(self.clock.now_s[w], t)
            self.pending.append(FaultRecord(arm=self.plan.name, worker=w, event="return", time_s=t, step=step))

    # --- exchanges -------------------------------------------------------------------------
    def exchange(self, requests: list, step: int) -> tuple[list, list]:
        n, live = self.plan.n_workers, self.status
        for w in range(n):  # failed while computing up to this exchange, or in an idle wait before it
            if live[w] == LIVE and (t := self.failure_in(w, step, self.clock.now_s[w])) is not None:
                self.leave(w, t, step, cause=self.next_outage(w).cause)
        arrived = [self.clock.now_s[w] for w in range(n) if live[w] == LIVE]
        start_s = max(arrived) if arrived else max(self.clock.now_s)
        self._returns(step, start_s)
        self._faulted = {w: f for w in range(n) if live[w] == LIVE and (f := self.faults.exchange_fault(w, self.round))}
        sides = self.faults.sides(start_s, n)
        side_of = {w: i for i, side in enumerate(sides) for w in side} if sides else {}
        regrouped = []
        for w, r in enumerate(requests):
            wanted = tuple(range(n)) if r.group is None else tuple(sorted(r.group))
            if live[w] != LIVE:
                group = (w,)
                self._hidden.add((self.round, group))
            else:
                group = tuple(x for x in wanted if live[x] == LIVE and side_of.get(x) == side_of.get(w))
                self._absent[(self.round, group)] = [x for x in wanted if x not in group]
            regrouped.append(replace(r, group=group))
        self._patched, self._lost, self._waited = {}, {}, {}
        round_ = self.round
        replies, records = super().exchange(regrouped, step)
        for w, result in self._patched.items():
            replies[w] = result
        for w in range(n):
            if live[w] == LIVE:
                self.unsynced_s[w], self.synced_s[w] = 0.0, self.clock.now_s[w]
        end_s = {w: self.link_free_s[w] for w in range(n)}
        for w, fault in self._faulted.items():
            if fault.phase != "cancel":
                back = None if fault.down_s is None else end_s[w] + fault.down_s
                self.step_compute_s[w] = 0.0
                self.leave(w, end_s[w], step, cause="exchange", phase=fault.phase, back=back, round_=round_,
                           waited=self._waited.get(w, 0.0))
            else:
                self.pending.append(FaultRecord(arm=self.plan.name, worker=w, event="cancel", time_s=end_s[w],
                                                step=step, round=round_, timeout_s=self._waited.get(w, 0.0)))
        self._joins(regrouped, replies, step, sides, side_of)
        out = self._shown(records) + self.pending
        self.pending = []
        return replies, out

    def await_exchanges(self, requests, step):
        replies, records = super().await_exchanges(requests, step)
        return replies, self._shown(records)

    def _shown(self, records: list[CommRecord]) -> list[CommRecord]:
        """The round's records without the groups of one of gone peers, numbered again, with who was absent."""
        shown = []
        for r in records:
            # A group's record comes once (its round's end, or its members' awaits): what it needed goes with it.
            key = (r.round, tuple(r.participants))
            absent = self._absent.pop(key, None)
            if key in self._hidden:
                self._hidden.discard(key)
                continue
            extra = {"absent": absent or None}
            if key[1] in self._lost:
                missing, fraction = self._lost[key[1]]
                extra |= {"missing_peers": missing, "received_fraction": fraction}
            shown.append(replace(r, group=len(shown), **extra))
        return shown

    def contributions(self, group: tuple[int, ...], requests: list, step: int) -> tuple[list, list, list[int]]:
        sent = super().contributions(group, requests, step)
        if len(group) > 1 and any(w in self._faulted for w in group):
            self._sent = sent  # what `reduce` averages again without the failed members, poisoned as it was sent
        return sent

    def reduce(self, group: tuple[int, ...], requests: list, index: int = 0, step: int = 0) -> Reduced:
        reduced = super().reduce(group, requests, index, step)
        faulted = [w for w in group if w in self._faulted]
        if len(group) < 2 or not faulted:
            return reduced
        size = requests[0].tensor.size
        if reduced.collective == "butterfly":
            parts = list(reduced.cost.part_sizes)
        else:  # a ring's chunks, as its reduce-scatter cuts them
            parts = [size // len(group) + (1 if i < size % len(group) else 0) for i in range(len(group))]
        bounds = np.cumsum([0] + parts)
        excluded = {w for w in faulted if self._faulted[w].phase != "reducing"}
        # Taken, not kept: the driver lets go of the round's messages before the workers make their next ones.
        (sent, sent_weights, refused), self._sent = self._sent, None
        kept = [i for i, w in enumerate(group) if w not in excluded]
        if any(i not in refused for i in kept):  # the reducers refuse what is malformed, as without faults
            kept = [i for i in kept if i not in refused]
        tensors, weights = [sent[i] for i in kept], [sent_weights[i] for i in kept]
        rule = self.robust_rule()
        if rule is not None:  # robust rules run part by part at the reducers (a butterfly, see `reduce`)
            mean = aggregate(tensors, weights, rule, parts)
        elif reduced.collective == "butterfly":
            mean = butterfly_average(tensors, weights, [size])
        else:
            mean = average(tensors, weights)
        mean = transmit(torch.from_numpy(np.ascontiguousarray(mean)), self.plan.codec).tensor.numpy().reshape(-1)
        lost = [i for i, w in enumerate(group) if w in faulted]
        wait = 0.0
        for i in lost:
            phase = self._faulted[group[i]].phase
            if phase != "cancel" and (phase == "reducing" or parts[i] > 0):
                wait = max(wait, self.faults.reducer_timeout_s)
            elif phase != "cancel":
                wait = max(wait, self.faults.sender_timeout_s)
        lost_elements = sum(parts[i] for i in lost)
        fractions = []
        for i, w in enumerate(group):
            own = np.asarray(requests[i].tensor, dtype=np.float32).reshape(-1)
            if w in faulted:
                self._patched[w] = own.reshape(requests[i].tensor.shape).copy()
                fractions.append(0.0)
                continue
            mine = mean.copy()
            for j in lost:
                mine[bounds[j]:bounds[j + 1]] = own[bounds[j]:bounds[j + 1]]
            self._patched[w] = mine.reshape(requests[i].tensor.shape)
            fractions.append(1.0 - lost_elements / size if size else 1.0)
        self._lost[group] = (sorted(faulted), fractions)
        extra = max(0.0, wait - reduced.cost.time_s) * (len(group) - len(lost))
        for i in lost:  # the survivors' wait, charged to the first peer that failed
            self._waited[group[i]] = extra if i == lost[0] else 0.0
        return replace(reduced, cost=replace(reduced.cost, time_s=max(reduced.cost.time_s, wait)))

    # --- joins -----------------------------------------------------------------------------
    def _joins(self, requests: list, replies: list, step: int, sides, side_of: dict) -> None:
        n = self.plan.n_workers
        for w in range(n):
            if self.status[w] != RETURNED:
                continue
            candidates = [s for s in range(n) if self.status[s] == LIVE and side_of.get(s) == side_of.get(w)]
            if not candidates:
                continue  # the lone-restart guard: no one to download from, so it waits with no state
            net = self.plan.network
            candidates.sort(key=lambda s: (-net.pair_bandwidth_bps(s, w), s))
            sources = candidates[: self.faults.state_sources]
            state = self.workers.call("export_state", workers=[sources[0]])[0]
            nbytes = self.workers.call("import_state", [(state,)], workers=[w])[0]
            replies[w] = replies[sources[0]]
            cost = state_download(net, w, sources, nbytes, rng=self.jitter_rng)
            start = max(self.clock.now_s[w], *(self.link_free_s[s] for s in sources[:1]))
            end = start + cost.time_s
            self.clock.idle_s[w] += start - self.clock.now_s[w]
            self.clock.comm_s[w] += cost.time_s
            self.clock.now_s[w] = self.link_free_s[w] = end
            for s in sources:
                self.link_free_s[s] = max(self.link_free_s[s], end)
            self.status[w], self.step_compute_s[w], self.unsynced_s[w] = LIVE, 0.0, 0.0
            self.pending.append(FaultRecord(
                arm=self.plan.name, worker=w, event="join", time_s=end, step=step, sources=sources,
                state_bytes=nbytes, wait_s=start - self.returned_s[w], download_s=cost.time_s))


class ChurnDriver(LockstepDriver):
    """The lockstep driver with a fault trace: books only the steps of live workers, evaluates their consensus."""

    def __init__(self, workers, plan: ArmPlan, exchanges: ChurnExchanges, emit, on_step=lambda: None,
                 checkpoints: Checkpoints = NO_CHECKPOINTS):
        super().__init__(workers, plan, exchanges, emit, on_step, checkpoints)
        exchanges.workers = workers

    def state_dict(self) -> dict:
        # The consensus the last evaluation saw stands for the next one if no peer is live by then.
        return super().state_dict() | {"last_params": [torch.from_numpy(np.array(p)) for p in self.last_params]}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.last_params = [p.numpy() for p in state["last_params"]]

    def book_step(self, w: int, d: StepDone) -> None:
        """A live worker's step, unless the trace takes it down before the step's compute is over."""
        ex = self.exchanges
        if ex.status[w] == LIVE:
            rest_s = ex.compute_seconds(w, d.flops)
            t = ex.failure_in(w, d.step, ex.clock.now_s[w] + rest_s)
            if t is not None:
                ex.leave(w, t, d.step, cause=ex.next_outage(w).cause)
        if ex.status[w] != LIVE:
            ex.step_compute_s[w] = 0.0
            return
        super().book_step(w, d)
        ex.unsynced_s[w] += rest_s

    def step_booked(self) -> None:
        for record in self.exchanges.pending:
            self.emit(record)
        self.exchanges.pending = []

    def evaluate(self, step: int) -> None:
        live = [w for w in range(self.plan.n_workers) if self.exchanges.status[w] == LIVE]
        # With no peer live the swarm holds no state the simulator can read: the last consensus stands.
        params = self.workers.call("params", workers=live) if live else self.last_params
        self.last_params = params
        self.emit(evaluate_consensus(self.workers, self.plan.name, step, step * self.plan.tokens_per_step,
                                     self.exchanges.now_s, params))
