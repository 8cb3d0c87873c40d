"""The driver of a swarm arm (collaborative, local-updates): peers that train on their own, polled by the driver.

`cluster.real.swarm.SwarmPeer` is one peer (a Ray actor running hivemind.Optimizer in a thread); `SwarmArm` starts
them, polls their progress (and collects the epochs each closed), takes a parameter snapshot of a peer holding the
state at the evaluation points, reads the relays' byte counters whenever every such peer has closed an epoch, stops
the swarm at the end of the epoch under way once the token budget is spent, and emits the simulator's record kinds
(see results/README.md). With a fault trace it kills and restarts peers as `cluster.real.swarm_churn` says; a restart
runs on a thread of its own while the driver goes on polling, and the peer is live (polled, stopped, killed) only
once it is up; a peer restarted with fresh weights is neither snapshotted nor evaluated until it has loaded the
state, and an arm whose every peer holding the state has failed ends there. A peer that dies in an exchange fault
(`cluster.real.exchange_faults`) is found dead at the driver's next call and buried at its next poll. A partition
(`faults.partition`) is cut and healed in the live peers' relays at the polls that reach its times
(`cluster.real.partition`); its epochs' comm records are then one per group that averaged together.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cluster.real.accounting import RoundBytes, attribute, counters_delta
from cluster.real.exchange_faults import DEAD, WatchedPeers, check_swarm_exchange, peer_faults
from cluster.real.options import RealOptions
from cluster.real.partition import RelayCuts, epoch_groups, lifted
from cluster.real.messages import EpochRecord
from cluster.real.swarm_setup import SwarmSetup
from cluster.driver import ArmPlan, consensus
from cluster.records import CommRecord, EvalRecord, Record, StepRecord
from trainer.replica import ReplicaSpec


@dataclass(frozen=True)
class StateLoadCheck:
    """A restarted peer's state load, for checking: the digest of its parameters once the state was applied, and the
    digests of the parameters its donor served lately (`cluster.real.swarm_state.parameters_digest`)."""

    worker: int
    donor: int  # -1: a peer outside the arm
    epoch: int
    loaded_digest: str
    served_digests: tuple[str, ...]

    @property
    def exact(self) -> bool:
        """The peer's parameters after loading are bit for bit what its donor served."""
        return self.loaded_digest in self.served_digests


