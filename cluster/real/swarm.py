"""The real mode's swarm arms: `hivemind.Optimizer` peers that train at their own pace (collaborative, local updates).

Lockstep arms (ddp, diloco: `cluster.driver.LockstepDriver` with `cluster.real.lockstep.PeerExchanges`) are driven
step by step. Here each peer runs its own training loop in a thread of its Ray actor, exactly as a hivemind volunteer
would: forward/backward on its shard, then `hivemind.Optimizer.step()`, which reports progress to the DHT, and when
the swarm's samples reach the target batch averages (gradients for collaborative, parameters for local updates) and
starts the next epoch. The driver only polls progress, asks a peer holding the state for parameter snapshots at
the evaluation points (evaluated after training, so evaluation takes no time from it), reads the relays' byte
counters whenever every peer has closed an epoch, and tells the peers to stop once the swarm has trained the arm's
token budget (they finish the epoch they are in, so they end on one model).

How the simulator's settings map onto hivemind.Optimizer: `cluster.real.swarm_setup`.

The swarm is joinable: peer 0 publishes the arm's configuration in the DHT (`CONFIG_KEY`) and lists the run under
`RUNS_KEY`, so `farflung join` on another machine can build the same model and optimizer, load the current state from
the peers and contribute. The run marks itself finished under `DONE_KEY` so that joined peers leave.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from functools import partial

import numpy as np

from cluster.real.exchange_faults import ArmedRound, PeerFaults, arm_rounds, cancelled_rounds
from cluster.real.messages import EpochRecord
from cluster.real.peer import RealPeer
from cluster.real.swarm_setup import ClippedAdamW, SwarmSetup, fresh_weights
from trainer.compression import hivemind_compression

CONFIG_KEY = "{run_id}_config"  # the arm's configuration, JSON, for joining peers
RUNS_KEY = "farflung_runs"  # subkey run id -> one line describing the run: how `join` finds a run without --run-id
DONE_KEY = "{run_id}_done"


class SwarmPeer(RealPeer):
    """A `RealPeer` whose exchanges are `hivemind.Optimizer`'s: `start_optimizer` instead of `start_averaging`, then
    `train` (blocking), or `start_training` (in a thread, so that a Ray actor can answer `progress`, `stop_after` and
    `snapshot` meanwhile) and `finish_training` once `progress()["done"]`.

    hivemind's averagers must be created in the main thread (they set signal handlers), so the optimizer is built by
    a plain call and only the training loop runs in a thread.

    `holds_state=False`: a peer that does not start with the swarm (one the real mode restarts after a failure):
    the lone-restart guard (`cluster.real.swarm_state`) keeps it from serving or using its own weights until it has
    loaded the swarm's state. `incarnation` > 0 gives it fresh random weights of its own, as a restarted process
    that initialises its model again would have (the swarm's peers start from one initialisation).

    `set_faults` gives the peer the exchange faults and straggling it plays itself (`cluster.real.exchange_faults`):
    it arms a round's fault on its averager at the epoch's first microbatch, and sleeps after each microbatch of a
    straggling interval."""

    RETRY_LOAD_S = 1.0  # between two attempts of a peer without the state to find a donor

    def __init__(self, *args, holds_state: bool = True, incarnation: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.holds_state, self.incarnation = holds_state, incarnation
        if incarnation:
            fresh_weights(self.replica.model, self.spec.seed, self.spec.worker, incarnation)
        self.opt = None
        self._loaded: dict | None = None  # the state load that let this peer in, until `progress` reports it
        self._new_records: list[EpochRecord] = []  # closed since `progress` last reported
        self._records_lock = threading.Lock()
        self._open_compute_s = 0.0  # compute in the epoch under way: lost if this peer fails now
        self._lock = threading.Lock()  # held while parameters change: a snapshot never sees half an update
        self._stop_after: int | None = None
        self._stop_now = threading.Event()
        self._samples = 0
        self._loads = 0
        self._thread: threading.Thread | None = None
        self._records: list[EpochRecord] = []
        self._error: BaseException | None = None
        self.faults = PeerFaults()  # this peer's exchange faults and stragglers (`set_faults`)

    def start_optimizer(self, setup: SwarmSetup, request_timeout_s: float, bandwidth_mbps: float | None) -> int:
        import psutil

        from cluster.real.averager import SwarmGradientAverager
        from cluster.real.processes import process_tree

        # hivemind logs every matchmaking retry at INFO; a run's output should show farflung's progress.
        logging.getLogger("hivemind").setLevel(logging.WARNING)
        self.setup = setup
        o, spec = self.spec.optim, self.spec
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in self.replica.optimizer.param_groups]

        def lr_factor(epoch: int) -> float:
            return o.lr_at(int(epoch * setup.lockstep_steps_per_epoch), spec.total_steps) / o.lr

        # hivemind needs each matchmaking request to time out well before a leader stops gathering its group.
        averager_opts = {"request_timeout": min(request_timeout_s, 0.5 * setup.matchmaking_time_s) or None,
                         "bandwidth": bandwidth_mbps, "target_group_size": setup.target_group_size or None}
        averager_opts = {k: v for k, v in averager_opts.items() if v is not None}
        # The run secret binds both averagers' schema hashes; a peer without the state must not be a donor.
        averager_opts["run_secret"] = self.options.secret
        if not self.holds_state:
            averager_opts["allow_state_sharing"] = False
        # Optimizer hands averager_opts to its state averager only; the gradient averager gets them here.
        # hivemind's GradientAverager that also reports partial rounds (and injects RealOptions.drop_parts_at).
        grad_averager = None if setup.use_local_updates else partial(SwarmGradientAverager, **averager_opts)
        children = {c.pid for c in psutil.Process().children(recursive=True)}
        try:
            self.opt = self._optimizer(setup, groups, lr_factor, averager_opts, grad_averager)
        except BaseException:
            # A constructor that fails half-way may have started averager processes nobody holds: stop them here.
            for child in psutil.Process().children(recursive=True):
                if child.pid not in children:
                    child.kill()
            raise
        # The optimizer's averagers and tracker are processes of their own; shutdown's pid sweep covers them too.
        for part in (self.opt.state_averager, self.opt.grad_averager, self.opt.tracker):
            if part is not None and getattr(part, "pid", None):
                self._owned += process_tree(part.pid)
        original_load = self.opt.load_state_from_peers

        def counting_load(**kwargs):
            self._loads += 1
            return original_load(**kwargs)

        self.opt.load_state_from_peers = counting_load
        return self.replica.num_params()

    def _optimizer(self, setup: SwarmSetup, groups, lr_factor, averager_opts: dict, grad_averager):
        from torch.optim.lr_scheduler import LambdaLR

        from cluster.real.swarm_state import SwarmOptimizer

        o = self.spec.optim
        return SwarmOptimizer(
            dht=self.dht, run_id=self.run_id, params=groups,
            optimizer=lambda params: ClippedAdamW(params, grad_clip=o.grad_clip, lr=o.lr, betas=(o.beta1, o.beta2),
                                                   foreach=False),
            scheduler=lambda opt: LambdaLR(opt, lr_factor),
            target_batch_size=setup.target_batch_size, batch_size_per_step=setup.batch_size,
            matchmaking_time=setup.matchmaking_time_s, averaging_timeout=setup.averaging_timeout_s,
            use_local_updates=setup.use_local_updates, delay_state_averaging=setup.delay_state_averaging,
            average_state_every=setup.average_state_every,
            grad_compression=hivemind_compression(setup.codec),
            state_averaging_compression=hivemind_compression(setup.codec),
            averager_opts=averager_opts, grad_averager_factory=grad_averager,
            tracker_opts={"min_refresh_period": setup.progress_refresh_s},
            # hivemind 1.1.12 leaves its own client_mode unset unless it is passed (its default of None stays None),
            # and then asks a client-mode averager to share its state, which raises.
            client_mode=self.dht.client_mode, shutdown_timeout=5.0, verbose=False,
        )

    def sync_progress(self, n_peers: int, timeout_s: float) -> int:
        """Wait until this peer's progress tracker sees `n_peers` peers; returns how many it sees.

        hivemind's tracker fetches the swarm's progress every few seconds and, seeing nobody, estimates the epoch's
        end from this peer's own speed. Peers that start together would each close their first epochs alone (and
        average with nobody) until their next fetch. Here every peer reports first, then has its tracker fetch again
        (through the tracker's own wake-up event) until it sees the whole swarm. The tracker publishes nothing for a
        peer that has not accumulated a sample yet, so each peer reports one placeholder sample, withdrawn before
        training starts."""
        tracker = self.opt.tracker
        tracker.report_local_progress(self.opt.local_epoch, 1)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if tracker.global_progress.num_peers >= n_peers:
                break
            tracker.global_progress.next_fetch_time = 0.0
            tracker.global_state_updated.set()
            time.sleep(0.2)
        seen = int(tracker.global_progress.num_peers)
        tracker.report_local_progress(self.opt.local_epoch, 0)
        return seen

    def publish(self, config: str, arm: str) -> bool:
        """List this run in the DHT with its configuration, for peers that join from elsewhere."""
        from hivemind.utils import get_dht_time

        expires = get_dht_time() + 24 * 3600
        stored = self.dht.store(CONFIG_KEY.format(run_id=self.run_id), config, expires)
        listed = self.dht.store(RUNS_KEY, f"{arm} ({self.spec.algorithm}, {self.spec.n_workers} peers)", expires,
                                subkey=self.run_id)
        return bool(stored and listed)

    def mark_done(self) -> bool:
        from hivemind.utils import get_dht_time

        return bool(self.dht.store(DONE_KEY.format(run_id=self.run_id), True, get_dht_time() + 3600))

    def swarm_done(self) -> bool:
        found = self.dht.get(DONE_KEY.format(run_id=self.run_id), latest=True)
        return found is not None and bool(found.value)

    # --- the training loop ------------------------------------------------------------------------
    def train(self, max_wall_s: float, max_epochs: int | None = None,
              on_epoch: Callable[[EpochRecord], None] | None = None,
              keep_going: Callable[[], bool] = lambda: True) -> list[EpochRecord]:
        """Train until `stop_after`'s epoch is closed, `stop` is called, `max_epochs` epochs closed, `max_wall_s`
        passed or `keep_going()` (asked before every microbatch) is false; returns one record per epoch this peer
        closed."""
        opt, model, sampler, batch = self.opt, self.replica.model, self.replica.sampler, self.spec.batch_size
        self._resume_clock()
        records: list[EpochRecord] = []
        deadline = time.monotonic() + max_wall_s
        if not self.holds_state and not self._await_state(deadline):
            self._paused_at = time.perf_counter()
            return records
        losses: list[float] = []
        compute_s = optimizer_s = straggled_s = 0.0
        samples = 0
        faults_armed: set[int] = set()
        rounds_armed: list[ArmedRound] = []  # this epoch's exchange faults, armed on their averagers
        while not self._stop_now.is_set() and time.monotonic() < deadline:
            if self._stop_after is not None and opt.local_epoch > self._stop_after:
                break
            if max_epochs is not None and sum(not r.loaded_state for r in records) >= max_epochs:
                break
            if not keep_going():
                break
            t0, started_s = time.perf_counter(), self.clock_s()
            x, y = sampler.next_batch()
            model.train()
            _, loss = model(x, y)
            loss.backward()
            t1 = time.perf_counter()
            slowdown_s = self.faults.slowdown_s(started_s, t1 - t0)
            if slowdown_s > 0:  # a straggler: this microbatch takes 1 / speed times as long
                self._stop_now.wait(slowdown_s)
                t1, slept_from = time.perf_counter(), t1
                straggled_s += t1 - slept_from  # so compute_s - straggled_s - optimizer_s is the forward/backward
            epoch, loads = opt.local_epoch, self._loads
            rounds_armed += arm_rounds(opt, self.faults, epoch, rounds_armed)
            if epoch in self.options.drop_parts_at and epoch not in faults_armed and self.spec.worker == 0:
                opt.grad_averager.drop_parts_once()  # the next gradient round, this epoch's, is a partial average
                faults_armed.add(epoch)
            swarm_peers = int(opt.tracker.global_progress.num_peers)  # before the step: an epoch's end resets it
            with self._lock:
                opt.step()
                opt.zero_grad()
            t2 = time.perf_counter()
            loaded = self._loads != loads
            if not loaded:  # a peer that loads state drops this microbatch (it was computed on stale parameters)
                losses.append(loss.item())
                samples += batch
                self._samples += batch
            if opt.local_epoch == epoch:
                compute_s += t2 - t0  # with local updates this includes the local AdamW step
                optimizer_s += t2 - t1
                self._open_compute_s = compute_s
                continue
            compute_s += t1 - t0
            reports = opt.grad_averager.take_reports() if opt.grad_averager is not None else []
            cancelled = cancelled_rounds(opt, rounds_armed)
            rounds_armed = []
            record = EpochRecord(
                worker=self.spec.worker, epoch=epoch, samples=samples,
                loss=float(np.mean(losses)) if losses else None, compute_s=compute_s, optimizer_s=optimizer_s,
                step_s=t2 - t1,
                time_s=self.clock_s(), swarm_peers=swarm_peers, loaded_state=loaded,
                received_fraction=min((f for f, _, _ in reports), default=None),
                missing_peers=tuple(sorted({p for _, missing, _ in reports for p in missing})),
                group_peers=reports[-1][2] if reports else (),
                straggled_s=straggled_s, cancelled_rounds=cancelled,
            )
            records.append(record)
            with self._records_lock:
                self._new_records.append(record)
            if on_epoch is not None:
                on_epoch(record)
            losses, compute_s, optimizer_s, straggled_s, samples = [], 0.0, 0.0, 0.0, 0
            self._open_compute_s = 0.0
        self._paused_at = time.perf_counter()
        return records

    def set_faults(self, faults: PeerFaults) -> None:
        """The exchange faults and straggling this peer plays (`cluster.real.exchange_faults`)."""
        self.faults = faults

    def _await_state(self, deadline: float, keep_going: Callable[[], bool] = lambda: True) -> bool:
        """The lone-restart guard: load the swarm's state from a peer that holds it, retrying until one answers (for
        as long as the swarm has no holder in reach: alone, this peer never trains on its fresh weights); False if
        stopped, past `deadline` or no longer `keep_going()` first."""
        from cluster.real.swarm_state import hold_state, load_from_holder

        while (not self._stop_now.is_set() and self._stop_after is None and time.monotonic() < deadline
               and keep_going()):
            started_s = self.clock_s()
            with self._lock:
                load = load_from_holder(self.opt, timeout_s=self.setup.averaging_timeout_s)
            if load is not None:
                hold_state(self.opt)
                self.holds_state = True
                self._loaded = {"load": load, "started_s": started_s, "loaded_s": self.clock_s()}
                return True
            self._stop_now.wait(self.RETRY_LOAD_S)
        return False

    def await_state(self, timeout_s: float, keep_going: Callable[[], bool] = lambda: True) -> bool:
        """For a peer made with `holds_state=False` (a restarted one, or a machine joining with `farflung join`):
        wait up to `timeout_s` for a peer holding the swarm's state and load it (`_await_state`); True once loaded."""
        return self.holds_state or self._await_state(time.monotonic() + timeout_s, keep_going)

    def start_training(self, max_wall_s: float) -> None:
        def loop():
            try:
                self._records = self.train(max_wall_s)
            except BaseException as e:  # handed to the driver by finish_training
                self._error = e

        self._thread = threading.Thread(target=loop, name="farflung-swarm-training", daemon=True)
        self._thread.start()

    def finish_training(self) -> list[EpochRecord]:
        """Every record of the training thread, once it has ended; re-raises what ended it."""
        assert self._thread is not None, "finish_training called before start_training"
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._records

    def progress(self) -> dict:
        """Where this peer is, and what happened since the last call: the epochs it closed (`records`) and the state
        load that let it in (`loaded`: a restarted peer's first, else None)."""
        done = self._thread is not None and not self._thread.is_alive()  # first: a finished thread's records are in
        with self._records_lock:
            records, self._new_records = self._new_records, []
        loaded, self._loaded = self._loaded, None
        return {"samples": self._samples, "epoch": self.opt.local_epoch if self.opt is not None else 0,
                "time_s": self.clock_s(), "done": done, "holds_state": self.holds_state, "records": records,
                "loaded": loaded, "open_compute_s": self._open_compute_s}

    def served_digests(self) -> list[str]:
        """Digests of the parameters this peer served to peers loading the state, latest last."""
        return list(getattr(self.opt.state_averager, "served_digests", []))

    def stop_after(self, epoch: int) -> None:
        self._stop_after = epoch

    def stop(self) -> None:
        self._stop_now.set()

    def snapshot(self) -> tuple[int, float, np.ndarray]:
        """(epoch, this peer's clock, parameters), taken between two optimizer steps."""
        with self._lock:
            return self.opt.local_epoch, self.clock_s(), self.replica.params()

    def shutdown(self) -> None:
        self._stop_now.set()
        if self._thread is not None:
            self._thread.join(timeout=60.0)
        if self.opt is not None:
            try:
                self.opt.shutdown()
            except Exception:  # keep going: RealPeer.shutdown's pid sweep still stops its processes
                pass
            self.opt = None
        super().shutdown()

