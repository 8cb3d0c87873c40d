"""Faults and churn in the simulator's collaborative (hivemind.Optimizer) arms: `cluster.faults`' trace, played on a
swarm whose epochs close on the samples of the peers that are there.

Every replica still moves from epoch to epoch with the others (the driver's protocol), but a peer that is gone
accumulates nothing: it is asked for no microbatch, its contribution is left out of every group, its parameters out
of the consensus, and it writes no `step` record; what it holds is overwritten when it loads the state again.

- **Leaving.** A peer fails at a step (the start of that epoch) or at a simulated time. One that fails before its
  group's all-reduce begins takes no part in the epoch: its samples, those accumulated so far and a late microbatch
  carried in from the previous epoch, never reach the swarm, and the epoch's target is met by the others' samples
  (`cluster.swarm_schedule`; the epoch is planned again without it, so it closes later). hivemind's progress tracker
  would go on counting a dead peer's last report until its DHT record expires; here the target counts the live
  peers' samples only. A failure while its rounds run counts from the end of its last round (the rounds finish with
  it, as a lockstep exchange does in `cluster.churn`): it steps, then leaves, and only its late microbatch is lost.
- **Failing in a round** (`exchange`, by round number: gradient and state rounds share the counter), as hivemind's
  butterfly does and as `cluster.churn` models it (`ChurnExchanges.reduce`): `before` / `sending` leave its
  contribution out of every part, `reducing` keeps it in the others' parts, and either way its own part is lost, not
  re-requested: each survivor keeps its own values there (hivemind 1.1.12 `TensorPartContainer.register_failed_reducer`
  in averaging/partition.py). The survivors wait `sender_timeout` or `reducer_timeout`, which default to
  hivemind.Optimizer's: next_chunk_timeout = matchmaking_time, and twice it (optim/optimizer.py,
  averaging/averager.py). hivemind.Optimizer then steps on the partial average; a round whose matchmaking wait and
  timeouts exceed `averaging_timeout` fails and every peer steps on its own gradients, as without faults. `cancel`
  keeps the peer, its part lost at once.
- **Partitions.** The sides in force when the swarm's round would begin each form their own group (and their own
  state average): the peers of one side hold the same parameters, different from the other side's, until the state
  averager brings them together after the cut heals. The epoch is still one for the whole swarm: its samples are
  counted over every side (the progress tracker's DHT records are taken to cross the cut).
- **Returning** (`cluster.swarm_joins`). A peer that is back downloads the swarm's state (parameters, optimizer
  state, and the gradient accumulators, which hivemind.Optimizer downloads too and then resets:
  `Collaborative.state_loaded`) from live peers of its side, paying `collectives.state_download` on its downlink and
  their uplinks, as `load_state_from_peers` does, and rejoins at the swarm's current epoch: in the epoch its
  download began if it ends before the others notice the epoch's end, else in the next one, an epoch behind.
- **The lone-restart guard.** A peer that comes back with no live peer on its side waits with no state: it is
  never a source and never contributes, so it can neither become the swarm's state with fresh weights nor overwrite
  the peers that come back later. With no live peer anywhere (and no download under way) the swarm's state is gone
  and the arm ends there, its last consensus standing.
- **Stragglers** slow a peer's microbatches over their interval (`FaultsConfig.speed`).

The records are the lockstep churn's: `fault` records (`cluster.records.FaultRecord`), `absent` on every round
without someone, `missing_peers` and `received_fraction` for a round a peer failed in.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch

from cluster.checkpoint import NO_CHECKPOINTS, Checkpoints
from cluster.churn import LIVE, ChurnExchanges
from cluster.collaborative import CollaborativeDriver
from cluster.driver import ArmPlan, evaluate_consensus
from cluster.faults import FaultsConfig
from cluster.records import CommRecord, StepRecord
from cluster.swarm_joins import Download, SwarmJoins
from cluster.swarm_schedule import Completions, EpochPlan, plan_epoch
from cluster.swarm_timing import SwarmTiming
from trainer.replica import ExchangeRequest, StepDone
from trainer.settings import ConfigError
from trainer.strategies.base import EpochAverage


def swarm_faults(path: str, faults: FaultsConfig, timing: SwarmTiming) -> FaultsConfig:
    """The faults with hivemind.Optimizer's timeouts where the table sets none: sender_timeout = matchmaking_time
    (its next_chunk_timeout), reducer_timeout twice the sender's."""
    sender = faults.sender_timeout_s if "sender_timeout" in faults.raw else timing.matchmaking_time
    reducer = faults.reducer_timeout_s if "reducer_timeout" in faults.raw else 2 * sender
    if "reducer_timeout" in faults.raw and reducer <= sender:
        raise ConfigError(f"{path}.reducer_timeout: must be longer than sender_timeout ({sender:g} s, by default the "
                          f"arm's matchmaking_time as in hivemind.Optimizer), got {reducer:g}; set sender_timeout too")
    return replace(faults, sender_timeout_s=sender, reducer_timeout_s=reducer)


