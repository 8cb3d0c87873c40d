"""How the arms of a run are run: each by the driver for its mode and schedule, side by side on Ray where they can be.

`run_arms` is the runner's one call: it keeps what an interrupted run finished (`experiments.checkpoint`), gives each
arm that trains a slot of CPUs (`cluster.arm_scheduler`) or runs the arms one after another, re-times an arm from a
sweep's trace where its training configuration was already recorded, and writes every record to metrics.jsonl in arm
order, whatever order the arms finish in.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from cluster.arm_scheduler import ArmScheduler, TraceClaims, completed
from cluster.checkpoint import NO_CHECKPOINTS, Checkpoints
from cluster.churn import ChurnDriver, ChurnExchanges
from cluster.collaborative import CollaborativeDriver
from cluster.devices import get_device
from cluster.driver import ArmPlan, LockstepDriver
from cluster.records import Record
from cluster.replica_hosts import HostPool
from cluster.retime import record, retime
from cluster.runtime import RUNTIMES, start_ray
from cluster.swarm_churn import CollaborativeChurnDriver
from cluster.sim import ModelledExchanges
from experiments.checkpoint import ArmCheckpoints, MetricsLog, RunCheckpoints
from experiments.fields import ConfigError
from experiments.resolved import resolved_config
from experiments.spec import ArmConfig, ExperimentSpec
from trainer.data import Corpus
from trainer.replica import ReplicaSpec
from trainer.strategies import STRATEGIES


@dataclass(frozen=True)
class ArmJob:
    """One arm to run, with what every driver needs."""

    spec: ExperimentSpec
    arm: ArmConfig
    runtime: str  # where the simulator's replicas live ("local", "ray")
    emit: Callable[[Record], None]
    on_step: Callable[[], None]
    manifest: dict
    corpus: Corpus | None = None  # loaded once for every arm; the simulator's replicas share it
    traces: dict | None = None  # a sweep's recorded lockstep arms, by training configuration
    checkpoints: Checkpoints = NO_CHECKPOINTS  # where a simulated arm saves its state and resumes from
    scheduler: ArmScheduler | None = None  # arms side by side: where a training arm gets its slot of CPUs
    placement: dict = field(default_factory=dict)  # where and when the arm trained, filled by the scheduler

    @property
    def owner(self) -> tuple:
        return (id(self.spec), self.arm.name)


@contextlib.contextmanager
def _workers(job: ArmJob):
    """The arm's replicas: on a slot of its own when arms run side by side, otherwise as the runtime places them."""
    specs = replica_specs(job.spec, job.arm)
    if job.scheduler is None:
        with RUNTIMES[job.runtime](specs, corpus=job.corpus) as workers:
            yield workers
        return
    import ray

    with job.scheduler.slot(job.placement) as slot:
        # `actors` only where the slot is smaller than what the runtime takes by itself (a CPU per worker, up to
        # the cluster's), so that a runtime class wrapped by a caller (a benchmark) keeps its (specs, corpus) call.
        fits = min(len(specs), int(ray.cluster_resources().get("CPU", 1)))
        extra = {"actors": slot.cpus} if slot.cpus < fits else {}
        with RUNTIMES[job.runtime](specs, corpus=job.corpus, **extra) as workers:
            yield workers


def retimable(spec: ExperimentSpec, arm: ArmConfig) -> bool:
    """Whether a recorded run of the arm's training configuration can stand in for training it. Not a hostile
    peer's arm (its poison depends on what it would have sent, which a trace does not keep), nor one with faults (who
    takes part depends on the clock)."""
    return (spec.run.mode == "sim" and STRATEGIES[arm.algorithm].retimable and not arm.hostile
            and arm.faults is None)


def _simulate_lockstep(job: ArmJob) -> bool:
    plan = arm_plan(job.spec, job.arm)
    if job.arm.faults is not None:
        with _workers(job) as workers:
            ChurnDriver(workers, plan, ChurnExchanges(plan, job.arm.faults), job.emit, job.on_step, job.checkpoints).run()
        return False
    if job.traces is not None and retimable(job.spec, job.arm):
        key = training_key(job.spec, job.arm)
        claim = job.scheduler.claims.claim(job.traces, key, job.owner) if job.scheduler else None
        mine = claim is not None and claim.owner == job.owner
        if claim is not None and not mine:
            job.scheduler.claims.wait(claim)  # an earlier arm trains this configuration
        if key in job.traces and not mine:
            retime(job.traces[key], plan, job.emit, job.on_step)
            return True
        recorded = False
        try:
            with _workers(job) as workers:
                job.traces[key] = record(workers, plan, job.emit, job.on_step)
            recorded = True
        finally:
            if claim is not None:
                TraceClaims.settle(claim, recorded)
        return False
    with _workers(job) as workers:
        LockstepDriver(workers, plan, ModelledExchanges(plan), job.emit, job.on_step, job.checkpoints).run()
    return False


