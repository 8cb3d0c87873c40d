"""Runs every arm of an experiment and leaves a complete run folder, or none that claims to be.

The folder is written under a hidden `.NAME.incomplete` name and renamed only when everything in
it is written, so a crash or Ctrl-C never leaves something that looks like a finished run. Until
then it holds the finished arms and, with `run.checkpoint_every`, the latest checkpoint of the arm
under way, from which `resume` continues (`experiments.checkpoint`).
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import NamedTuple

import tomli_w

from cluster.records import Record
from cluster.runtime import RUNTIMES
from experiments.arms import run_arms
from experiments.checkpoint import RunCheckpoints, find_incomplete, incomplete_dir, write_atomic
from experiments.fields import ConfigError
from experiments.manifest import build_manifest, git_state
from experiments.report import write_report
from experiments.resolved import resolved_config
from experiments.spec import ExperimentSpec, load_spec
from experiments.summary import summarize
from trainer.data import Corpus, check_fits, load_corpus
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
        records = run_arms(spec, runtime_name, work_dir, manifest, progress, corpus, traces)
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