class CollaborativeChurnDriver(SwarmJoins, CollaborativeDriver):
    """The collaborative driver with a fault trace (`faults` as `swarm_faults` gives them)."""

    def __init__(self, workers, plan: ArmPlan, faults: FaultsConfig, emit, on_step=lambda: None,
                 checkpoints: Checkpoints = NO_CHECKPOINTS):
        super().__init__(workers, plan, emit, on_step, checkpoints)
        self.faults = faults = swarm_faults("faults", faults, self.timing)
        self.exchanges = ChurnExchanges(plan, faults)
        n = plan.n_workers
        self.synced_s = [0.0] * n  # when a peer's last round (or its download) ended: the state it holds is from then
        self.carried_s = [0.0] * n  # compute of the late microbatch a peer carries into the next epoch
        self.epoch_start_s = 0.0  # when the previous epoch's last round ended
        self.pending: dict[int, Download] = {}  # downloads under way (`SwarmJoins`)
        self.last_params: list = []
        self.evaluated = True  # the epoch reached is evaluated

    # --- the run -------------------------------------------------------------------------------
    def run(self) -> None:
        budget, eval_tokens, epoch_tokens = self.begin()
        epoch = self.checkpoints.restore(self)
        if epoch == 0:
            self.evaluate(0, tokens=0)
            self.evaluated = True
        while self.tokens < budget:
            if not self.epoch(epoch, allow_late=self.tokens + epoch_tokens < budget, budget=budget):
                break  # no peer holds the swarm's state any more
            epoch, self.evaluated = epoch + 1, False
            if self.tokens >= self.next_eval or self.tokens >= budget:
                self.evaluate(epoch, tokens=self.tokens)
                self.evaluated = True
                while self.next_eval <= self.tokens:
                    self.next_eval += eval_tokens
            if self.tokens < budget and self.checkpoints.due(epoch):
                self.checkpoints.save(self, epoch)
        if not self.evaluated:
            self.evaluate(epoch, tokens=self.tokens)

    def state_dict(self) -> dict:
        """`CollaborativeDriver.state_dict`, the membership (`ChurnExchanges.state_dict`) and what the faults add:
        when each peer last synchronised, its carried compute, the downloads under way (with the state they
        load) and the consensus that stands while no peer is live."""
        return super().state_dict() | {"swarm_churn": {
            "synced_s": list(self.synced_s), "carried_s": list(self.carried_s), "epoch_start_s": self.epoch_start_s,
            "evaluated": self.evaluated, "pending": [dict(vars(d)) for d in self.pending.values()],
            "last_params": [torch.from_numpy(np.array(p)) for p in self.last_params]}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        c = state["swarm_churn"]
        self.synced_s, self.carried_s = list(c["synced_s"]), list(c["carried_s"])
        self.epoch_start_s, self.evaluated = c["epoch_start_s"], c["evaluated"]
        self.pending = {d["worker"]: Download(**d) for d in c["pending"]}
        self.last_params = [p.numpy() for p in c["last_params"]]

    def evaluate(self, step: int, tokens: int) -> None:
        live = self.live()
        # With no peer live the swarm holds no state the simulator can read: the last consensus stands.
        params = self.workers.call("params", workers=live) if live else self.last_params
        self.last_params = params
        self.emit(evaluate_consensus(self.workers, self.plan.name, step, tokens, self.exchanges.now_s, params))

    def live(self) -> list[int]:
        return [w for w in range(self.plan.n_workers) if self.exchanges.status[w] == LIVE]

    def seconds_at(self, w: int, t: float) -> float:
        """A microbatch's compute beginning at t: `ChurnExchanges.compute_seconds`' expression, straggling included."""
        return self.microbatch_flops / (self.plan.flops_per_second(w) * self.faults.speed(w, t))

    # --- one epoch -----------------------------------------------------------------------------
    def epoch(self, epoch: int, allow_late: bool, budget: int) -> bool:
        """Plan, serve and average one epoch over the peers that are there; False if no peer holds the state."""
        ex, n, clock = self.exchanges, self.plan.n_workers, self.exchanges.clock
        left = (budget - self.tokens) // self.microbatch_tokens
        self.returns(epoch)
        planned = self.admit(epoch, left, allow_late)
        if planned is None:
            return False
        planned, c = planned
        members = planned.members
        completed = [planned.completed.get(w, 0) for w in range(n)]
        late = [planned.late.get(w, False) for w in range(n)]
        stale = [self.carried[w] > 0 for w in range(n)]
        requests, compute_s = self.serve_epoch(epoch, completed, late)
        self.microbatches_done += sum(completed) + sum(late)
        for w in members:  # carried into the next epoch, and lost if the peer fails before then
            self.carried[w] = self.batch * late[w]
            self.carried_s[w] = self.seconds_at(w, c.at(w, completed[w])) if late[w] else 0.0
        samples = [int(requests[w].weight) if w in members else 0 for w in range(n)]
        replies = [EpochAverage(requests[w].tensor, self.samples_done) for w in range(n)]
        samples_before, round_ = self.samples_done, ex.round
        ex.round += 1
        for index, group in enumerate(g for g in planned.groups if self.reducible(g.members)):
            results = self.gradient_round(epoch, planned, group, index, round_, requests, samples)
            for w, result in results.items():
                replies[w] = EpochAverage(result, samples_before)
        self.samples_done += sum(samples)
        events = self.workers.call("advance", [(epoch + 1, replies[w], False) for w in range(n)])
        if isinstance(events[0][0], ExchangeRequest):
            events = self.state_round(epoch, [evs[0] for evs in events])
        for w in members:
            (done,) = events[w]
            assert isinstance(done, StepDone), f"peer {w} answered its epoch's average with {done!r}"
            if ex.status[w] == LIVE:  # not one that failed in a round: it never stepped
                self.emit(StepRecord(
                    arm=self.plan.name, worker=w, step=epoch, tokens=self.tokens,
                    loss=None if math.isnan(done.loss) else done.loss, time_s=clock.now_s[w], compute_s=compute_s[w],
                    samples=samples[w], late_samples=self.batch * late[w], staleness=1 if stale[w] else 0))
        self.epoch_start_s = max([self.epoch_start_s, *(self.synced_s[w] for w in members)])
        for w in self.live():  # a failure while its rounds ran counts from the end of its last round
            o = ex.next_outage(w)
            if o is not None and not o.by_step and o.leave < self.synced_s[w]:
                self.leave(w, self.synced_s[w], epoch, cause=o.cause)
        self.on_step()
        self.steps_completed = epoch + 1
        return True

    def admit(self, epoch: int, left: int, allow_late: bool) -> tuple[EpochPlan, Completions] | None:
        """Who takes part in the epoch, event by event in time order: a member that fails before its group's round
        begins leaves it to the others (the epoch is planned again without it, which only puts the round later);
        a download that ends before the others notice the epoch's end adds its peer (planned again with it).
        Returns the final plan and the completions it was made on; None if no peer holds the state any more."""
        ex, members = self.exchanges, self.live()
        fails = {w: self.failure_s(w, epoch) for w in members}
        while True:
            planned = self.plan_over(members, left, allow_late) if members else None
            horizon = math.inf if planned is None else planned[0].ready_s
            waiting = [w for w in range(self.plan.n_workers) if ex.status[w] != LIVE and w not in self.pending]
            # First back, first served; with no member there is no one to download from.
            if planned is not None and any([self.start_download(w, epoch, members, horizon) for w in
                                            sorted(waiting, key=lambda w: (self.back_s(w) is None,
                                                                           self.back_s(w) or 0.0, w))]):
                continue  # the sources' uplinks are booked: plan again
            events = [(fails[w], 0, w) for w in members if fails[w] < planned[0].group_of(w).round_start_s] \
                if planned is not None else []
            events += [(d.end_s, 1, w) for w, d in self.pending.items() if d.end_s <= horizon]
            if not events:
                return planned
            t, kind, w = min(events)
            if kind == 0:
                self.leave(w, t, epoch, cause=ex.next_outage(w).cause, extra_lost_s=max(0.0, t - ex.clock.now_s[w]))
                members.remove(w)
            else:
                self.join(self.pending.pop(w), epoch)
                members = sorted(members + [w])
                fails[w] = self.failure_s(w, epoch)

    def plan_over(self, members: list[int], left: int, allow_late: bool) -> tuple[EpochPlan, Completions]:
        c = Completions({w: self.exchanges.clock.now_s[w] for w in members}, self.seconds_at)
        planned = plan_epoch(c, members, carried=self.carried, target=self.target_batch_size, batch=self.batch,
                             left=left, allow_late=allow_late, notice_s=self.notice_s(), timing=self.timing,
                             n_workers=self.plan.n_workers, link_free_s=self.exchanges.link_free_s,
                             sides=lambda t: self.faults.sides(t, self.plan.n_workers))
        return planned, c

    def notice_s(self) -> float:
        return self.notice_delay_s() + 2 * self.max_pair_latency_s()

    # --- rounds --------------------------------------------------------------------------------
    def gradient_round(self, epoch: int, planned: EpochPlan, group, index: int, round_: int, requests: list,
                       samples: list[int]) -> dict:
        """One group's average of the epoch's gradients, in the background of late microbatches; returns what each
        member steps on (its own gradients where the round failed, its own values in a lost part)."""
        ex, clock, timing = self.exchanges, self.exchanges.clock, self.timing
        g = group.members
        faulted = self.arm_exchange_faults(g, round_)
        reduced = ex.reduce(g, weighted(g, [requests[w] for w in g], faulted), index, self.steps_completed)
        duration = reduced.cost.time_s
        # Peers wait for the round from when they are ready, matchmaking included (hivemind's averaging_timeout).
        failed = (group.round_start_s - planned.ready_s) + duration > timing.averaging_timeout
        t_end = planned.ready_s + timing.averaging_timeout if failed else group.round_start_s + duration
        clock.overlap(g, max(0.0, t_end - group.round_start_s))
        waits = [clock.wait_until(w, t_end) for w in g]
        for w in g:
            ex.link_free_s[w] = self.synced_s[w] = t_end
        self.emit(self.shown(reduced.record(
            self.plan.name, round_, self.steps_completed, idle_s=waits, time_s=t_end, staleness=0, failed=failed,
            samples=[samples[w] for w in g], epoch_closed_s=planned.target_s, ready_s=planned.ready_s,
            matchmaking_start_s=group.matchmaking_start_s, round_start_s=group.round_start_s), g))
        results = {w: requests[w].tensor if failed else ex._patched.get(w, reduced.result) for w in g}
        self.exchange_faults_end(faulted, t_end, epoch, round_)
        return results

    def state_round(self, epoch: int, requests: list[ExchangeRequest]) -> list[list]:
        """hivemind's state averager after the optimizer step (`CollaborativeDriver.state_round`), per side of a
        partition, among the peers still there; returns every peer's events after it."""
        ex, clock, timing, n = self.exchanges, self.exchanges.clock, self.timing, self.plan.n_workers
        assert all(isinstance(r, ExchangeRequest) and r.payload == "parameters" and r.blocking for r in requests), \
            f"peers answered the epoch's average with {requests!r}"
        live = self.live()
        replies = [r.tensor for r in requests]
        for w in live:
            clock.compute(w, ex.compute_seconds(w, requests[w].flops))
        if live:
            round_ = ex.round
            ex.round += 1
            cut = self.faults.sides(min(clock.now_s[w] for w in live), n)
            parts = [tuple(w for w in side if w in live) for side in cut] if cut else [tuple(live)]
            for index, g in enumerate(p for p in parts if p and self.reducible(p)):
                entered = [clock.now_s[w] for w in g]
                faulted = self.arm_exchange_faults(g, round_)
                reduced = ex.reduce(g, [requests[w] for w in g], index, self.steps_completed)
                t_match = min(entered)
                full = timing.target_group_size and len(g) == n
                assembled = -math.inf if full else t_match + min(timing.matchmaking_time, timing.averaging_timeout)
                t_start = max(max(entered), assembled, *(ex.link_free_s[w] for w in g))
                duration = reduced.cost.time_s
                failed = t_start + duration - t_match > timing.averaging_timeout
                if failed:
                    waits = [clock.wait_until(w, e + timing.averaging_timeout) for w, e in zip(g, entered)]
                    t_end = max(clock.now_s[w] for w in g)
                else:
                    sync = clock.synchronise(g, duration, not_before_s=t_start)
                    waits, t_end = list(sync.idle_s), sync.end_s
                for w in g:
                    ex.link_free_s[w] = self.synced_s[w] = t_end
                    replies[w] = requests[w].tensor if failed else ex._patched.get(w, reduced.result)
                self.emit(self.shown(reduced.record(self.plan.name, round_, self.steps_completed, idle_s=waits,
                                                    time_s=t_end, staleness=0, failed=failed,
                                                    matchmaking_start_s=t_match, round_start_s=t_start), g))
                self.exchange_faults_end(faulted, t_end, epoch, round_)
        return self.workers.call("advance", [(epoch + 1, replies[w], False) for w in range(n)])

    def reducible(self, group: tuple[int, ...]) -> bool:
        """Whether some member accepts connections and can reduce a part: a group of client-mode peers only (what is
        left of a swarm, or a side of a partition) has no reducer, so no round; each steps on its own."""
        return not self.plan.client_mode or not all(self.plan.client_mode[w] for w in group)

    def arm_exchange_faults(self, group: tuple[int, ...], round_: int) -> dict:
        """The members failing in this round, for `ChurnExchanges.reduce` to leave out of the parts."""
        ex = self.exchanges
        ex._faulted = {w: f for w in group if (f := self.faults.exchange_fault(w, round_))}
        ex._patched, ex._lost, ex._waited = {}, {}, {}
        return dict(ex._faulted)

    def shown(self, record: CommRecord, group: tuple[int, ...]) -> CommRecord:
        """The record with who was absent (gone, waiting for the state, or on another side) and who failed in it."""
        ex = self.exchanges
        extra = {"absent": [w for w in range(self.plan.n_workers) if w not in group] or None}
        if group in ex._lost:
            missing, fractions = ex._lost[group]
            extra |= {"missing_peers": missing, "received_fraction": fractions}
        return replace(record, **extra)


def weighted(group: tuple[int, ...], requests: list[ExchangeRequest], faulted: dict) -> list[ExchangeRequest]:
    """The gradient contributions as the reducers weigh them: by samples, unless the contributions kept (all but
    those failing before or while sending) hold none. Their mean gradients are then all zero, and so is their
    average, which samples summing to 0 do not define: they count equally instead."""
    kept = [r.weight for w, r in zip(group, requests) if w not in faulted or faulted[w].phase == "reducing"]
    return requests if sum(kept) > 0 else [replace(r, weight=1.0) for r in requests]
