"""Who is in a simulated swarm with faults (`cluster.swarm_churn`): peers leaving, coming back, downloading the state.

A peer that is back downloads the state from `state_sources` live peers of its side that stay up until the download
ends (the trace says when they fail) and accept connections (not `client_mode`), the fastest links to it first, as
soon as they hold the epoch's state and their uplinks are free: `collectives.state_download`, on its downlink and
their uplinks. The sources' uplinks carry nothing else meanwhile, so a download longer than what is left of the
epoch holds back their next round (the choke a joiner puts on the peer it downloads from; sharing the uplink would
end both at about the same time). It loads what the sources held when the download began, as hivemind's
`load_state_from_peers` streams a snapshot (`get_current_state`), and contributes from when the download ends:

- in the epoch it began, if the others have not yet noticed the epoch's end: it takes part in that epoch;
- otherwise from the start of the first epoch planned after it ends, with the state it loaded: usually one epoch
  behind, as hivemind.Optimizer lets a peer one epoch behind catch up with the parameters it loaded
  (`load_state_from_peers` sets local_epoch to the global epoch); the state averager brings them back to the
  others'. It is further behind only if its sources failed before their next round, which then did not wait for
  their uplinks; hivemind would load such a state again, the simulator keeps it.

A peer back only after the others have noticed the epoch's end asks for the next epoch's state. One with no live
peer on its side waits (the lone-restart guard in `cluster.swarm_churn`). One that the trace has fail again while it
waits, or before its download would end, gives the download up and leaves again without a `join` (its sources'
uplinks are taken to be free at once).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cluster.churn import DOWN, LIVE, RETURNED
from cluster.collectives import state_download
from cluster.records import FaultRecord
from trainer.replica_state import state_nbytes


@dataclass(frozen=True)
class Download:
    worker: int
    epoch: int  # the epoch whose state it loads
    returned_s: float
    start_s: float
    download_s: float
    sources: list[int]
    nbytes: int
    state: dict

    @property
    def end_s(self) -> float:
        return self.start_s + self.download_s


class SwarmJoins:
    """Membership for `CollaborativeChurnDriver`: its trace, leaves, returns and joins."""

    def failure_s(self, w: int, epoch: int) -> float:
        """When a live peer fails next: at the start of its epoch (by step), or at the trace's time, but not before
        its last round ended (a failure during a round counts from its end)."""
        o = self.exchanges.next_outage(w)
        if o is None:
            return math.inf
        if o.by_step:
            return self.synced_s[w] if o.leave <= epoch else math.inf
        return max(o.leave, self.synced_s[w])

    def leave(self, w: int, time_s: float, epoch: int, cause: str, extra_lost_s: float = 0.0, phase: str | None = None,
              back: float | None = None, round_: int | None = None, waited: float | None = None) -> None:
        """The peer is gone from `time_s`: its late microbatch (carried into the next epoch) and `extra_lost_s` of
        compute in this epoch are lost."""
        ex = self.exchanges
        was_live = ex.status[w] == LIVE
        lost = self.carried_s[w] + extra_lost_s
        self.microbatches_done -= self.carried[w] > 0
        self.carried[w], self.carried_s[w] = 0, 0.0
        by_step = False
        if cause != "exchange":
            ex.outage[w] = ex.next_outage(w)
            ex.outage_index[w] += 1
            back, by_step = ex.outage[w].back, ex.outage[w].by_step
        ex.down_until[w] = (back, by_step)
        ex.status[w], ex.left_s[w] = DOWN, time_s
        ex.clock.now_s[w] = time_s
        if was_live and not self.live():  # the swarm's state leaves with it: the consensus stands as it held it
            self.last_params = self.workers.call("params", workers=[w])
        self.emit(FaultRecord(arm=self.plan.name, worker=w, event="leave", time_s=time_s, step=epoch, cause=cause,
                              phase=phase, round=round_, back_s=None if by_step else back,
                              back_step=int(back) if by_step and back is not None else None, lost_s=lost,
                              timeout_s=waited))

    def exchange_faults_end(self, faulted: dict, end_s: float, epoch: int, round_: int) -> None:
        """Peers that failed in a round leave when it ends; one that cancelled stays."""
        ex = self.exchanges
        for w, fault in faulted.items():
            waited = ex._waited.get(w, 0.0)
            if fault.phase != "cancel":
                back = None if fault.down_s is None else end_s + fault.down_s
                self.leave(w, end_s, epoch, cause="exchange", phase=fault.phase, back=back, round_=round_,
                           waited=waited)
            else:
                self.emit(FaultRecord(arm=self.plan.name, worker=w, event="cancel", time_s=end_s, step=epoch,
                                      round=round_, timeout_s=waited))

    def returns(self, epoch: int) -> None:
        """Peers the trace brings back by the start of this epoch (by step: at it)."""
        for w in range(self.plan.n_workers):
            back, by_step = self.exchanges.down_until[w]
            if self.exchanges.status[w] != DOWN or back is None:
                continue
            if by_step and back <= epoch:
                self.returned(w, self.epoch_start_s, epoch)
            elif not by_step and back <= self.epoch_start_s:
                self.returned(w, back, epoch)

    def returned(self, w: int, time_s: float, epoch: int) -> None:
        ex = self.exchanges
        ex.status[w], ex.returned_s[w] = RETURNED, time_s
        ex.clock.now_s[w] = max(ex.clock.now_s[w], time_s)
        self.emit(FaultRecord(arm=self.plan.name, worker=w, event="return", time_s=time_s, step=epoch))

    def back_s(self, w: int) -> float | None:
        """When a peer without the state is (or will be, this epoch) back, if the trace says."""
        ex = self.exchanges
        if ex.status[w] == RETURNED:
            return ex.returned_s[w]
        back, by_step = ex.down_until[w]
        return back if ex.status[w] == DOWN and not by_step else None

    def crash_s(self, w: int, epoch: int, back: float) -> float:
        """When a peer that is back but has no state yet fails again, if the trace says (a time during its wait)."""
        o = self.exchanges.next_outage(w)
        if o is None:
            return math.inf
        if o.by_step:
            return back if o.leave <= epoch else math.inf
        return max(o.leave, back)

    def start_download(self, w: int, epoch: int, members: list[int], horizon: float) -> bool:
        """If peer w is back before `horizon` (when the live peers stop holding this epoch's state), begin its download
        from the members of its side with the fastest links to it that stay up until it ends, or let it fail again
        if the trace has it fail before the download would end. Whether anything changed."""
        ex = self.exchanges
        back = self.back_s(w)
        if back is None or back > horizon:
            return False
        d = self.source(w, epoch, members, horizon, back)
        crash = self.crash_s(w, epoch, back)
        if crash <= horizon and (d is None or crash < d.end_s):
            if ex.status[w] == DOWN:
                self.returned(w, back, epoch)
            self.leave(w, crash, epoch, cause=ex.next_outage(w).cause)  # it gives the download up
            return True
        if d is None:
            return False  # the lone-restart guard: no one to download from, so it waits with no state
        if ex.status[w] == DOWN:
            self.returned(w, back, epoch)
        for s in [w, *d.sources]:
            ex.link_free_s[s] = max(ex.link_free_s[s], d.end_s)
        self.pending[w] = d
        return True

    def source(self, w: int, epoch: int, members: list[int], horizon: float, back: float) -> Download | None:
        ex, net = self.exchanges, self.plan.network
        cut = self.faults.sides(max(back, self.epoch_start_s), self.plan.n_workers)
        side = next((s for s in cut if w in s), ()) if cut else range(self.plan.n_workers)
        clients = self.plan.client_mode or (False,) * self.plan.n_workers  # accept no connections: serve no state
        candidates = sorted((s for s in members if s in side and not clients[s]),
                            key=lambda s: (-net.pair_bandwidth_bps(s, w), s))
        while candidates:
            sources = candidates[: self.faults.state_sources]
            start = max(back, *(max(self.synced_s[s], ex.link_free_s[s]) for s in sources))
            if start > horizon:
                return None  # the sources are busy until the others notice the epoch's end: the next epoch, then
            state = self.workers.call("export_state", workers=[sources[0]])[0]
            nbytes = state_nbytes(state)
            seconds = state_download(net, w, sources, nbytes, rng=ex.jitter_rng).time_s
            d = Download(w, epoch, back, start, seconds, sources, nbytes, state)
            failing = [s for s in sources if self.failure_s(s, epoch) < d.end_s]
            if not failing:
                return d
            candidates = [s for s in candidates if s not in failing]
        return None

    def join(self, d: Download, epoch: int) -> None:
        """The peer has the state it downloaded and contributes from the download's end."""
        ex, clock, w = self.exchanges, self.exchanges.clock, d.worker
        self.workers.call("import_state", [(d.state,)], workers=[w])
        clock.now_s[w] = max(clock.now_s[w], d.returned_s)
        clock.idle_s[w] += d.start_s - clock.now_s[w]
        clock.comm_s[w] += d.download_s
        clock.now_s[w] = self.synced_s[w] = d.end_s
        if epoch > d.epoch:  # what it would have accumulated before this epoch began was for one already closed
            clock.wait_until(w, self.epoch_start_s)
        ex.status[w] = LIVE
        self.carried[w], self.carried_s[w] = 0, 0.0
        self.emit(FaultRecord(arm=self.plan.name, worker=w, event="join", time_s=d.end_s, step=epoch,
                              sources=d.sources, state_bytes=d.nbytes, wait_s=d.start_s - d.returned_s,
                              download_s=d.download_s))