def training_key(spec: ExperimentSpec, arm: ArmConfig) -> str:
    """What an arm trains, without what only sets its clock (network, devices, speed factors): two arms with the
    same key and a retimable strategy make the same steps and exchanges, bit for bit."""
    config = resolved_config(spec)
    (table,) = [a for a in config["arm"] if a["name"] == arm.name]
    clockless = {k: v for k, v in table.items() if k not in ("name", "baseline", "network", "device", "speed_factors")}
    run = {k: v for k, v in config["run"].items() if k != "checkpoint_every"}  # saving state changes no number
    whole = {k: config[k] for k in ("model", "data", "optim")} | {"run": run, "arm": clockless}
    return json.dumps(whole, sort_keys=True)


def claim_traces(scheduler: ArmScheduler, spec: ExperimentSpec, traces: dict) -> None:
    """Decide, in arm order, which of the spec's arms train a configuration not yet traced (see `TraceClaims`)."""
    for arm in spec.arms:
        if retimable(spec, arm):
            scheduler.claims.claim(traces, training_key(spec, arm), (id(spec), arm.name))


def _simulate_collaborative(job: ArmJob) -> bool:
    plan = arm_plan(job.spec, job.arm)
    with _workers(job) as workers:
        if job.arm.faults is not None:
            CollaborativeChurnDriver(workers, plan, job.arm.faults, job.emit, job.on_step, job.checkpoints).run()
        else:
            CollaborativeDriver(workers, plan, job.emit, job.on_step, job.checkpoints).run()
    return False


def _real_peers(job: ArmJob) -> bool:
    """Real hivemind peers; `run_real_arm` drives them in lockstep or as a swarm, as the strategy runs on real peers."""
    from cluster.real import RealOptions, run_real_arm

    run_real_arm(
        arm_plan(job.spec, job.arm), replica_specs(job.spec, job.arm), job.emit, on_step=job.on_step,
        # On a Ray cluster (RAY_ADDRESS) peers on different machines reach each other by node address.
        options=RealOptions(shaping=job.spec.run.shaping, allreduce=job.arm.allreduce,
                            host="auto" if os.environ.get("RAY_ADDRESS") else "127.0.0.1", secret=_run_secret()),
        on_swarm=lambda s: _announce_swarm(job.manifest, job.arm.name, s), faults=job.arm.faults,
    )
    return False


# The driver of an arm, by mode and by how the strategy runs there: its `schedule` in the simulator, its `real_mode`
# on real peers (where local-updates runs as a hivemind.Optimizer swarm, not in lockstep). Each returns whether the
# arm was re-timed from a trace rather than trained.
DRIVERS: dict[tuple[str, str], Callable[[ArmJob], bool]] = {
    ("sim", "lockstep"): _simulate_lockstep,
    ("sim", "collaborative"): _simulate_collaborative,
    ("real", "lockstep"): _real_peers,
    ("real", "swarm"): _real_peers,
}


def driver_for(mode: str, algorithm: str) -> Callable[[ArmJob], bool]:
    strategy = STRATEGIES[algorithm]
    return DRIVERS[(mode, strategy.schedule if mode == "sim" else strategy.real_mode)]


@dataclass
class _ArmOutcome:
    records: list[Record]
    retimed: bool
    wall_s: float
    placement: dict


def _run_arm(job: ArmJob, records: list[Record], wall_before_s: float = 0.0) -> _ArmOutcome:
    t0 = time.perf_counter()
    retimed = driver_for(job.spec.run.mode, job.arm.algorithm)(job)
    return _ArmOutcome(records, retimed, round(wall_before_s + time.perf_counter() - t0, 3), job.placement)