class SwarmArm:
    """Drives a swarm arm (`cluster.real.swarm`): the peers train on their own; this polls, snapshots and stops them,
    and, with a fault trace (`churn`, `cluster.real.swarm_churn`), kills and restarts them as it says."""

    POLL_S = 0.2

    def __init__(self, peers, plan: ArmPlan, spec: ReplicaSpec, setup: SwarmSetup, options: RealOptions,
                 dial_addresses: list, emit: Callable[[Record], None], on_step: Callable[[], None] = lambda: None,
                 should_stop: Callable[[], bool] = lambda: False, churn=None):
        self.peers, self.plan, self.spec, self.setup, self.options = peers, plan, spec, setup, options
        self.dial_addresses, self.emit, self.on_step, self.should_stop = list(dial_addresses), emit, on_step, should_stop
        self.churn = churn
        self.last_params: list[np.ndarray] = []
        n = plan.n_workers
        self.live = list(range(n))  # workers whose peer is up (holding the state or waiting for it)
        self.records: dict[int, list[EpochRecord]] = {w: [] for w in range(n)}
        self.former: dict = {}  # dial address of a worker's earlier peer -> worker
        self.worker_of: dict[str, int] = {}  # base58 peer id (any incarnation) -> worker
        self.state_lost_s: float | None = None
        self.state_loads: list[StateLoadCheck] = []
        self.banked = [0] * n  # samples of peers that have failed since
        self.counters: dict[int, dict] = {}  # each live peer's relay counters at the last reading
        self.started = 0.0  # time.monotonic() when training started: the arm's clock
        self.stopping = False  # the arm has told its peers to stop (or lost the state)
        self.restarting: dict = {}  # worker -> the future of its restart under way (`SwarmChurn.restart`)
        self.late: set[int] = set()  # restarted peers that came up after the arm decided to stop
        self.last_seen: dict[int, dict] = {}  # each live peer's last progress: what a peer found dead had done
        self.peer_faults = []
        if churn is not None:
            check_swarm_exchange(churn.trace.faults, setup.delay_state_averaging)
            self.peer_faults = peer_faults(churn.trace.faults, n, setup)
            churn.arm(self.peer_faults)
            self.peers = WatchedPeers(peers, churn.may_die)
        partitioned = churn is not None and churn.trace.faults.partition
        self.cuts = RelayCuts(churn.trace.faults, n) if partitioned else None

    def run(self) -> None:
        plan, n = self.plan, self.plan.n_workers
        params0 = self.peers.call("params", workers=[0])[0]
        self.numel = params0.size
        evals = [(0, 0, 0.0, params0)]  # (epoch, tokens, time_s, parameters) to evaluate once training is over
        seen = self.peers.call("sync_progress", [(n, self.options.startup_timeout_s)] * n)
        if min(seen) < n:
            raise TimeoutError(f"arm {plan.name!r}: after {self.options.startup_timeout_s:.0f} s the peers' progress "
                               f"trackers see {seen} of {n} peers in the DHT; check that the peers can reach each other")
        self.worker_of = {d["peer_id"]: d["worker"] for d in self.peers.call("describe")}
        self.counters = dict(enumerate(self.peers.call("relay_counters")))
        self.started = time.monotonic()
        self.peers.call("start_clock")
        if any(self.peer_faults):
            self.peers.call("set_faults", [(f,) for f in self.peer_faults])
        self.peers.call("start_training", [(self.options.swarm_timeout_s,)] * n)
        try:
            bytes_by_epoch = self._train(evals)
            self.stopping = True  # every live peer has stopped: the peers still restarting stop once up
            self._take_restarts(wait=True)
        except BaseException as error:
            self._abandon_restarts(error)
            raise
        finally:
            if self.churn is not None:
                self.churn.close()  # no actor is started after this: the teardown would leave it behind
        self.peers.call("finish_training", workers=self.live)  # re-raises what ended a peer's training
        self._bury()
        last = max((r.epoch for rs in self.records.values() for r in rs), default=0)
        bytes_by_epoch[last] = _add_bytes(bytes_by_epoch.get(last), self._bytes_since())
        self.emit_epochs(self.records, bytes_by_epoch)
        self._evaluate_all(evals, last)

    def _train(self, evals: list) -> dict[int, RoundBytes]:
        """Poll the peers until every live one has stopped: epochs, snapshots into `evals`, the stop, the fault
        trace. Returns the relays' bytes by the epoch they fall to."""
        plan, seq = self.plan, self.spec.model.block_size
        budget = plan.total_steps * plan.tokens_per_step
        eval_tokens = plan.eval_every_steps * plan.tokens_per_step
        bytes_by_epoch: dict[int, RoundBytes] = {}
        closed, next_eval, epochs_seen, tokens = 0, eval_tokens, 0, 0
        deadline = self.started + self.options.swarm_timeout_s + 60.0
        while True:
            if time.monotonic() > deadline:
                self.peers.call("stop", workers=self.live)
                raise TimeoutError(f"arm {plan.name!r}: the swarm did not train its budget within "
                                   f"{self.options.swarm_timeout_s:.0f} s (swarm_timeout_s); it trained {tokens} of "
                                   f"{budget} tokens")
            time.sleep(self.POLL_S)
            self._take_restarts()
            self._play_cuts()
            progress = self._poll()
            holding = [w for w in self.live if progress[w]["holds_state"]]
            if not holding:  # every peer that held the state has failed
                self._lose_state()
                self.stopping = True
            if all(p["done"] for p in progress.values()):
                return bytes_by_epoch
            if not holding:
                continue
            tokens = (sum(self.banked) + sum(p["samples"] for p in progress.values())) * seq
            epochs = [progress[w]["epoch"] for w in holding]
            for _ in range(max(0, max(epochs) - epochs_seen)):
                self.on_step()
            epochs_seen = max(epochs_seen, max(epochs))
            if min(epochs) > closed:  # every peer holding the state has closed epoch min - 1: its bytes are in
                bytes_by_epoch[min(epochs) - 1] = self._bytes_since()
                closed = min(epochs)
            if not self.stopping and next_eval <= tokens < budget:
                snapshot = self.peers.call("snapshot", workers=[holding[0]])[0]
                if snapshot is not DEAD:  # else at the next poll, from a peer still there
                    epoch, time_s, params = snapshot
                    evals.append((epoch, tokens, time_s, params))
                    while next_eval <= tokens:
                        next_eval += eval_tokens
            if not self.stopping and (tokens >= budget or self.should_stop()):
                # Every peer finishes the epoch the leaders are in and closes it together: they end on one model.
                self.peers.call("stop_after", [(max(epochs),)] * len(self.live), workers=self.live)
                self.stopping = True
            if not self.stopping and self.churn is not None:
                self._play_trace(progress, tokens, max(epochs))

    def _play_trace(self, progress: dict, tokens: int, epoch: int) -> None:
        """Kill the peers the fault trace takes down now, and start restarting those it brings back."""
        now_s = time.monotonic() - self.started
        for w in self.churn.leaving(self.live, now_s, tokens):  # a worker still restarting is not live: it waits
            self.banked[w] += progress[w]["samples"]
            self.churn.kill(w, now_s, epoch, progress[w]["open_compute_s"])
            self.last_seen.pop(w, None)
            self.live.remove(w)
            self.counters.pop(w)
            if self.cuts is not None:
                self.cuts.forget(w)
        for w in self.churn.returning(now_s, tokens):
            self._restart(w, now_s, epoch)

    def _evaluate_all(self, evals: list, last: int) -> None:
        """The snapshots taken during training, then the consensus of the peers holding the state at the end."""
        if not self.live:
            return  # no peer is left to evaluate on
        evaluator = self.live[0]
        for epoch, at_tokens, time_s, params in evals:
            # One peer's snapshot alone: the others' parameters at that moment were not taken.
            self.emit(self._evaluate(evaluator, epoch, at_tokens, time_s, [params]))
        holders = [w for w, p in self._poll().items() if p["holds_state"] and w not in self.late]
        if holders:  # with no peer holding the state, the last evaluation stands
            end_s = max((r.time_s for rs in self.records.values() for r in rs), default=0.0)
            tokens = sum(r.samples for rs in self.records.values() for r in rs) * self.spec.model.block_size
            params = self.last_params = self.peers.call("params", workers=holders)
            self.emit(self._evaluate(evaluator, last + 1, tokens, end_s, params))

    def _poll(self) -> dict[int, dict]:
        """Every live peer's progress; the epochs they closed and the state loads since the last poll are kept."""
        answers = self.peers.call("progress", workers=self.live)
        progress = {w: p for w, p in zip(self.live, answers) if p is not DEAD}
        self.last_seen.update(progress)
        for w, p in progress.items():
            self.records[w] += p["records"]
            for r in p["records"]:
                for round_ in r.cancelled_rounds:
                    self.churn.cancelled(w, round_, r.epoch, r.time_s)
            if p["loaded"] is not None and self.churn is not None:
                load = p["loaded"]["load"]
                donor = self.worker_of.get(load.donor, -1)
                self.churn.joined(w, p["loaded"], donor)
                served = self.peers.call("served_digests", workers=[donor])[0] if donor in self.live else []
                served = [] if served is DEAD else served
                self.state_loads.append(StateLoadCheck(w, donor, load.epoch, load.digest, tuple(served)))
        self._bury()
        return {w: p for w, p in progress.items() if w in self.live}

    def _bury(self) -> None:
        """The peers found dead since (each died in an exchange fault): out of `live`, their samples banked."""
        if self.churn is None:
            return
        now_s = time.monotonic() - self.started
        for w in self.peers.take_dead():
            seen = self.last_seen.pop(w, {"samples": 0, "open_compute_s": 0.0})
            self.banked[w] += seen["samples"]
            self.churn.died(w, now_s, seen["open_compute_s"])
            self.live.remove(w)
            self.counters.pop(w, None)
            if self.cuts is not None:
                self.cuts.forget(w)

    def _play_cuts(self) -> None:
        """Tell the live peers' relays the partition in force now (cut, changed or healed), once per change."""
        if self.cuts is None:
            return
        now_s = time.monotonic() - self.started
        before = dict(self.cuts.applied)
        changes = self.cuts.due(now_s, self.live, self.dial_addresses, self.former)
        if not changes:
            return
        self.peers.call("set_cut", [(sorted(c),) for c in changes.values()], workers=list(changes))
        # Every relay is told first, so that the pings below find the way open at both ends.
        freed = {w: [v for v in vs if v in self.live] for w, vs in lifted(before, changes, self.dial_addresses).items()}
        freed = {w: vs for w, vs in freed.items() if vs}
        if freed:
            described = dict(zip(self.live, self.peers.call("describe", workers=self.live)))
            self.peers.call("remeet", [([described[v]["maddrs"] for v in vs if described[v] is not DEAD],)
                                       for vs in freed.values()], workers=list(freed))

    def _bytes_since(self) -> RoundBytes:
        """Bytes the live peers' relays forwarded since the last reading, credited to their workers. A failed peer's
        relay died with it: what it forwarded since the last reading is not counted."""
        after = {w: c for w, c in zip(self.live, self.peers.call("relay_counters", workers=self.live)) if c is not DEAD}
        deltas = [counters_delta(self.counters.get(w, {}), after[w]) if w in after else {}
                  for w in range(self.plan.n_workers)]
        self.counters = after
        return attribute(deltas, self.dial_addresses, self.former)

    def _restart(self, worker: int, now_s: float, epoch: int) -> None:
        """Start bringing the worker back; it joins `live` once its peer is up (`_take_restarts`)."""
        side = self.live if self.cuts is None else [w for w in self.live if w in self.cuts.side_of(worker, now_s)]
        initial_peers = [m for d in self.peers.call("describe", workers=side) if d is not DEAD for m in d["maddrs"]]
        self.restarting[worker] = self.churn.restart(worker, now_s, epoch, initial_peers,
                                                     lambda: time.monotonic() - self.started)

    def _take_restarts(self, wait: bool = False) -> None:
        """The restarted peers that are up (with `wait`, all of them once they are) join `live`; a restart's failure
        is raised here. One that comes up after the arm decided to stop is stopped at once, and ends with the
        others without taking part in the final evaluation."""
        for worker, start in sorted(self.restarting.items()):
            if not (wait or start.done()):
                continue
            del self.restarting[worker]
            described = start.result()
            self.former[tuple(self.dial_addresses[worker])] = worker
            self.dial_addresses[worker] = tuple(described["dial_address"])
            self.worker_of[described["peer_id"]] = worker
            self.live = sorted([*self.live, worker])
            self.counters[worker] = {}  # a new relay counts from zero
            if self.stopping:
                self.late.add(worker)
                self.peers.call("stop", workers=[worker])

    def _abandon_restarts(self, error: BaseException) -> None:
        """The arm failed or was interrupted: wait for the restarts under way (each bounded by its calls' timeouts)
        so that none starts an actor after the teardown, which stops the peers they started. A restart's own
        failure is noted on `error`, which is what the caller sees."""
        for worker, start in sorted(self.restarting.items()):
            try:
                start.result()
            except Exception as e:
                error.add_note(f"arm {self.plan.name!r}: restarting worker {worker} failed too: {e!r}")
        self.restarting.clear()

    def _lose_state(self) -> None:
        """No live peer holds the swarm's state: every peer that did has failed. A restarted peer does not start the
        swarm again from its fresh weights (the lone-restart guard), so the arm ends here."""
        if self.state_lost_s is None:
            self.state_lost_s = now_s = time.monotonic() - self.started
            print(f"arm {self.plan.name!r}: at {now_s:.1f} s every peer holding the swarm's state had failed; the "
                  "restarted peers have nothing to load, so the arm ends (its last evaluation stands)",
                  file=sys.stderr, flush=True)
        self.peers.call("stop", workers=self.live)

    def _evaluate(self, on_worker: int, epoch: int, tokens: int, time_s: float, params: list) -> EvalRecord:
        model, spread = consensus(params)
        loss = self.peers.call("evaluate", [(model,)], workers=[on_worker])[0]
        return EvalRecord(arm=self.plan.name, step=epoch, tokens=tokens, time_s=time_s, loss=loss, param_spread=spread)

    def emit_epochs(self, per_worker: dict[int, list[EpochRecord]], bytes_by_epoch: dict) -> None:
        """One comm record per epoch and one step record per peer that closed it, in epoch order. With a fault trace
        an epoch's participants are the workers that closed it, and the others are `absent`; with a partition, one comm
        record per group of the epoch (`group` 0, 1, ...), the relays' unattributed bytes on group 0's."""
        plan, n, seq = self.plan, self.plan.n_workers, self.spec.model.block_size
        by_epoch: dict[int, list[EpochRecord]] = {}
        for records in per_worker.values():
            for r in records:
                by_epoch.setdefault(r.epoch, []).append(r)
        numel = self.numel
        # A peer outside the arm (joined with `farflung join`, or any hivemind peer) is -1.
        worker_of = self.worker_of
        raw = 4 * numel
        message = _message_bytes(numel, self.setup.codec)
        samples = 0
        for epoch in sorted(by_epoch):
            everyone = sorted(by_epoch[epoch], key=lambda r: r.worker)
            samples += sum(r.samples for r in everyone)
            moved = bytes_by_epoch.get(epoch)
            zeros = (0,) * n
            # With a partition, one record per group that averaged together (`cluster.real.partition.epoch_groups`).
            groups = [everyone] if self.cuts is None else epoch_groups(everyone, worker_of, self.cuts)
            for group, records in enumerate(groups):
                time_s = max(r.time_s for r in records)
                who, absent = list(range(n)), None
                if self.churn is not None:
                    who = sorted({r.worker for r in records})
                    absent = [w for w in range(n) if w not in who] or None
                step_s = [next((r.step_s for r in records if r.worker == w), 0.0) for w in who]
                self.emit(CommRecord(
                    arm=plan.name, round=epoch, group=group, step=epoch, collective="butterfly",
                    requested_collective="butterfly",
                    payload="parameters" if self.setup.use_local_updates else "gradients",
                    participants=who, message_bytes=message, raw_bytes=raw,
                    bytes_sent=[(moved.bytes_sent if moved else zeros)[w] for w in who],
                    bytes_received=[(moved.bytes_received if moved else zeros)[w] for w in who],
                    bytes_unattributed=moved.unattributed if moved and group == 0 else 0,
                    comm_s=max(r.step_s for r in records), comm_s_per_worker=step_s,
                    # Waiting for the round and averaging, as the simulator's idle_s: from noticing the epoch's end
                    # (entering the step that closes it) to the end of the round.
                    blocking=not self.setup.delay_state_averaging, idle_s=step_s,
                    time_s=time_s, staleness=0, attempts=1, measured=True,
                    samples=[next((r.samples for r in records if r.worker == w), 0) for w in who],
                    swarm_peers=max(r.swarm_peers for r in records),
                    loaded_state=[r.worker for r in records if r.loaded_state],
                    received_fraction=[next((r.received_fraction for r in records if r.worker == w), None)
                                       for w in who],
                    missing_peers=sorted({worker_of.get(p, -1) for r in records for p in r.missing_peers}),
                    absent=absent,
                ))
            for r in everyone:
                self.emit(StepRecord(
                    arm=plan.name, worker=r.worker, step=epoch, tokens=samples * seq, loss=r.loss, time_s=r.time_s,
                    compute_s=r.compute_s, optimizer_s=r.optimizer_s, samples=r.samples, late_samples=0, staleness=0,
                    straggled_s=r.straggled_s or None,
                ))


def _add_bytes(a, b):
    if a is None:
        return b
    return RoundBytes(tuple(x + y for x, y in zip(a.bytes_sent, b.bytes_sent)),
                      tuple(x + y for x, y in zip(a.bytes_received, b.bytes_received)),
                      a.unattributed + b.unattributed)


def _message_bytes(numel: int, codec: str) -> int:
    """One peer's serialized message for a tensor of `numel` float32s under `codec` (its size does not depend on
    the values for the dense codecs)."""
    import torch

    from trainer.compression import transmit

    return transmit(torch.zeros(numel), codec).nbytes
