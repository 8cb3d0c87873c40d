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
7. each peer steps when both the round and its own microbatch are done.

The ETA is the true close, min(T_target, T_ready): hivemind estimates it from the peers' reported
speeds at each progress refresh and has none from an epoch's start to the next refresh, so real
peers may begin matchmaking up to a refresh later. A peer with no completed microbatch joins with weight
0. Every peer joins the one group; in hivemind a peer that begins looking after the leader's window
has closed (a microbatch longer than `matchmaking_time`) would miss the round.
"""

from __future__ import annotations

import heapq
import math

import numpy as np

from cluster.sim import ArmSimulation
from trainer.replica import AwaitRequest, ExchangeRequest, ReportRequest, StepDone


class CollaborativeSimulation(ArmSimulation):
    def run(self) -> None:
        plan = self.plan
        info = self.runtime.call("describe", workers=[0])[0]
        self.settings, self.microbatch_flops, self.batch = info["settings"], info["flops_per_batch"], info["batch_size"]
        self.microbatch_tokens = plan.tokens_per_step // plan.n_workers
        self.carried = [0] * plan.n_workers  # samples of late microbatches, per peer
        self.microbatches_done = 0
        self.samples_done = 0  # averaged into the model so far, over the swarm
        budget = plan.total_steps * plan.tokens_per_step
        eval_tokens = plan.eval_every_steps * plan.tokens_per_step
        next_eval = eval_tokens
        epoch_tokens = math.ceil(self.settings.target_batch_size / self.batch) * self.microbatch_tokens
        self.evaluate(0, tokens=0)
        epoch = 0
        while self.tokens < budget:
            # No late microbatch in the last epoch: nothing would ever apply its gradients.
            self.epoch(epoch, allow_late=self.tokens + epoch_tokens < budget, budget=budget)
            epoch += 1
            if self.tokens >= next_eval or self.tokens >= budget:
                self.evaluate(epoch, tokens=self.tokens)
                while next_eval <= self.tokens:
                    next_eval += eval_tokens

    @property
    def tokens(self) -> int:
        return self.microbatches_done * self.microbatch_tokens

    def seconds_per_microbatch(self, worker: int) -> float:
        return self.microbatch_flops / self.plan.flops_per_second(worker)

    def epoch(self, epoch: int, allow_late: bool, budget: int) -> None:
        plan, settings, n = self.plan, self.settings, self.plan.n_workers
        batch = self.batch
        dt = [self.seconds_per_microbatch(w) for w in range(n)]
        start = list(self.clock.now_s)
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

        # Phase 1: microbatches until the peers are ready; every peer answers Report after each one.
        remaining = list(completed)
        compute_s = [0.0] * n
        replies: list = [None] * n
        pending = list(range(n))
        requests: dict[int, ExchangeRequest] = {}
        while pending:
            events = self.runtime.call("advance", [(epoch + 1, replies[w], False) for w in pending], workers=pending)
            still = []
            for w, evs in zip(pending, events):
                (request,) = evs
                spent = request.flops / plan.flops_per_second(w)
                self.clock.compute(w, spent)
                compute_s[w] += spent
                if isinstance(request, ReportRequest):
                    replies[w] = remaining[w] > 0
                    remaining[w] -= 1
                    still.append(w)
                else:
                    assert isinstance(request, ExchangeRequest), request
                    requests[w] = request
            pending = still
        self.microbatches_done += sum(completed)

        # Phase 2: matchmaking's wait and the round, in the background of any late microbatch.
        group = tuple(range(n))
        result, record = self.reduce(group, [requests[w] for w in group])
        self.round += 1
        duration = record["comm_s"]
        # Peers wait for the round from when they are ready, matchmaking included (hivemind's averaging_timeout).
        failed = (t_start - t_ready) + duration > settings.averaging_timeout
        t_end = t_ready + settings.averaging_timeout if failed else t_start + duration
        self.clock.overlap(group, max(0.0, t_end - t_start))
        events = self.runtime.call("advance", [(epoch + 1, None, False)] * n)  # ack the non-blocking exchange
        assert all(isinstance(e[0], ReportRequest) for e in events)
        events = self.runtime.call("advance", [(epoch + 1, late[w], False) for w in range(n)])
        for w, evs in enumerate(events):
            (request,) = evs
            assert isinstance(request, AwaitRequest), request
            spent = request.flops / plan.flops_per_second(w)
            self.clock.compute(w, spent)
            compute_s[w] += spent
        self.microbatches_done += sum(late)
        waits = [self.clock.wait_until(w, t_end) for w in range(n)]
        own = [requests[w].tensor for w in range(n)]
        # The swarm's samples before this epoch ride along with the average (see the strategy).
        replies = [np.append(own[w] if failed else result, np.float32(self.samples_done)) for w in range(n)]
        self.samples_done += sum(int(r.weight) for r in requests.values())
        events = self.runtime.call("advance", [(epoch + 1, replies[w], False) for w in range(n)])
        self.emit(
            {
                **record, "idle_s": waits, "time_s": t_end, "staleness": 0, "failed": failed,
                "samples": [int(requests[w].weight) for w in range(n)], "epoch_closed_s": t_target,
                "ready_s": t_ready, "matchmaking_start_s": t_match, "round_start_s": t_start,
            }
        )
        for w, evs in enumerate(events):
            (done,) = evs
            assert isinstance(done, StepDone), done
            self.emit(
                {
                    "kind": "step", "arm": plan.name, "worker": w, "step": epoch, "tokens": self.tokens,
                    "loss": None if math.isnan(done.loss) else done.loss, "time_s": self.clock.now_s[w],
                    "compute_s": compute_s[w], "samples": int(requests[w].weight), "late_samples": batch * late[w],
                    "staleness": 1 if self.carried[w] else 0,
                }
            )
            self.carried[w] = batch * late[w]
        self.on_step()
        self.steps_completed = epoch + 1

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
        due = t_close - self.settings.matchmaking_time
        return min(self.first_completion_from(start[w], dt[w], due) for w in range(len(start)))

    def group_assembled_s(self, t_match: float) -> float:
        """When the leader who began looking at t_match begins the round, if everyone is ready by then."""
        settings = self.settings
        if settings.target_group_size:
            return -math.inf  # a full group: the leader starts once every peer has joined, before they are ready
        return t_match + min(settings.matchmaking_time, settings.averaging_timeout)

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
        target = self.settings.target_batch_size
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
        return self.settings.progress_refresh_s + hops * 2 * self.median_pair_latency_s()

    def pair_latencies(self) -> list[float]:
        net, n = self.plan.network, self.plan.n_workers
        return [net.pair_latency_s(i, j) for i in range(n) for j in range(n) if i != j] or [0.0]

    def median_pair_latency_s(self) -> float:
        return float(np.median(self.pair_latencies()))

    def max_pair_latency_s(self) -> float:
        return max(self.pair_latencies())
