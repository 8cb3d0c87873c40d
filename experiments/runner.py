"""Runs every arm of an experiment and leaves a complete run folder, or none that claims to be.

The folder is written under a hidden `.NAME.incomplete` name and renamed only when everything in
it is written, so a crash or Ctrl-C never leaves something that looks like a finished run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import tomli_w

from cluster.arm_scheduler import ArmScheduler, TraceClaims, completed
from cluster.collaborative import CollaborativeDriver
from cluster.devices import get_device
from cluster.driver import ArmPlan, LockstepDriver
from cluster.records import Record
from cluster.replica_hosts import HostPool
from cluster.retime import record, retime
from cluster.runtime import RUNTIMES, start_ray
from cluster.sim import ModelledExchanges
from experiments.fields import ConfigError
from experiments.manifest import build_manifest
from experiments.report import write_report
from experiments.spec import ArmConfig, ExperimentSpec, load_spec, resolved_config
from experiments.summary import summarize
from trainer.data import Corpus, check_fits, load_corpus
from trainer.replica import ReplicaSpec
from trainer.strategies import STRATEGIES

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class RunResult(NamedTuple):
    run_dir: Path
    summary: dict


def run(
    experiment: str | Path | ExperimentSpec,
    overrides: list[str] | tuple[str, ...] = (),
    out: str | Path | None = None,
    progress: bool = False,
    runtime: str | None = None,
    traces: dict | None = None,
) -> RunResult:
    """Run an experiment file (or a parsed spec) and return its run folder and summary.

    `traces` (a sweep's): recorded lockstep arms by training configuration (`training_key`). A simulated arm whose
    strategy is `retimable` and whose configuration is in it is re-timed from its trace instead of trained; one that
    is not is trained and its trace added. The manifest's `retimed` lists the arms that were re-timed."""
    if isinstance(experiment, ExperimentSpec):
        if overrides:
            raise ConfigError("overrides: apply --set values to a file, or build the spec with them already set")
        spec = experiment
    else:
        spec = load_spec(experiment, overrides)
    runtime_name = runtime or spec.run.runtime
    if runtime_name not in RUNTIMES:
        raise ConfigError(f"runtime: must be one of {', '.join(RUNTIMES)}, got {runtime_name!r}")
    run_dir = choose_run_dir(spec, out)
    corpus = load_corpus(spec.data, spec.run.seed)  # fails early, before any worker starts, on bad data
    check_corpus(spec, corpus)
    work_dir = run_dir.parent / f".{run_dir.name}.incomplete"
    if work_dir.exists():
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True)

    config_text = tomli_w.dumps(resolved_config(spec))
    (work_dir / "config.toml").write_text(config_text)
    manifest = build_manifest(spec, corpus, runtime_name, PROJECT_ROOT)
    if spec.run.mode == "real":
        from cluster.real import describe_shaping

        manifest["shaping_backend"] = describe_shaping(spec.run.shaping)
        manifest["runtime"] = runtime_name = "ray"
    records = _run_arms(spec, runtime_name, work_dir / "metrics.jsonl", manifest, progress, corpus, traces)
    summary = _write_results(spec, work_dir, records, manifest, config_text)
    if run_dir.is_dir():
        run_dir.rmdir()  # an empty --out folder, checked at the start
    work_dir.rename(run_dir)
    return RunResult(run_dir, summary)


def check_corpus(spec: ExperimentSpec, corpus: Corpus) -> None:
    """What the experiment asks of its corpus that only the loaded corpus can answer, before any worker starts."""
    check_fits(corpus, spec.run.workers, spec.model.block_size)
    floor = corpus.entropy_rate_nats
    if spec.run.target_loss is not None and floor is not None and spec.run.target_loss <= floor:
        raise ConfigError(f"run.target_loss: {spec.run.target_loss:g} is at or below the corpus's entropy rate, "
                          f"{floor:.4f} nats per byte, the lowest loss any model can reach on it; set a target "
                          "above it")


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


def _simulate_lockstep(job: ArmJob) -> bool:
    plan = arm_plan(job.spec, job.arm)
    if job.traces is not None and STRATEGIES[job.arm.algorithm].retimable:
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
        LockstepDriver(workers, plan, ModelledExchanges(plan), job.emit, job.on_step).run()
    return False


def training_key(spec: ExperimentSpec, arm: ArmConfig) -> str:
    """What an arm trains, without what only sets its clock (network, devices, speed factors): two arms with the
    same key and a retimable strategy make the same steps and exchanges, bit for bit."""
    config = resolved_config(spec)
    (table,) = [a for a in config["arm"] if a["name"] == arm.name]
    clockless = {k: v for k, v in table.items() if k not in ("name", "baseline", "network", "device", "speed_factors")}
    whole = {k: config[k] for k in ("model", "data", "optim")} | {"run": config["run"], "arm": clockless}
    return json.dumps(whole, sort_keys=True)


def claim_traces(scheduler: ArmScheduler, spec: ExperimentSpec, traces: dict) -> None:
    """Decide, in arm order, which of the spec's arms train a configuration not yet traced (see `TraceClaims`)."""
    for arm in spec.arms:
        if spec.run.mode == "sim" and STRATEGIES[arm.algorithm].retimable:
            scheduler.claims.claim(traces, training_key(spec, arm), (id(spec), arm.name))


def _simulate_collaborative(job: ArmJob) -> bool:
    with _workers(job) as workers:
        CollaborativeDriver(workers, arm_plan(job.spec, job.arm), job.emit, job.on_step).run()
    return False


