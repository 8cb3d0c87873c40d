"""The driver of a swarm arm (collaborative, local-updates): peers that train on their own, polled by the driver.

`cluster.real.swarm.SwarmPeer` is one peer (a Ray actor running hivemind.Optimizer in a thread); `SwarmArm` starts
them, polls their progress, takes peer 0's parameter snapshots at the evaluation points, reads the relays' byte
counters whenever every peer has closed an epoch, stops the swarm at the end of the epoch under way once the token
budget is spent, and emits the simulator's record kinds (see results/README.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from cluster.real.accounting import RoundBytes, attribute, counters_delta
from cluster.real.options import RealOptions
from cluster.real.swarm import EpochRecord, SwarmSetup
from cluster.driver import ArmPlan, evaluate_consensus
from cluster.records import CommRecord, Record, StepRecord
from trainer.replica import ReplicaSpec


class SwarmArm:
    """Drives a swarm arm (`cluster.real.swarm`): the peers train on their own; this polls, snapshots and stops them."""

    POLL_S = 0.2

    def __init__(self, peers, plan: ArmPlan, spec: ReplicaSpec, setup: SwarmSetup, options: RealOptions,
                 dial_addresses: list, emit: Callable[[Record], None], on_step: Callable[[], None] = lambda: None,
                 should_stop: Callable[[], bool] = lambda: False):
        self.peers, self.plan, self.spec, self.setup, self.options = peers, plan, spec, setup, options
        self.dial_addresses, self.emit, self.on_step, self.should_stop = dial_addresses, emit, on_step, should_stop
        self.last_params: list[np.ndarray] = []

    def run(self) -> None:
        plan, n = self.plan, self.plan.n_workers
        seq = self.spec.model.block_size
        budget = plan.total_steps * plan.tokens_per_step
        eval_tokens = plan.eval_every_steps * plan.tokens_per_step
        params0 = self.peers.call("params", workers=[0])[0]
        evals = [(0, 0, 0.0, params0)]  # (epoch, tokens, time_s, parameters) to evaluate once training is over
        seen = self.peers.call("sync_progress", [(n, self.options.startup_timeout_s)] * n)
        if min(seen) < n:
            raise TimeoutError(f"arm {plan.name!r}: after {self.options.startup_timeout_s:.0f} s the peers' progress "
                               f"trackers see {seen} of {n} peers in the DHT; check that the peers can reach each other")
        before = self.peers.call("relay_counters")
        self.peers.call("start_clock")
        self.peers.call("start_training", [(self.options.swarm_timeout_s,)] * n)
        bytes_by_epoch: dict[int, tuple] = {}
        closed, next_eval, stopping, epochs_seen = 0, eval_tokens, False, 0
        deadline = time.monotonic() + self.options.swarm_timeout_s + 60.0
        while True:
            time.sleep(self.POLL_S)
            progress = self.peers.call("progress")
            if all(p["done"] for p in progress):
                break
            tokens = sum(p["samples"] for p in progress) * seq
            epochs = [p["epoch"] for p in progress]
            for _ in range(max(0, max(epochs) - epochs_seen)):
                self.on_step()
            epochs_seen = max(epochs_seen, max(epochs))
            if min(epochs) > closed:  # every peer has closed epoch min - 1: its bytes are in
                after = self.peers.call("relay_counters")
                bytes_by_epoch[min(epochs) - 1] = attribute([counters_delta(b, a) for b, a in zip(before, after)],
                                                            self.dial_addresses)
                before, closed = after, min(epochs)
            if not stopping and next_eval <= tokens < budget:
                epoch, time_s, params = self.peers.call("snapshot", workers=[0])[0]
                evals.append((epoch, tokens, time_s, params))
                while next_eval <= tokens:
                    next_eval += eval_tokens
            if not stopping and (tokens >= budget or self.should_stop()):
                # Every peer finishes the epoch the leaders are in and closes it together: they end on one model.
                self.peers.call("stop_after", [(max(epochs),)] * n)
                stopping = True
            if time.monotonic() > deadline:
                self.peers.call("stop")
                raise TimeoutError(f"arm {plan.name!r}: the swarm did not train its budget within "
                                   f"{self.options.swarm_timeout_s:.0f} s (swarm_timeout_s); it trained {tokens} of "
                                   f"{budget} tokens")
        per_worker: list[list[EpochRecord]] = self.peers.call("training_records")
        after = self.peers.call("relay_counters")
        last = max((r.epoch for rs in per_worker for r in rs), default=0)
        moved = attribute([counters_delta(b, a) for b, a in zip(before, after)], self.dial_addresses)
        bytes_by_epoch[last] = _add_bytes(bytes_by_epoch.get(last), moved)
        self.emit_epochs(per_worker, bytes_by_epoch)
        end_s = max((r.time_s for rs in per_worker for r in rs), default=0.0)
        tokens = sum(r.samples for rs in per_worker for r in rs) * seq
        for epoch, at_tokens, time_s, params in evals:
            # Peer 0's snapshot alone: the others' parameters at that moment were not taken.
            self.emit(evaluate_consensus(self.peers, plan.name, epoch, at_tokens, time_s, [params]))
        params = self.last_params = self.peers.call("params")
        self.emit(evaluate_consensus(self.peers, plan.name, last + 1, tokens, end_s, params))

    def emit_epochs(self, per_worker: list[list[EpochRecord]], bytes_by_epoch: dict) -> None:
        """One comm record per epoch and one step record per peer that closed it, in epoch order."""
        plan, n, seq = self.plan, self.plan.n_workers, self.spec.model.block_size
        by_epoch: dict[int, list[EpochRecord]] = {}
        for records in per_worker:
            for r in records:
                by_epoch.setdefault(r.epoch, []).append(r)
        numel = self.peers.call("num_params", workers=[0])[0]
        # A peer outside the arm (joined with `farflung join`, or any hivemind peer) is -1.
        worker_of = {d["peer_id"]: d["worker"] for d in self.peers.call("describe")}
        raw = 4 * numel
        message = _message_bytes(numel, self.setup.codec)
        samples = 0
        for epoch in sorted(by_epoch):
            records = sorted(by_epoch[epoch], key=lambda r: r.worker)
            samples += sum(r.samples for r in records)
            moved = bytes_by_epoch.get(epoch)
            zeros = (0,) * n
            step_s = [next((r.step_s for r in records if r.worker == w), 0.0) for w in range(n)]
            self.emit(CommRecord(
                arm=plan.name, round=epoch, group=0, step=epoch, collective="butterfly",
                requested_collective="butterfly", payload="parameters" if self.setup.use_local_updates else "gradients",
                participants=list(range(n)), message_bytes=message, raw_bytes=raw,
                bytes_sent=list(moved.bytes_sent if moved else zeros),
                bytes_received=list(moved.bytes_received if moved else zeros),
                bytes_unattributed=moved.unattributed if moved else 0,
                comm_s=max(r.step_s for r in records), comm_s_per_worker=step_s,
                # Waiting for the round and averaging, as the simulator's idle_s: from noticing the epoch's end
                # (entering the step that closes it) to the end of the round.
                blocking=not self.setup.delay_state_averaging, idle_s=step_s,
                time_s=max(r.time_s for r in records), staleness=0, attempts=1, measured=True,
                samples=[next((r.samples for r in records if r.worker == w), 0) for w in range(n)],
                swarm_peers=max(r.swarm_peers for r in records),
                loaded_state=[r.worker for r in records if r.loaded_state],
                received_fraction=[next((r.received_fraction for r in records if r.worker == w), None)
                                   for w in range(n)],
                missing_peers=sorted({worker_of.get(p, -1) for r in records for p in r.missing_peers}),
            ))
            for r in records:
                self.emit(StepRecord(
                    arm=plan.name, worker=r.worker, step=epoch, tokens=samples * seq, loss=r.loss, time_s=r.time_s,
                    compute_s=r.compute_s, optimizer_s=r.optimizer_s, samples=r.samples, late_samples=0, staleness=0,
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