def run_arms(spec: ExperimentSpec, runtime_name: str, work_dir: Path, manifest: dict, progress: bool,
              corpus: Corpus | None = None, traces: dict | None = None) -> list[Record]:
    """Run every arm that `work_dir` does not hold finished, side by side where the simulator's replicas are on Ray
    (one after another otherwise: in this process; on real peers, whose shaped links concurrent arms would share
    unfairly; and where arms save checkpoints mid-way, which count the records already in the file). Records reach
    metrics.jsonl in arm order, whatever order the arms finish in; returns them in that order, those kept from an
    interrupted run first."""
    saved = RunCheckpoints(work_dir)
    names = [a.name for a in spec.arms]
    positions = saved.position(names)
    kept = saved.keep_records(names, positions)
    # A sweep's trace is recorded from an arm's first step: an arm that records or replays one never stops early.
    every = spec.run.checkpoint_every if traces is None and spec.run.mode == "sim" else 0
    resuming_mid_arm = any(p["step"] for p in positions if not p["done"])
    bar = _Bar(spec, progress)
    started_ray = runtime_name == "ray" and start_ray()
    try:
        with contextlib.ExitStack() as stack:
            scheduler = None
            if runtime_name == "ray" and spec.run.mode == "sim" and not every and not resuming_mid_arm:
                scheduler = ArmScheduler.current()
                if scheduler is None:  # a sweep holds one for all its points; a run alone opens its own
                    pool = HostPool.current() or stack.enter_context(HostPool())
                    scheduler = stack.enter_context(ArmScheduler.for_cluster(pool, spec.run.workers, len(spec.arms)))
            elif runtime_name == "ray" and spec.run.mode == "sim" and HostPool.current() is None:
                stack.enter_context(HostPool())  # one set of actors serves arm after arm
            outcomes = _outcomes(spec, runtime_name, saved, positions, kept, every, manifest, bar, corpus, traces,
                                 scheduler)
    finally:
        bar.close()
        if started_ray:
            import ray

            ray.shutdown()
    manifest["wall_s_per_arm"] = {a.name: o.wall_s for a, o in zip(spec.arms, outcomes)}
    retimed = [a.name for a, o in zip(spec.arms, outcomes) if o.retimed]
    if retimed:
        manifest["retimed"] = retimed
    if scheduler is not None:
        manifest["arms_side_by_side"] = scheduler.concurrency
        manifest["arm_placement"] = {a.name: o.placement for a, o in zip(spec.arms, outcomes) if o.placement}
    return [r for o in outcomes for r in o.records]


def _outcomes(spec: ExperimentSpec, runtime_name: str, saved: RunCheckpoints, positions: list[dict],
              kept: list[Record], every: int, manifest: dict, bar: _Bar, corpus: Corpus | None, traces: dict | None,
              scheduler: ArmScheduler | None) -> list[_ArmOutcome]:
    done: dict[int, _ArmOutcome] = {}
    written = [0]  # arms whose records are all in the file
    counts = {a.name: p["records"] for a, p in zip(spec.arms, positions)}

    def job(arm: ArmConfig, emit: Callable[[Record], None], checkpoints: Checkpoints = NO_CHECKPOINTS) -> ArmJob:
        def on_step() -> None:
            if scheduler is not None:
                scheduler.check()  # an arm stops at its next step once the run or sweep has stopped
            bar.step()

        return ArmJob(spec, arm, runtime_name, emit, on_step, manifest, corpus, traces, checkpoints, scheduler)

    with MetricsLog(saved.work_dir / "metrics.jsonl", counts) as metrics:

        def finished(index: int, outcome: _ArmOutcome, in_file: bool) -> None:
            """Write every arm whose predecessors are all written (the file is the one a sequential run writes) and
            mark it complete, so that a resume keeps it."""
            done[index] = outcome
            bar.arm_done(outcome.retimed)
            while written[0] in done:
                arm, result = spec.arms[written[0]], done[written[0]]
                if not (in_file and written[0] == index) and not positions[written[0]]["done"]:
                    for r in result.records:
                        metrics.write(r)
                metrics.sync()
                if not positions[written[0]]["done"]:
                    saved.mark_done(written[0], arm.name, metrics.counts.get(arm.name, 0), result.wall_s)
                written[0] += 1

        for index, arm in enumerate(spec.arms):  # arms a resume keeps whole
            if positions[index]["done"]:
                bar.skip_arm()
                finished(index, _ArmOutcome([r for r in kept if r.arm == arm.name], False,
                                            positions[index]["wall_s"], {}), True)
        todo = [i for i in range(len(spec.arms)) if i not in done]
        if scheduler is None:
            for index in todo:
                arm = spec.arms[index]
                bar.set_description(arm.name)
                records = [r for r in kept if r.arm == arm.name]  # up to its checkpoint, if it has one

                def emit(record: Record, records=records) -> None:
                    records.append(record)
                    metrics.write(record)

                checkpoints = ArmCheckpoints(saved, index, arm.name, metrics, every, positions[index]["wall_s"])
                outcome = _run_arm(job(arm, emit, checkpoints), records, positions[index]["wall_s"])
                finished(index, outcome, True)
            return [done[i] for i in range(len(spec.arms))]
        if traces is not None:
            claim_traces(scheduler, spec, traces)
        bar.set_description(f"{len(todo)} arms")
        with ThreadPoolExecutor(max_workers=max(1, len(todo)), thread_name_prefix="arm") as threads:
            futures = {}
            for index in todo:
                records: list[Record] = []
                futures[threads.submit(_run_arm, job(spec.arms[index], records.append), records)] = index
            try:
                for future in completed(futures):
                    finished(futures[future], future.result(), False)
            except BaseException:
                scheduler.cancel()  # the other arms stop at their next step; the error is this one
                raise
    return [done[i] for i in range(len(spec.arms))]


