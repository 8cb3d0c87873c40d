"""Runs every arm of an experiment and leaves a complete run folder, or none that claims to be.

The folder is written under a hidden `.NAME.incomplete` name and renamed only when everything in
it is written, so a crash or Ctrl-C never leaves something that looks like a finished run. Until
then it holds the finished arms and, with `run.checkpoint_every`, the latest checkpoint of the arm
under way, from which `resume` continues (`experiments.checkpoint`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import tomli_w

from cluster.checkpoint import NO_CHECKPOINTS, Checkpoints
from cluster.collaborative import CollaborativeDriver
from cluster.devices import get_device
from cluster.driver import ArmPlan, LockstepDriver
from cluster.records import Record
from cluster.replica_hosts import HostPool
from cluster.retime import record, retime
from cluster.runtime import RUNTIMES, start_ray
from cluster.sim import ModelledExchanges
from experiments.checkpoint import (ArmCheckpoints, MetricsLog, RunCheckpoints, find_incomplete, incomplete_dir,
                                    write_atomic)
from experiments.fields import ConfigError
from experiments.manifest import build_manifest, git_state
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


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a run; `hint` says what was kept and how to continue."""

    def __init__(self, hint: str, terminated: bool = False):
        super().__init__(hint)
        self.hint, self.terminated = hint, terminated


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
    work_dir = incomplete_dir(run_dir)
    if work_dir.exists():
        # A sweep runs an interrupted point again whole; anything else may be resumed, so it is never thrown away.
        if traces is None and (work_dir / "config.toml").is_file():
            raise ConfigError(f"--out: {run_dir} has an interrupted run in {work_dir.name}; continue it with "
                              f"farflung run --resume {run_dir}, or delete {work_dir} to start again")
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True)

    config_text = tomli_w.dumps(resolved_config(spec))
    manifest = build_manifest(spec, corpus, runtime_name, PROJECT_ROOT)
    if spec.run.mode == "real":
        from cluster.real import describe_shaping

        manifest["shaping_backend"] = describe_shaping(spec.run.shaping)
        manifest["runtime"] = runtime_name = "ray"
    write_atomic(work_dir / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    write_atomic(work_dir / "config.toml", config_text)  # last: it makes the folder one that can be resumed
    return _complete(spec, runtime_name, run_dir, work_dir, manifest, config_text, progress, corpus, traces)


def resume(folder: str | Path, progress: bool = False, runtime: str | None = None) -> RunResult:
    """Continue an interrupted run from its last checkpoint (`folder`: its --out folder or its incomplete folder).

    In the simulator the result equals, bit for bit, that of a run never interrupted: finished arms are kept, the
    arm under way continues from its latest checkpoint (from its start without one), the rest run as usual."""
    work_dir, run_dir = find_incomplete(folder)
    spec = load_spec(work_dir / "config.toml")
    config_text = (work_dir / "config.toml").read_text()
    corpus = load_corpus(spec.data, spec.run.seed)
    manifest_path = work_dir / "manifest.json"
    manifest = (json.loads(manifest_path.read_text()) if manifest_path.is_file()
                else build_manifest(spec, corpus, runtime or spec.run.runtime, PROJECT_ROOT))
    runtime_name = runtime or manifest["runtime"]
    if runtime_name not in RUNTIMES or (spec.run.mode == "real" and runtime_name != "ray"):
        raise ConfigError(f"--runtime: must be one of {', '.join(RUNTIMES)} (ray in real mode), got {runtime_name!r}")
    positions = RunCheckpoints(work_dir).position([a.name for a in spec.arms])
    print(f"farflung: resuming {run_dir}: " + "; ".join(_resume_plan(spec, positions)), file=sys.stderr, flush=True)
    manifest.setdefault("resumed", []).append({
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "runtime": runtime_name, "git": git_state(PROJECT_ROOT),
        "from": {a.name: "done" if p["done"] else p["step"] for a, p in zip(spec.arms, positions)}})
    write_atomic(manifest_path, json.dumps(manifest, indent=2) + "\n")
    return _complete(spec, runtime_name, run_dir, work_dir, manifest, config_text, progress, corpus, None)


def _resume_plan(spec: ExperimentSpec, positions: list[dict]) -> list[str]:
    """What a resume does with each arm, in words."""
    plan = []
    for arm, p in zip(spec.arms, positions):
        unit = "epoch" if STRATEGIES[arm.algorithm].schedule == "collaborative" else "step"
        if p["done"]:
            plan.append(f"{arm.name} complete")
        elif spec.run.mode == "real" and p["records"] == 0:
            plan.append(f"{arm.name} on real peers from step 0 (real peers' state is not checkpointed)")
        elif p["step"]:
            plan.append(f"{arm.name} from its checkpoint at {unit} {p['step']}")
        else:
            plan.append(f"{arm.name} from {unit} 0")
    return plan


def _complete(spec: ExperimentSpec, runtime_name: str, run_dir: Path, work_dir: Path, manifest: dict,
              config_text: str, progress: bool, corpus: Corpus, traces: dict | None) -> RunResult:
    """Run what is left of the arms in `work_dir`, write the results and rename it to `run_dir`."""
    try:
        records = _run_arms(spec, runtime_name, work_dir, manifest, progress, corpus, traces)
    except (KeyboardInterrupt, SystemExit) as e:
        # ray.init makes SIGTERM exit with status 15 (SIGTERM's number); the CLI's handler raises KeyboardInterrupt.
        if isinstance(e, SystemExit) and e.code != signal.SIGTERM:
            raise
        terminated = isinstance(e, SystemExit) or getattr(e, "terminated", False)
        raise RunInterrupted(_interrupted_hint(spec, run_dir, work_dir), terminated) from None
    summary = _write_results(spec, work_dir, records, manifest, config_text)
    if run_dir.is_dir():
        run_dir.rmdir()  # an empty --out folder, checked at the start
    work_dir.rename(run_dir)
    # Only now: until the rename, a kill leaves the folder resumable. A kill here leaves a finished run with them.
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return RunResult(run_dir, summary)


def _interrupted_hint(spec: ExperimentSpec, run_dir: Path, work_dir: Path) -> str:
    positions = RunCheckpoints(work_dir).position([a.name for a in spec.arms])
    kept = [f"{a.name} complete" if p["done"] else f"{a.name} to step {p['step']}"
            for a, p in zip(spec.arms, positions) if p["done"] or p["step"]]
    return (f"interrupted; kept in {work_dir}: {', '.join(kept) or 'no checkpoint yet'}; continue with "
            f"farflung run --resume {run_dir}")


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
    checkpoints: Checkpoints = NO_CHECKPOINTS  # where a simulated arm saves its state and resumes from


def _simulate_lockstep(job: ArmJob) -> None:
    plan = arm_plan(job.spec, job.arm)
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
        LockstepDriver(workers, plan, ModelledExchanges(plan), job.emit, job.on_step, job.checkpoints).run()


def training_key(spec: ExperimentSpec, arm: ArmConfig) -> str:
    """What an arm trains, without what only sets its clock (network, devices, speed factors): two arms with the
    same key and a retimable strategy make the same steps and exchanges, bit for bit."""
    config = resolved_config(spec)
    (table,) = [a for a in config["arm"] if a["name"] == arm.name]
    clockless = {k: v for k, v in table.items() if k not in ("name", "baseline", "network", "device", "speed_factors")}
    run = {k: v for k, v in config["run"].items() if k != "checkpoint_every"}  # saving state changes no number
    whole = {k: config[k] for k in ("model", "data", "optim")} | {"run": run, "arm": clockless}
    return json.dumps(whole, sort_keys=True)


def _simulate_collaborative(job: ArmJob) -> None:
    with RUNTIMES[job.runtime](replica_specs(job.spec, job.arm), corpus=job.corpus) as workers:
        CollaborativeDriver(workers, arm_plan(job.spec, job.arm), job.emit, job.on_step, job.checkpoints).run()


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


def _run_arms(spec: ExperimentSpec, runtime_name: str, work_dir: Path, manifest: dict, progress: bool,
              corpus: Corpus | None = None, traces: dict | None = None) -> list[Record]:
    """Run every arm in turn that `work_dir` does not hold finished, writing each record to its metrics.jsonl as it
    comes; returns them all (those of the finished arms and checkpoints first)."""
    saved = RunCheckpoints(work_dir)
    names = [a.name for a in spec.arms]
    positions = saved.position(names)
    records: list[Record] = saved.keep_records(names, positions)
    # A sweep's trace is recorded from an arm's first step: an arm that records or replays one never stops early.
    every = spec.run.checkpoint_every if traces is None and spec.run.mode == "sim" else 0
    bar = _progress_bar(spec, progress)
    wall: dict[str, float] = {}
    started_ray = runtime_name == "ray" and start_ray()
    # The simulator's actors serve arm after arm, so a run starts its processes once (unless a caller holds a pool).
    pooled = runtime_name == "ray" and spec.run.mode == "sim" and HostPool.current() is None
    try:
        counts = {name: p["records"] for name, p in zip(names, positions)}
        with (MetricsLog(work_dir / "metrics.jsonl", counts) as metrics,
              HostPool() if pooled else contextlib.nullcontext()):

            def emit(record: Record) -> None:
                records.append(record)
                metrics.write(record)

            for index, arm in enumerate(spec.arms):
                if positions[index]["done"]:
                    wall[arm.name] = positions[index]["wall_s"]
                    bar.update(spec.total_steps)
                    continue
                bar.set_description(arm.name)
                checkpoints = ArmCheckpoints(saved, index, arm.name, metrics, every, positions[index]["wall_s"])
                job = ArmJob(spec, arm, runtime_name, emit, lambda: bar.update(1), manifest, corpus, traces,
                             checkpoints)
                driver_for(spec.run.mode, arm.algorithm)(job)
                wall[arm.name] = round(checkpoints.wall_s, 3)
                metrics.sync()
                saved.mark_done(index, arm.name, metrics.counts.get(arm.name, 0), wall[arm.name])
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
    write_atomic(work_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_atomic(work_dir / "manifest.json", json.dumps(manifest, indent=2) + "\n")
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

