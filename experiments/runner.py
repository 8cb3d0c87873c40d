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
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import tomli_w

from cluster.churn import ChurnDriver, ChurnExchanges
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
from trainer.data import Corpus, load_corpus
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


def _simulate_lockstep(job: ArmJob) -> None:
    plan = arm_plan(job.spec, job.arm)
    if job.arm.faults is not None:  # who takes part depends on the clock: trained, never re-timed
        with RUNTIMES[job.runtime](replica_specs(job.spec, job.arm), corpus=job.corpus) as workers:
            ChurnDriver(workers, plan, ChurnExchanges(plan, job.arm.faults), job.emit, job.on_step).run()
        return
    if job.traces is not None and STRATEGIES[job.arm.algorithm].retimable:
        key = training_key(job.spec, job.arm)
        if key in job.traces:
            retime(job.traces[key], plan, job.emit, job.on_step)
            job.manifest.setdefault("retimed", []).append(job.arm.name)
            return
        with RUNTIMES[job.runtime](replica_specs(job.spec, job.arm), corpus=job.corpus) as workers:
            job.traces[key] = record(workers, plan, job.emit, job.on_step)
        return
    with RUNTIMES[job.runtime](replica_specs(job.spec, job.arm), corpus=job.corpus) as workers:
        LockstepDriver(workers, plan, ModelledExchanges(plan), job.emit, job.on_step).run()


def training_key(spec: ExperimentSpec, arm: ArmConfig) -> str:
    """What an arm trains, without what only sets its clock (network, devices, speed factors): two arms with the
    same key and a retimable strategy make the same steps and exchanges, bit for bit."""
    config = resolved_config(spec)
    (table,) = [a for a in config["arm"] if a["name"] == arm.name]
    clockless = {k: v for k, v in table.items() if k not in ("name", "baseline", "network", "device", "speed_factors")}
    whole = {k: config[k] for k in ("model", "data", "optim")} | {"run": config["run"], "arm": clockless}
    return json.dumps(whole, sort_keys=True)


def _simulate_collaborative(job: ArmJob) -> None:
    with RUNTIMES[job.runtime](replica_specs(job.spec, job.arm), corpus=job.corpus) as workers:
        CollaborativeDriver(workers, arm_plan(job.spec, job.arm), job.emit, job.on_step).run()


def _real_peers(job: ArmJob) -> None:
    """Real hivemind peers; `run_real_arm` drives them in lockstep or as a swarm, as the strategy runs on real peers."""
    from cluster.real import RealOptions, run_real_arm

    run_real_arm(
        arm_plan(job.spec, job.arm), replica_specs(job.spec, job.arm), job.emit, on_step=job.on_step,
        # On a Ray cluster (RAY_ADDRESS) peers on different machines reach each other by node address.
        options=RealOptions(shaping=job.spec.run.shaping, allreduce=job.arm.allreduce,
                            host="auto" if os.environ.get("RAY_ADDRESS") else "127.0.0.1"),
        on_swarm=lambda s: _announce_swarm(job.manifest, job.arm.name, s),
    )


# The driver of an arm, by mode and by how the strategy runs there: its `schedule` in the simulator, its `real_mode`
# on real peers (where local-updates runs as a hivemind.Optimizer swarm, not in lockstep).
DRIVERS: dict[tuple[str, str], Callable[[ArmJob], None]] = {
    ("sim", "lockstep"): _simulate_lockstep,
    ("sim", "collaborative"): _simulate_collaborative,
    ("real", "lockstep"): _real_peers,
    ("real", "swarm"): _real_peers,
}


def driver_for(mode: str, algorithm: str) -> Callable[[ArmJob], None]:
    strategy = STRATEGIES[algorithm]
    return DRIVERS[(mode, strategy.schedule if mode == "sim" else strategy.real_mode)]


def _run_arms(spec: ExperimentSpec, runtime_name: str, metrics_path: Path, manifest: dict, progress: bool,
              corpus: Corpus | None = None, traces: dict | None = None) -> list[Record]:
    """Run every arm in turn, writing each record to `metrics_path` as it comes; returns them all."""
    records: list[Record] = []
    bar = _progress_bar(spec, progress)
    wall: dict[str, float] = {}
    started_ray = runtime_name == "ray" and start_ray()
    # The simulator's actors serve arm after arm, so a run starts its processes once (unless a caller holds a pool).
    pooled = runtime_name == "ray" and spec.run.mode == "sim" and HostPool.current() is None
    try:
        with open(metrics_path, "w") as metrics, HostPool() if pooled else contextlib.nullcontext():

            def emit(record: Record) -> None:
                records.append(record)
                metrics.write(json.dumps(record.to_json()) + "\n")

            for arm in spec.arms:
                bar.set_description(arm.name)
                t0 = time.perf_counter()
                job = ArmJob(spec, arm, runtime_name, emit, lambda: bar.update(1), manifest, corpus, traces)
                driver_for(spec.run.mode, arm.algorithm)(job)
                wall[arm.name] = round(time.perf_counter() - t0, 3)
    finally:
        bar.close()
        if started_ray:
            import ray

            ray.shutdown()
    manifest["wall_s_per_arm"] = wall
    return records


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


class _NoProgress:
    """Stands in for a progress bar when none is wanted, so the loop never asks."""

    def update(self, n: int = 1) -> None: ...

    def set_description(self, text: str) -> None: ...

    def close(self) -> None: ...


def _progress_bar(spec: ExperimentSpec, enabled: bool):
    if not enabled:
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(total=spec.total_steps * len(spec.arms), unit="step", file=sys.stderr, dynamic_ncols=True)