def replica_specs(spec: ExperimentSpec, arm: ArmConfig) -> list[ReplicaSpec]:
    n = spec.run.workers
    return [
        ReplicaSpec(
            worker=w, n_workers=n, seed=spec.run.seed, model=spec.model, data=spec.data, optim=spec.optim,
            batch_size=spec.run.batch_size, total_steps=spec.total_steps, algorithm=arm.algorithm,
            settings=arm.settings, codec=arm.codec, eval_batches=spec.run.eval_batches,
            # One thread per worker keeps results independent of how many cores the machine has.
            torch_threads=1,
        )
        for w in range(n)
    ]


def arm_plan(spec: ExperimentSpec, arm: ArmConfig) -> ArmPlan:
    device = get_device(arm.device)
    return ArmPlan(
        name=arm.name, n_workers=spec.run.workers, network=arm.network,
        devices=(device,) * spec.run.workers, speed_factors=arm.speed_factors, codec=arm.codec,
        total_steps=spec.total_steps, tokens_per_step=spec.tokens_per_step,
        eval_every_steps=spec.eval_every_steps, seed=spec.run.seed,
        client_mode=tuple(w in arm.client_mode for w in range(spec.run.workers)),
        swarm=arm.swarm, aggregation=arm.aggregation, hostile=arm.hostile,
    )


def _run_secret() -> bytes | None:
    from cluster.real.secret import run_secret

    try:
        return run_secret()
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _announce_swarm(manifest: dict, arm: str, swarm) -> None:
    """Print where a machine elsewhere joins an arm, and record it (and where each peer runs) in the manifest."""
    joinable = " (join with: farflung join --initial-peers ADDRESS --run-id ID)" if swarm.joinable else ""
    print(f"{arm}: swarm {swarm.initial_peers[0]} run id {swarm.run_id}{joinable}", file=sys.stderr, flush=True)
    manifest.setdefault("swarms", {})[arm] = {
        "run_id": swarm.run_id, "initial_peers": list(swarm.initial_peers), "ray_nodes": list(swarm.placement),
        "joinable": swarm.joinable,
    }


class _Bar:
    """One progress bar over every step of every arm (re-timed arms step fast), with arms trained and re-timed;
    safe to update from the arms' threads. Without `enabled`, nothing is shown and nothing is imported."""

    def __init__(self, spec: ExperimentSpec, enabled: bool):
        self._lock = threading.Lock()
        self._trained = self._retimed = 0
        self._steps = spec.total_steps
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=spec.total_steps * len(spec.arms), unit="step", file=sys.stderr,
                             dynamic_ncols=True)

    def step(self) -> None:
        if self._bar is not None:
            with self._lock:
                self._bar.update(1)

    def set_description(self, text: str) -> None:
        if self._bar is not None:
            with self._lock:
                self._bar.set_description(text)

    def skip_arm(self) -> None:
        """An arm an interrupted run finished: its steps are done."""
        if self._bar is not None:
            with self._lock:
                self._bar.update(self._steps)

    def arm_done(self, retimed: bool) -> None:
        if self._bar is not None:
            with self._lock:
                self._retimed += retimed
                self._trained += not retimed
                self._bar.set_postfix(arms_trained=self._trained, arms_retimed=self._retimed)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