def _real_peers(job: ArmJob) -> bool:
    """Real hivemind peers; `run_real_arm` drives them in lockstep or as a swarm, as the strategy runs on real peers."""
    from cluster.real import RealOptions, run_real_arm

    run_real_arm(
        arm_plan(job.spec, job.arm), replica_specs(job.spec, job.arm), job.emit, on_step=job.on_step,
        # On a Ray cluster (RAY_ADDRESS) peers on different machines reach each other by node address.
        options=RealOptions(shaping=job.spec.run.shaping, allreduce=job.arm.allreduce,
                            host="auto" if os.environ.get("RAY_ADDRESS") else "127.0.0.1"),
        on_swarm=lambda s: _announce_swarm(job.manifest, job.arm.name, s),
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


def _run_arm(job: ArmJob, records: list[Record]) -> _ArmOutcome:
    t0 = time.perf_counter()
    retimed = driver_for(job.spec.run.mode, job.arm.algorithm)(job)
    return _ArmOutcome(records, retimed, round(time.perf_counter() - t0, 3), job.placement)


def _run_arms(spec: ExperimentSpec, runtime_name: str, metrics_path: Path, manifest: dict, progress: bool,
              corpus: Corpus | None = None, traces: dict | None = None) -> list[Record]:
    """Run every arm, side by side where the simulator's replicas are on Ray (one after another otherwise: in this
    process, and on real peers, whose shaped links would be shared unfairly by concurrent arms); writes the records
    to `metrics_path` in arm order, whatever order the arms finish in, and returns them in that order."""
    bar = _Bar(spec, progress)
    started_ray = runtime_name == "ray" and start_ray()
    try:
        with contextlib.ExitStack() as stack:
            scheduler = None
            if runtime_name == "ray" and spec.run.mode == "sim":
                scheduler = ArmScheduler.current()
                if scheduler is None:  # a sweep holds one for all its points; a run alone opens its own
                    pool = HostPool.current() or stack.enter_context(HostPool())
                    scheduler = stack.enter_context(ArmScheduler.for_cluster(pool, spec.run.workers, len(spec.arms)))
            outcomes = _outcomes(spec, runtime_name, metrics_path, manifest, bar, corpus, traces, scheduler)
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


def _outcomes(spec: ExperimentSpec, runtime_name: str, metrics_path: Path, manifest: dict, bar: _Bar,
              corpus: Corpus | None, traces: dict | None, scheduler: ArmScheduler | None) -> list[_ArmOutcome]:
    done: dict[int, _ArmOutcome] = {}
    written = [0]  # arms whose records are in the file

    def job(arm: ArmConfig, records: list[Record]) -> ArmJob:
        def on_step() -> None:
            if scheduler is not None:
                scheduler.check()  # an arm stops at its next step once the run or sweep has stopped
            bar.step()

        return ArmJob(spec, arm, runtime_name, records.append, on_step, manifest, corpus, traces, scheduler)

    with open(metrics_path, "w") as metrics:

        def finished(index: int, outcome: _ArmOutcome) -> None:
            """Write every arm whose predecessors are all written: the file is the one a sequential run writes."""
            done[index] = outcome
            bar.arm_done(outcome.retimed)
            while written[0] in done:
                metrics.writelines(json.dumps(r.to_json()) + "\n" for r in done[written[0]].records)
                written[0] += 1
            metrics.flush()

        if scheduler is None:
            for index, arm in enumerate(spec.arms):
                bar.set_description(arm.name)
                records: list[Record] = []
                finished(index, _run_arm(job(arm, records), records))
            return [done[i] for i in range(len(spec.arms))]
        if traces is not None:
            claim_traces(scheduler, spec, traces)
        bar.set_description(f"{len(spec.arms)} arms")
        with ThreadPoolExecutor(max_workers=len(spec.arms), thread_name_prefix="arm") as threads:
            futures = {}
            for index, arm in enumerate(spec.arms):
                records = []
                futures[threads.submit(_run_arm, job(arm, records), records)] = index
            try:
                for future in completed(futures):
                    finished(futures[future], future.result())
            except BaseException:
                scheduler.cancel()  # the other arms stop at their next step; the error is this one
                raise
    return [done[i] for i in range(len(spec.arms))]


def _write_results(spec: ExperimentSpec, work_dir: Path, records: list[Record], manifest: dict,
                   config_text: str) -> dict:
    """summary.json, manifest.json and the report; returns the summary."""
    arms = [
        {"name": a.name, "workers": spec.run.workers, "algorithm": a.algorithm, "network": a.network_label,
         "device": a.device, "codec": a.codec}
        for a in spec.arms
    ]
    summary = summarize(records, arms, spec.baseline.name, spec.run.target_loss)
    summary = {"experiment": spec.name, "seed": spec.run.seed, **summary}
    (work_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (work_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    write_report(work_dir, records, summary, config_text, manifest, title=f"farflung: {spec.name}")
    return summary


def choose_run_dir(spec: ExperimentSpec, out: str | Path | None) -> Path:
    if out is not None:
        run_dir = Path(out)
        if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
            raise ConfigError(f"--out: {run_dir} already exists and is not an empty folder; give a new or empty folder")
        return run_dir.resolve()
    base = PROJECT_ROOT / "results" / spec.name
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir, n = base / stamp, 1
    while run_dir.exists() or (base / f".{run_dir.name}.incomplete").exists():
        n += 1
        run_dir = base / f"{stamp}-{n}"
    return run_dir


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
        swarm=arm.swarm,
    )


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

    def arm_done(self, retimed: bool) -> None:
        if self._bar is not None:
            with self._lock:
                self._retimed += retimed
                self._trained += not retimed
                self._bar.set_postfix(arms_trained=self._trained, arms_retimed=self._retimed)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
