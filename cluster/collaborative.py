"""The simulator's driver for hivemind-style collaborative training: peers at their own speeds.

Each epoch, on the virtual clock:
1. every peer computes microbatches back to back from where its clock stands;
2. the epoch is complete at T_target, the first microbatch completion at which the swarm's samples
   (counted at completions) reach `target_batch_size`;
3. peers learn it after a progress refresh and one DHT lookup (`progress_refresh_s` plus
   ceil(log2 N) + 1 round trips) and confirm with their group's leader (one round trip): at
   T_ready every peer has stopped accumulating and waits for the round;
4. every microbatch finished by T_ready is in this epoch; a peer that began one before T_ready is
   still computing it while it waits, and its samples go into the next epoch;
5. matchmaking: hivemind.Optimizer pre-schedules the round (begins looking for a group) in its
   `step`, which a peer calls after each microbatch, once the ETA to the epoch's end is at most
   `matchmaking_time`. The first peer to do so, at T_match, leads: its group assembles at
   T_match + min(matchmaking_time, averaging_timeout), when its declared expiration comes (the
   step's deadline caps it). The round starts at T_start = max(T_ready, that). With a
   `target_group_size` the swarm fits, the leader starts once everyone has joined: T_start = T_ready;
6. the butterfly all-reduce of the peers' mean gradients, weighted by samples, takes D from the
   network model; a peer waits at most `averaging_timeout` from T_ready, so if the matchmaking wait
   plus D exceeds it the round fails at T_ready + averaging_timeout and each peer steps on its own
   gradients (hivemind's fallback);
7. each peer steps when both the round and its own microbatch are done;
8. every `average_state_every` epochs the peers then average their parameters (hivemind's state averager,
   `state_round`): matchmaking from when the first peer enters, then a butterfly all-reduce of the parameters.

The ETA is the true close, min(T_target, T_ready): hivemind estimates it from the peers' reported
speeds at each progress refresh and has none from an epoch's start to the next refresh, so real
peers may begin matchmaking up to a refresh later. A peer with no completed microbatch joins with weight
0. Every peer joins the one group; in hivemind a peer that begins looking after the leader's window
has closed (a microbatch longer than `matchmaking_time`) would miss the round.

The driver talks to each peer's strategy through the swarm protocol of `trainer.strategies.base` (`Report`, a
non-blocking `Exchange`, `Await`, answered by type and by where the peer is in its epoch, never by call order); the
matchmaking and timeout figures are the arm's `SwarmTiming` (`plan.swarm`), the epoch's size is the strategy's.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable

import numpy as np

from cluster.checkpoint import NO_CHECKPOINTS, Checkpoints
from cluster.driver import ArmPlan, evaluate_consensus
from cluster.records import Record, StepRecord
from cluster.sim import ModelledExchanges
from cluster.swarm_timing import SwarmTiming
from trainer.replica import AwaitRequest, ExchangeRequest, ReportRequest, StepDone
from trainer.strategies.base import EpochAverage


class CollaborativeDriver:
    def __init__(self, workers, plan: ArmPlan, emit: Callable[[Record], None], on_step: Callable[[], None] = lambda: None,
                 checkpoints: Checkpoints = NO_CHECKPOINTS):
        self.workers, self.plan, self.emit, self.on_step = workers, plan, emit, on_step
        self.checkpoints = checkpoints  # every `checkpoints.every` epochs, after the epoch (and its evaluation)
        self.exchanges = ModelledExchanges(plan)
        self.timing = plan.swarm or SwarmTiming()
        self.steps_completed = 0

    def begin(self) -> tuple[int, int, int]:
        """Reads the arm's settings off worker 0 and resets the counters; returns (token budget, tokens between
        evaluations, tokens in an epoch)."""
        plan = self.plan
        info = self.workers.call("describe", workers=[0])[0]
        self.target_batch_size = info["settings"].target_batch_size
        self.microbatch_flops, self.batch = info["flops_per_batch"], info["batch_size"]
        self.microbatch_tokens = plan.tokens_per_step // plan.n_workers
        self.carried = [0] * plan.n_workers  # samples of late microbatches, per peer
        self.microbatches_done = 0
        self.samples_done = 0  # averaged into the model so far, over the swarm
        eval_tokens = plan.eval_every_steps * plan.tokens_per_step
        self.next_eval = eval_tokens
        epoch_tokens = math.ceil(self.target_batch_size / self.batch) * self.microbatch_tokens
        return plan.total_steps * plan.tokens_per_step, eval_tokens, epoch_tokens

    def run(self) -> None:
        plan = self.plan
        budget, eval_tokens, epoch_tokens = self.begin()
        epoch = self.checkpoints.restore(self)
        if epoch == 0:
            self.evaluate(0, tokens=0)
        while self.tokens < budget:
            # No late microbatch in the last epoch: nothing would ever apply its gradients.
            self.epoch(epoch, allow_late=self.tokens + epoch_tokens < budget, budget=budget)
            epoch += 1
            if self.tokens >= self.next_eval or self.tokens >= budget:
                self.evaluate(epoch, tokens=self.tokens)
                while self.next_eval <= self.tokens:
                    self.next_eval += eval_tokens
            if self.tokens < budget and self.checkpoints.due(epoch):
                self.checkpoints.save(self, epoch)

    def state_dict(self) -> dict:
        """Between epochs: the swarm's progress, late samples carried into the next epoch, and the clock."""
        return {"steps_completed": self.steps_completed, "carried": list(self.carried),
                "microbatches_done": self.microbatches_done, "samples_done": self.samples_done,
                "next_eval": self.next_eval, "exchanges": self.exchanges.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.steps_completed, self.carried = state["steps_completed"], list(state["carried"])
        self.microbatches_done, self.samples_done = state["microbatches_done"], state["samples_done"]
        self.next_eval = state["next_eval"]
        self.exchanges.load_state_dict(state["exchanges"])

    def evaluate(self, step: int, tokens: int) -> None:
        self.emit(evaluate_consensus(self.workers, self.plan.name, step, tokens, self.exchanges.now_s))

    @property
    def tokens(self) -> int:
        return self.microbatches_done * self.microbatch_tokens

    def seconds_per_microbatch(self, worker: int) -> float:
        return self.microbatch_flops / self.plan.flops_per_second(worker)

    def epoch(self, epoch: int, allow_late: bool, budget: int) -> None:
        plan, timing, n = self.plan, self.timing, self.plan.n_workers
        clock, batch = self.exchanges.clock, self.batch
        dt = [self.seconds_per_microbatch(w) for w in range(n)]
        start = list(clock.now_s)
        t_target = self.target_time(start, dt, batch)
        t_ready = t_target + self.notice_delay_s() + 2 * self.max_pair_latency_s()
        completed = [self.completions_by(start[w], dt[w], t_ready) for w in range(n)]
        left = (budget - self.tokens) // self.microbatch_tokens
        if sum(completed) >= left:
            # The token budget runs out before the peers would notice the epoch: they stop there, and
            # are ready when the last budgeted microbatch is done.
            completed, t_ready = self.first_completions(start, dt, max(left, 1))
            allow_late = False
        late = [allow_late and start[w] + completed[w] * dt[w] < t_ready for w in range(n)]
        t_match = self.matchmaking_start_s(start, dt, min(t_target, t_ready))
        t_start = max(t_ready, self.group_assembled_s(t_match))

        requests, compute_s = self.serve_epoch(epoch, completed, late)
        self.microbatches_done += sum(completed) + sum(late)

        # Matchmaking's wait and the round, in the background of any late microbatch.
        group = tuple(range(n))
        reduced = self.exchanges.reduce(group, [requests[w] for w in group])
        round_ = self.exchanges.round
        self.exchanges.round += 1
        duration = reduced.cost.time_s
        # Peers wait for the round from when they are ready, matchmaking included (hivemind's averaging_timeout).
        failed = (t_start - t_ready) + duration > timing.averaging_timeout
        t_end = t_ready + timing.averaging_timeout if failed else t_start + duration
        clock.overlap(group, max(0.0, t_end - t_start))
        waits = [clock.wait_until(w, t_end) for w in range(n)]
        samples = [int(requests[w].weight) for w in range(n)]
        replies = [EpochAverage(requests[w].tensor if failed else reduced.result, self.samples_done) for w in range(n)]
        self.samples_done += sum(samples)
        events = self.workers.call("advance", [(epoch + 1, replies[w], False) for w in range(n)])
        self.emit(reduced.record(
            plan.name, round_, self.steps_completed, idle_s=waits, time_s=t_end, staleness=0, failed=failed,
            samples=samples, epoch_closed_s=t_target, ready_s=t_ready, matchmaking_start_s=t_match,
            round_start_s=t_start))
        if isinstance(events[0][0], ExchangeRequest):
            events = self.state_round(epoch, [evs[0] for evs in events])
        for w, evs in enumerate(events):
            (done,) = evs
            assert isinstance(done, StepDone), f"peer {w} answered its epoch's average with {done!r}"
            self.emit(StepRecord(
                arm=plan.name, worker=w, step=epoch, tokens=self.tokens,
                loss=None if math.isnan(done.loss) else done.loss, time_s=clock.now_s[w], compute_s=compute_s[w],
                samples=samples[w], late_samples=batch * late[w], staleness=1 if self.carried[w] else 0))
            self.carried[w] = batch * late[w]
        self.on_step()
        self.steps_completed = epoch + 1

    def state_round(self, epoch: int, requests: list[ExchangeRequest]) -> list[list]:
        """hivemind's state averager after the optimizer step: the peers' parameters, butterfly-averaged with equal
        weights and blocking; returns each peer's events after it (its `StepDone`).

        Each peer begins matchmaking when it enters, after its optimizer step: hivemind 1.1.12 never pre-schedules
        this round (Optimizer._maybe_schedule_state_averaging waits for a delay estimate that only a pre-scheduled
        round would update), so the first peer to enter leads and gathers as for the gradients. A peer waits at
        most `averaging_timeout` from when it entered; a round that would take longer fails and every peer keeps
        its own parameters."""
        plan, timing, n, clock = self.plan, self.timing, self.plan.n_workers, self.exchanges.clock
        assert all(isinstance(r, ExchangeRequest) and r.payload == "parameters" and r.blocking for r in requests), \
            f"peers answered the epoch's average with {requests!r}"
        for w, r in enumerate(requests):
            clock.compute(w, self.exchanges.compute_seconds(w, r.flops))
        group = tuple(range(n))
        entered = [clock.now_s[w] for w in group]
        reduced = self.exchanges.reduce(group, requests)
        round_ = self.exchanges.round
        self.exchanges.round += 1
        t_match = min(entered)
        t_start = max(max(entered), self.group_assembled_s(t_match))
        duration = reduced.cost.time_s
        failed = t_start + duration - t_match > timing.averaging_timeout
        if failed:
            waits = [clock.wait_until(w, entered[w] + timing.averaging_timeout) for w in group]
            t_end = max(clock.now_s)
        else:
            sync = clock.synchronise(group, duration, not_before_s=t_start)
            waits, t_end = list(sync.idle_s), sync.end_s
        self.emit(reduced.record(plan.name, round_, self.steps_completed, idle_s=waits, time_s=t_end, staleness=0,
                                 failed=failed, matchmaking_start_s=t_match, round_start_s=t_start))
        replies = [requests[w].tensor if failed else reduced.result for w in group]
        return self.workers.call("advance", [(epoch + 1, replies[w], False) for w in group])

    def serve_epoch(self, epoch: int, completed: list[int], late: list[bool]) -> tuple[dict, list[float]]:
        """Answer every peer's messages until all of them await the round; return their contributions and compute.

        A `Report` before the peer has sent its contribution asks whether to accumulate another microbatch into
        this epoch (yes for the `completed[w]` it finishes before noticing the epoch's end); one after asks whether
        to compute while the round travels (`late[w]`, once). The contribution (a non-blocking `Exchange`) is
        answered at once; an `Await` parks the peer until the round is done.
        """
        n, clock = self.plan.n_workers, self.exchanges.clock
        remaining, late_left = list(completed), list(late)
        compute_s = [0.0] * n
        requests: dict[int, ExchangeRequest] = {}
        replies: list = [None] * n
        active = list(range(n))
        while active:
            events = self.workers.call("advance", [(epoch + 1, replies[w], False) for w in active], workers=active)
            still = []
            for w, evs in zip(active, events):
                (message,) = evs
                spent = self.exchanges.compute_seconds(w, message.flops)
                clock.compute(w, spent)
                compute_s[w] += spent
                if isinstance(message, ReportRequest):
                    if w in requests:
                        replies[w], late_left[w] = late_left[w], False
                    else:
                        replies[w] = remaining[w] > 0
                        remaining[w] -= 1
                    still.append(w)
                elif isinstance(message, ExchangeRequest):
                    assert not message.blocking, f"peer {w}: a swarm's round runs in the background of late compute"
                    requests[w], replies[w] = message, None
                    still.append(w)
                else:
                    assert isinstance(message, AwaitRequest), f"peer {w} sent {message!r} in the middle of an epoch"
                    assert w in requests, f"peer {w} awaits a round it never contributed to"
            active = still
        return requests, compute_s

    @staticmethod
    def completions_by(start: float, dt: float, t: float) -> int:
        """Microbatches finished by time t, computed with the same float expression as `target_time`."""
        k = max(0, int((t - start) / dt))
        while start + (k + 1) * dt <= t:
            k += 1
        while k > 0 and start + k * dt > t:
            k -= 1
        return k

    @classmethod
    def first_completion_from(cls, start: float, dt: float, t: float) -> float:
        """The first microbatch completion at or after time t (the first, if t comes before it)."""
        k = cls.completions_by(start, dt, t)
        if k == 0 or start + k * dt < t:
            k += 1
        return start + k * dt

    def matchmaking_start_s(self, start: list[float], dt: list[float], t_close: float) -> float:
        """When the first peer pre-schedules the round: at its first `step` (after a microbatch) with the
        epoch due within matchmaking_time (hivemind.Optimizer._maybe_schedule_gradient_averaging)."""
        due = t_close - self.timing.matchmaking_time
        return min(self.first_completion_from(start[w], dt[w], due) for w in range(len(start)))

    def group_assembled_s(self, t_match: float) -> float:
        """When the leader who began looking at t_match begins the round, if everyone is ready by then."""
        timing = self.timing
        if timing.target_group_size:
            return -math.inf  # a full group: the leader starts once every peer has joined, before they are ready
        return t_match + min(timing.matchmaking_time, timing.averaging_timeout)

    @staticmethod
    def first_completions(start: list[float], dt: list[float], count: int) -> tuple[list[int], float]:
        """The first `count` microbatch completions over all peers: how many each made, and when the last ended."""
        completions = [(start[w] + dt[w], w, 1) for w in range(len(start))]
        heapq.heapify(completions)
        made = [0] * len(start)
        t = max(start)
        for _ in range(count):
            t, w, k = heapq.heappop(completions)
            made[w] = k
            heapq.heappush(completions, (start[w] + (k + 1) * dt[w], w, k + 1))
        return made, t

    def target_time(self, start: list[float], dt: list[float], batch: int) -> float:
        """When the swarm's counted samples (carried ones included) first reach the target."""
        target = self.target_batch_size
        samples = sum(self.carried)
        if samples >= target:
            return max(start)
        completions = [(start[w] + dt[w], w, 1) for w in range(len(start))]
        heapq.heapify(completions)
        while True:
            t, w, k = heapq.heappop(completions)
            samples += batch
            if samples >= target:
                return t
            heapq.heappush(completions, (start[w] + (k + 1) * dt[w], w, k + 1))

    def notice_delay_s(self) -> float:
        """A progress refresh plus one DHT lookup: ceil(log2 N) + 1 sequential round trips."""
        n = self.plan.n_workers
        hops = math.ceil(math.log2(n)) + 1 if n > 1 else 0
        return self.timing.progress_refresh_s + hops * 2 * self.median_pair_latency_s()

    def pair_latencies(self) -> list[float]:
        net, n = self.plan.network, self.plan.n_workers
        return [net.pair_latency_s(i, j) for i in range(n) for j in range(n) if i != j] or [0.0]

    def median_pair_latency_s(self) -> float:
        return float(np.median(self.pair_latencies()))

    def max_pair_latency_s(self) -> float:
        return max(self.pair_latencies())
