"""The real mode's side of the lockstep driver: each exchange a real all-reduce among the peers, timed by the wall clock.

`cluster.driver.LockstepDriver` moves the peers (`cluster.real.peer.RealPeer`, one Ray actor each) from exchange to
exchange exactly as it moves the simulator's replicas; `PeerExchanges` carries the exchanges out. Every exchange is
started on all peers at the same moment (one Ray call each, gathered together) and retried on all of them together if
any fails, or if any peer received only part of the average (a partial round is never stepped on: it would leave
that peer's replica apart from the others for good). The average stays in each peer (it answers its strategy on the
next `advance`); what comes back is how long it took and, from the shaping relays' counters (or the kernel's, for gloo), how many bytes moved.

With a fault trace (`cluster.real.lockstep_churn`) a round is among `members`, the live peers, in `groups`
(`set_groups`): one group, or during a partition each side's live peers. The groups average at the same time, each
its own all-reduce under its own group key, retried on its own, and each writes its own record (`group` 0, 1, ... in
order of its lowest worker) naming its members as `participants` and every other worker as `absent`, as the
simulator's (`cluster.churn`). A peer alone (the only live one, or alone on its side) keeps its own tensor
(`LockstepPeer.exchange_alone`): a group of one moves nothing. Groups are disjoint and the relays cut the sides
apart, so each group's relay counters hold its own bytes only.

A round with exchange faults (`exchange(..., faults={worker: phase})`, armed on those peers first; during a
partition each group plays its own members' faults): each member's
call is made on its own (a peer that dies fails only its own call, `DEAD`), and the round is not repeated if what
went wrong is what the faults did: the peers that died are those that were to, and every survivor averaged in the
full group and misses only the failed members' parts. The survivors then step on what they received (the partial
average, their own values in the lost parts) and the peer that cancelled on its own tensor (`LockstepPeer.keep_round`);
`failed` names the members that failed, for the driver. The record names every member of the group as
participants, with 0 as a failed member's fraction received and its time and bytes as its survivors saw them
(it reports nothing itself). Anything else wrong in such a round is an error: it cannot be repeated without the dead.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from cluster.driver import ArmPlan
from cluster.real.accounting import RoundBytes, attribute, counters_delta
from cluster.real.exchange_faults import DEAD, KILLING, is_actor_death
from cluster.real.options import AveragingTimeouts, RealOptions
from cluster.real.messages import ExchangeOutcome, MeasuredStep, PendingExchange
from cluster.records import CommRecord


class RealExchangeError(RuntimeError):
    pass


class PeerExchanges:
    """`cluster.driver.Exchanges` over real peers: measured compute, real all-reduces."""

    def __init__(self, peers, plan: ArmPlan, timeouts: AveragingTimeouts, options: RealOptions, dial_addresses: list):
        self.peers, self.plan, self.timeouts, self.options = peers, plan, timeouts, options
        self.dial_addresses = list(dial_addresses)  # per worker; a restarted peer's are its new actor's
        self.groups: tuple[tuple[int, ...], ...] = ()  # the all-reduces of the next rounds (`set_groups`)
        self.members: tuple[int, ...] = ()  # the peers of the next rounds: every group's
        self.set_groups([range(plan.n_workers)])
        self.round = 0
        self.now_s = 0.0  # the arm's clock: the latest any peer has reported
        self.failed: dict[int, str] = {}  # the last round's members that failed in it: worker -> phase

    def step_done(self, worker: int, event: MeasuredStep) -> tuple[float, float]:
        self.now_s = max(self.now_s, event.time_s)
        return event.time_s, event.compute_s

    def request_made(self, worker: int, request: PendingExchange) -> None:
        """The peer timed its own compute up to the exchange; nothing to charge."""

    def await_exchanges(self, requests, step: int):
        raise AssertionError("real peers reject non-blocking exchanges when they make them (RealPeer._hold)")

    def close(self) -> None:
        """Every real exchange is blocking: nothing can be in flight."""

    def set_groups(self, groups) -> None:
        """The rounds from now on: one all-reduce per group, at the same time (the sides of a partition, each its
        live peers), in order of each group's lowest worker; `members` is every peer in one of them."""
        self.groups = tuple(sorted(tuple(sorted(g)) for g in groups if g))
        self.members = tuple(sorted(w for g in self.groups for w in g))

    def exchange(self, requests: list[PendingExchange], step: int,
                 faults: dict[int, str] | None = None) -> tuple[list, list[CommRecord]]:
        first = requests[0]
        assert all((r.payload, r.numel) == (first.payload, first.numel) for r in requests), \
            f"workers asked for different exchanges: {requests}"
        assert len(requests) == len(self.members), "one request per member"
        faults = faults or {}
        assert set(faults) <= set(self.members), "a fault on a peer outside the round"
        of = dict(zip(self.members, requests))

        def run(group: tuple[int, ...]) -> tuple[CommRecord, dict[int, str]]:
            return self._group_exchange(group, [of[w] for w in group], step,
                                        {w: p for w, p in faults.items() if w in group})

        if len(self.groups) == 1:
            results = [run(self.groups[0])]
        else:  # the sides average at once, each on its own
            with ThreadPoolExecutor(max_workers=len(self.groups), thread_name_prefix="farflung-side") as pool:
                results = list(pool.map(run, self.groups))
        self.failed = {w: p for _, failed in results for w, p in failed.items()}
        records = [replace(record, group=i) for i, (record, _) in enumerate(results)]
        self.now_s = max(self.now_s, *(r.time_s for r in records))
        self.round += 1
        return [None] * len(requests), records

    def _group_exchange(self, group: tuple[int, ...], requests: list[PendingExchange], step: int,
                        faults: dict[int, str]) -> tuple[CommRecord, dict[int, str]]:
        """One group's all-reduce, retried on its own: its record, and the members that failed in it (`failed`)."""
        first, n = requests[0], len(group)
        if n == 1 and n < self.plan.n_workers:
            return self._alone(group, first, step), dict(faults)
        before = self.peers.call("relay_counters", workers=group)
        errors: list[str] = []
        failed: dict[int, str] = {}
        # Over every attempt of the round: the least of the vector each peer received, and who went missing.
        received, missing = [1.0] * n, set()
        for w, phase in faults.items():
            self.peers.call("arm_exchange_fault", [(phase,)], workers=[w])
        for attempt in range(self.options.max_attempts):
            outcomes: list = self._call_exchange(group, attempt, faults)
            for i, o in enumerate(outcomes):
                if o is not DEAD and o.received_fraction is not None:
                    received[i] = min(received[i], o.received_fraction)
                missing.update(() if o is DEAD else o.missing_workers)
            if faults and (failed := self._as_faulted(group, outcomes, faults)):
                break
            if all(o is not DEAD and o.ok for o in outcomes):
                break
            errors.append("; ".join(f"worker {w}: {'died' if o is DEAD else o.error}"
                                    for w, o in zip(group, outcomes) if o is DEAD or not o.ok))
            if any(o is DEAD for o in outcomes):
                raise RealExchangeError(
                    f"arm {self.plan.name!r}: averaging {first.payload!r} at step {step} went wrong beyond its exchange "
                    f"faults ({errors[-1]}), and a round cannot be repeated without its dead; on a loaded host raise "
                    f"the timeouts derived from the network ({self.timeouts}), or use mode = 'sim'")
        else:
            raise RealExchangeError(
                f"arm {self.plan.name!r}: averaging {first.payload!r} at step {step} among workers {list(group)} "
                f"failed {self.options.max_attempts} times (" + " | ".join(errors) + "). Check that every peer can "
                f"reach the others' announced addresses; on slow links raise max_attempts, or the timeouts derived "
                f"from the network ({self.timeouts})")
        alive = [i for i, o in enumerate(outcomes) if o is not DEAD]
        after = self.peers.call("relay_counters", workers=[group[i] for i in alive])
        # A dead peer's relay died with it: what it forwarded is counted only at the survivors' relays.
        deltas = [{} for _ in group]
        for i, a in zip(alive, after):
            deltas[i] = counters_delta(before[i], a)
        moved = attribute(deltas, [self.dial_addresses[w] for w in group])
        if failed:
            for i, w in enumerate(group):
                if w in failed:
                    received[i] = 0.0
            missing.update(failed)
            live_o = [outcomes[i] for i in alive]
            outcomes = [o if o is not DEAD else max(live_o, key=lambda x: x.end_s) for o in outcomes]
        gloo = outcomes[0].bytes_sent is not None
        if gloo:  # gloo's sockets bypass the relays; the kernel counted them
            moved = RoundBytes(tuple(o.bytes_sent for o in outcomes), tuple(o.bytes_received for o in outcomes), 0)
        end_s = max(o.end_s for o in outcomes)
        record = CommRecord(
            arm=self.plan.name, round=self.round, group=0, step=step,
            # What ran: hivemind's butterfly all-reduce (or gloo's), whatever the strategy would have liked.
            collective="gloo_allreduce" if gloo else "butterfly", requested_collective=first.collective,
            payload=first.payload, participants=list(group),
            # gloo sends the float32 tensor and its weight, whatever the codec (the file must say codec = "none").
            message_bytes=4 * (first.numel + 1) if gloo else max(r.nbytes for r in requests),
            raw_bytes=max(r.raw_nbytes for r in requests),
            bytes_sent=list(moved.bytes_sent), bytes_received=list(moved.bytes_received),
            bytes_unattributed=moved.unattributed,
            comm_s=max(o.comm_s for o in outcomes), comm_s_per_worker=[o.comm_s for o in outcomes],
            blocking=True, idle_s=[o.idle_s for o in outcomes], time_s=end_s, staleness=0,
            attempts=len(errors) + 1, measured=True,
            received_fraction=None if gloo else received, missing_peers=None if gloo else sorted(missing),
            absent=self._absent(group),
        )
        return record, failed

    def _call_exchange(self, group: tuple[int, ...], attempt: int, faults: dict[int, str]) -> list:
        """Every member's `exchange` at once: one call for all, or with killing faults one call each, so that a peer
        that dies (`DEAD`) fails only its own."""
        timeout_s = self.timeouts.call_timeout_s
        if not any(phase in KILLING for phase in faults.values()):
            return self.peers.call("exchange", [(attempt,)] * len(group), workers=group, timeout_s=timeout_s)

        def one(w: int):
            try:
                return self.peers.call("exchange", [(attempt,)], workers=[w], timeout_s=timeout_s)[0]
            except Exception as error:
                if faults.get(w) in KILLING and is_actor_death(error):
                    return DEAD
                raise

        with ThreadPoolExecutor(max_workers=len(group), thread_name_prefix="farflung-exchange") as pool:
            return list(pool.map(one, group))

    def _as_faulted(self, group: tuple[int, ...], outcomes: list, faults: dict[int, str]) -> dict[int, str]:
        """The members that failed, if the round went as its faults say (module docstring): the survivors then step
        on it. Empty if it did not."""
        failed = {w: p for w, p in faults.items()
                  if (p in KILLING and outcomes[group.index(w)] is DEAD)
                  or (p == "cancel" and not outcomes[group.index(w)].ok)}
        for w, o in zip(group, outcomes):
            if o is DEAD:
                if w not in failed:
                    return {}
                continue
            if w in failed:  # the peer that cancelled
                continue
            if not o.ok and (o.received_fraction is None or o.group_size != len(group)
                             or not set(o.missing_workers) <= set(failed)):
                return {}
        if not failed:
            return {}
        keep = [w for w, o in zip(group, outcomes) if o is not DEAD and (w in failed or not o.ok)]
        if keep:
            self.peers.call("keep_round", workers=keep)
        return failed

    def _absent(self, group: tuple[int, ...]) -> list[int] | None:
        """The workers the round wanted that are not in this group: gone, or on another side of a partition."""
        return [w for w in range(self.plan.n_workers) if w not in group] or None

    def _alone(self, group: tuple[int, ...], request: PendingExchange, step: int) -> CommRecord:
        """A lone peer's round (the only live one, or alone on its side): nothing runs, so its fault is the
        driver's to play."""
        (w,) = group
        o = self.peers.call("exchange_alone", workers=[w], timeout_s=self.timeouts.call_timeout_s)[0]
        return CommRecord(
            arm=self.plan.name, round=self.round, group=0, step=step, collective="butterfly",
            requested_collective=request.collective, payload=request.payload, participants=[w],
            message_bytes=request.nbytes, raw_bytes=request.raw_nbytes, bytes_sent=[0], bytes_received=[0],
            bytes_unattributed=0, comm_s=0.0, comm_s_per_worker=[0.0], blocking=True, idle_s=[o.idle_s],
            time_s=o.end_s, staleness=0, attempts=1, measured=True, received_fraction=[1.0], missing_peers=[],
            absent=self._absent(group))
