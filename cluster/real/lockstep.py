"""The real mode's side of the lockstep driver: each exchange a real all-reduce among the peers, timed by the wall clock.

`cluster.driver.LockstepDriver` moves the peers (`cluster.real.peer.RealPeer`, one Ray actor each) from exchange to
exchange exactly as it moves the simulator's replicas; `PeerExchanges` carries the exchanges out. Every exchange is
started on all peers at the same moment (one Ray call each, gathered together) and retried on all of them together if
any fails, or if any peer received only part of the average (a partial round is never stepped on: it would leave
that peer's replica apart from the others for good). The average stays in each peer (it answers its strategy on the
next `advance`); what comes back is how long it took and, from the shaping relays' counters (or the kernel's, for gloo), how many bytes moved.

With a fault trace (`cluster.real.lockstep_churn`) a round is among `members`, the live peers, in worker order; the
records name them as `participants` and the others as `absent`, as the simulator's (`cluster.churn`). A peer alone
keeps its own tensor (`LockstepPeer.exchange_alone`): a group of one moves nothing.
"""

from __future__ import annotations

from cluster.driver import ArmPlan
from cluster.real.accounting import RoundBytes, attribute, counters_delta
from cluster.real.options import AveragingTimeouts, RealOptions
from cluster.real.peer import ExchangeOutcome, MeasuredStep, PendingExchange
from cluster.records import CommRecord


class RealExchangeError(RuntimeError):
    pass


class PeerExchanges:
    """`cluster.driver.Exchanges` over real peers: measured compute, real all-reduces."""

    def __init__(self, peers, plan: ArmPlan, timeouts: AveragingTimeouts, options: RealOptions, dial_addresses: list):
        self.peers, self.plan, self.timeouts, self.options = peers, plan, timeouts, options
        self.dial_addresses = list(dial_addresses)  # per worker; a restarted peer's are its new actor's
        self.members: tuple[int, ...] = tuple(range(plan.n_workers))  # the peers of the next rounds
        self.round = 0
        self.now_s = 0.0  # the arm's clock: the latest any peer has reported

    def step_done(self, worker: int, event: MeasuredStep) -> tuple[float, float]:
        self.now_s = max(self.now_s, event.time_s)
        return event.time_s, event.compute_s

    def request_made(self, worker: int, request: PendingExchange) -> None:
        """The peer timed its own compute up to the exchange; nothing to charge."""

    def await_exchanges(self, requests, step: int):
        raise AssertionError("real peers reject non-blocking exchanges when they make them (RealPeer._hold)")

    def close(self) -> None:
        """Every real exchange is blocking: nothing can be in flight."""

    def exchange(self, requests: list[PendingExchange], step: int) -> tuple[list, list[CommRecord]]:
        first = requests[0]
        assert all((r.payload, r.numel) == (first.payload, first.numel) for r in requests), \
            f"workers asked for different exchanges: {requests}"
        members = self.members
        n = len(members)
        assert len(requests) == n, "one request per member"
        if n == 1 and n < self.plan.n_workers:
            return self._alone(first, step)
        before = self.peers.call("relay_counters", workers=members)
        errors: list[str] = []
        # Over every attempt of the round: the least of the vector each peer received, and who went missing.
        received, missing = [1.0] * n, set()
        for attempt in range(self.options.max_attempts):
            outcomes: list[ExchangeOutcome] = self.peers.call(
                "exchange", [(attempt,)] * n, workers=members, timeout_s=self.timeouts.call_timeout_s)
            for i, o in enumerate(outcomes):
                if o.received_fraction is not None:
                    received[i] = min(received[i], o.received_fraction)
                missing.update(o.missing_workers)
            if all(o.ok for o in outcomes):
                break
            errors.append("; ".join(f"worker {w}: {o.error}" for w, o in zip(members, outcomes) if not o.ok))
        else:
            raise RealExchangeError(
                f"arm {self.plan.name!r}: averaging {first.payload!r} at step {step} failed "
                f"{self.options.max_attempts} times (" + " | ".join(errors) + "). Check that every peer can reach the "
                f"others' announced addresses; on slow links raise max_attempts, or the timeouts derived from the "
                f"network ({self.timeouts})")
        after = self.peers.call("relay_counters", workers=members)
        moved = attribute([counters_delta(b, a) for b, a in zip(before, after)],
                          [self.dial_addresses[w] for w in members])
        gloo = outcomes[0].bytes_sent is not None
        if gloo:  # gloo's sockets bypass the relays; the kernel counted them
            moved = RoundBytes(tuple(o.bytes_sent for o in outcomes), tuple(o.bytes_received for o in outcomes), 0)
        end_s = max(o.end_s for o in outcomes)
        self.now_s = max(self.now_s, end_s)
        record = CommRecord(
            arm=self.plan.name, round=self.round, group=0, step=step,
            # What ran: hivemind's butterfly all-reduce (or gloo's), whatever the strategy would have liked.
            collective="gloo_allreduce" if gloo else "butterfly", requested_collective=first.collective,
            payload=first.payload, participants=list(members),
            # gloo sends the float32 tensor and its weight, whatever the codec (the file must say codec = "none").
            message_bytes=4 * (first.numel + 1) if gloo else max(r.nbytes for r in requests),
            raw_bytes=max(r.raw_nbytes for r in requests),
            bytes_sent=list(moved.bytes_sent), bytes_received=list(moved.bytes_received),
            bytes_unattributed=moved.unattributed,
            comm_s=max(o.comm_s for o in outcomes), comm_s_per_worker=[o.comm_s for o in outcomes],
            blocking=True, idle_s=[o.idle_s for o in outcomes], time_s=end_s, staleness=0,
            attempts=len(errors) + 1, measured=True,
            received_fraction=None if gloo else received, missing_peers=None if gloo else sorted(missing),
            absent=self._absent(),
        )
        self.round += 1
        return [None] * n, [record]

    def _absent(self) -> list[int] | None:
        return [w for w in range(self.plan.n_workers) if w not in self.members] or None

    def _alone(self, request: PendingExchange, step: int) -> tuple[list, list[CommRecord]]:
        (w,) = self.members
        o = self.peers.call("exchange_alone", workers=[w], timeout_s=self.timeouts.call_timeout_s)[0]
        self.now_s = max(self.now_s, o.end_s)
        record = CommRecord(
            arm=self.plan.name, round=self.round, group=0, step=step, collective="butterfly",
            requested_collective=request.collective, payload=request.payload, participants=[w],
            message_bytes=request.nbytes, raw_bytes=request.raw_nbytes, bytes_sent=[0], bytes_received=[0],
            bytes_unattributed=0, comm_s=0.0, comm_s_per_worker=[0.0], blocking=True, idle_s=[o.idle_s],
            time_s=o.end_s, staleness=0, attempts=1, measured=True, received_fraction=[1.0], missing_peers=[],
            absent=self._absent())
        self.round += 1
        return [None], [record]
