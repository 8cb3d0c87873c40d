"""A run folder's checkpoints, and what `farflung run --resume DIR` continues from.

While a run is under way its folder is `.NAME.incomplete` (see `experiments.runner`); inside it:

    config.toml, manifest.json     written before the first arm starts
    metrics.jsonl                  one line per record, appended; flushed and fsynced before any checkpoint names it
    checkpoints/arm-NN/done.json   arm NN (its index in the file) is complete: its record count and wall seconds
    checkpoints/arm-NN/step-SSSSSSS/   arm NN's latest checkpoint, at the boundary before step S (epoch S for a
                                       collaborative arm), its evaluation at S (if any) written
        driver.pt                  the driver's position and its exchanges' state (torch.save, plain values)
        replica-WWWW.pt            worker W's `Replica.state_dict()`
        complete.json              written last: arm, step, the arm's records so far, wall seconds, each file's size

Every file is written whole under a temporary name, fsynced and renamed; a checkpoint is built in a hidden
`.step-S.partial` folder and renamed once `complete.json` is in it, so a `step-S` folder is always complete. An older
checkpoint is deleted only after the new one is in place. A kill at any moment leaves metrics.jsonl with at most a
torn last line and records written after the last checkpoint: resuming keeps, per arm, exactly the records its
checkpoint counted (all of a complete arm's), rewrites the file with them, and continues from there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import torch

from cluster.checkpoint import Checkpoints
from cluster.records import Record, from_json
from experiments.fields import ConfigError

INCOMPLETE = re.compile(r"^\.(?P<name>.+)\.incomplete$")
_STEP = re.compile(r"^step-(?P<step>\d{7})$")


def write_atomic(path: Path, data: bytes | str) -> None:
    """`path` holds either its old content or all of `data`, whenever the process is killed."""
    partial = path.with_name(f".{path.name}.partial")
    with open(partial, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def incomplete_dir(run_dir: Path) -> Path:
    return run_dir.parent / f".{run_dir.name}.incomplete"


def find_incomplete(folder: str | Path) -> tuple[Path, Path]:
    """The incomplete folder `--resume DIR` names, and the run folder it becomes; ConfigError if there is none.

    DIR is the folder given to `--out` (or printed by the run) or the `.NAME.incomplete` folder itself."""
    folder = Path(folder).resolve()
    match = INCOMPLETE.match(folder.name)
    work_dir, run_dir = (folder, folder.parent / match["name"]) if match else (incomplete_dir(folder), folder)
    if (run_dir / "summary.json").is_file() and not (work_dir / "config.toml").is_file():
        raise ConfigError(f"--resume: {run_dir} is a complete run (it has summary.json); nothing to resume")
    if not (work_dir / "config.toml").is_file():
        raise ConfigError(f"--resume: {folder} is not an interrupted run (no {work_dir.name} with a config.toml "
                          "beside it); give the folder passed to --out, or the .NAME.incomplete folder")
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise ConfigError(f"--resume: {run_dir} already exists and is not empty; move it away to finish the run")
    return work_dir, run_dir


class MetricsLog:
    """metrics.jsonl, appended one whole line per write; `sync` makes every line so far durable."""

    def __init__(self, path: Path, counts: dict[str, int] | None = None):
        self.file = open(path, "a", encoding="utf-8")
        self.counts: dict[str, int] = dict(counts or {})  # records written per arm, those kept on resume included

    def write(self, record: Record) -> None:
        self.file.write(json.dumps(record.to_json()) + "\n")
        self.counts[record.arm] = self.counts.get(record.arm, 0) + 1

    def sync(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.sync()
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class RunCheckpoints:
    """The checkpoints of one incomplete run folder (`work_dir`), arm by arm."""

    def __init__(self, work_dir: Path):
        self.work_dir = work_dir
        self.root = work_dir / "checkpoints"

    def arm_dir(self, index: int) -> Path:
        return self.root / f"arm-{index:02d}"

    def done(self, index: int) -> dict | None:
        """The completion marker of arm `index`, or None if it has not finished."""
        path = self.arm_dir(index) / "done.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def mark_done(self, index: int, arm: str, records: int, wall_s: float) -> None:
        folder = self.arm_dir(index)
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / "done.json", json.dumps({"arm": arm, "records": records, "wall_s": wall_s}) + "\n")
        self._remove_steps(folder)

    def latest(self, index: int) -> tuple[Path, dict] | None:
        """Arm `index`'s latest complete checkpoint folder and its `complete.json`, or None."""
        folder = self.arm_dir(index)
        found = sorted(p for p in folder.glob("step-*") if _STEP.match(p.name)) if folder.is_dir() else []
        for path in reversed(found):
            manifest = path / "complete.json"
            if manifest.is_file():
                return path, json.loads(manifest.read_text())
        return None

    def _remove_steps(self, folder: Path, keep: Path | None = None) -> None:
        for path in folder.glob("*step-*"):
            if path != keep:
                shutil.rmtree(path, ignore_errors=True)

    def position(self, arms: list[str]) -> list[dict]:
        """Per arm, where a resume picks it up: {"done": bool, "step": int, "records": int}."""
        out = []
        for index, arm in enumerate(arms):
            done = self.done(index)
            if done is not None:
                self._check_arm(done, arm, index)
                out.append({"done": True, "step": None, "records": done["records"], "wall_s": done["wall_s"]})
                continue
            latest = self.latest(index)
            if latest is None:
                out.append({"done": False, "step": 0, "records": 0, "wall_s": 0.0})
            else:
                self._check_arm(latest[1], arm, index)
                out.append({"done": False, "step": latest[1]["step"], "records": latest[1]["records"],
                            "wall_s": latest[1]["wall_s"]})
        return out

    def _check_arm(self, saved: dict, arm: str, index: int) -> None:
        if saved["arm"] != arm:
            raise ConfigError(f"--resume: checkpoint arm-{index:02d} belongs to arm {saved['arm']!r}, but config.toml's "
                              f"arm {index} is {arm!r}; the folder was changed, start the run again")

    def keep_records(self, arms: list[str], positions: list[dict]) -> list[Record]:
        """Rewrite metrics.jsonl with the records the checkpoints counted (a torn last line and anything written
        after an arm's last checkpoint dropped) and return them in file order."""
        path = self.work_dir / "metrics.jsonl"
        data = path.read_bytes() if path.is_file() else b""
        lines = data.split(b"\n")[:-1]  # the piece after the last newline is empty, or a torn line
        wanted = {arm: p["records"] for arm, p in zip(arms, positions)}
        seen = dict.fromkeys(arms, 0)
        kept: list[bytes] = []
        for line in lines:
            try:
                arm = json.loads(line)["arm"]
            except (ValueError, KeyError, TypeError):
                break  # only a line cut by a kill can be unreadable, and nothing after it was synced
            if seen.get(arm, 0) < wanted.get(arm, 0):
                kept.append(line)
            seen[arm] = seen.get(arm, 0) + 1
        short = [arm for arm in arms if seen[arm] < wanted[arm]]
        if short:
            raise ConfigError(f"--resume: metrics.jsonl holds fewer records of arm {short[0]!r} than its checkpoint "
                              "counted; the folder was changed, start the run again")
        write_atomic(path, b"".join(line + b"\n" for line in kept))
        for folder in self.root.glob("arm-*/.step-*.partial"):
            shutil.rmtree(folder, ignore_errors=True)
        return [from_json(json.loads(line)) for line in kept]


class ArmCheckpoints(Checkpoints):
    """Writes and restores one arm's checkpoints (`cluster.checkpoint.Checkpoints`) in the run folder."""

    def __init__(self, run: RunCheckpoints, index: int, arm: str, metrics: MetricsLog, every: int,
                 wall_s: float = 0.0):
        super().__init__(every)
        self.run, self.index, self.arm, self.metrics = run, index, arm, metrics
        self.folder = run.arm_dir(index)
        self.wall_before_s = wall_s  # spent on this arm before the checkpoint it resumes from
        self.started = time.perf_counter()

    @property
    def wall_s(self) -> float:
        return self.wall_before_s + time.perf_counter() - self.started

    def restore(self, driver) -> int:
        latest = self.run.latest(self.index)
        if latest is None:
            return 0
        path, manifest = latest
        for name, size in manifest["files"].items():
            if (path / name).stat().st_size != size:
                raise ConfigError(f"--resume: {path / name} is not the size its checkpoint recorded; the folder was "
                                  "changed, start the run again")
        saved = _load(path / "driver.pt")
        workers = [_load(path / f"replica-{w:04d}.pt") for w in range(driver.plan.n_workers)]
        driver.load_state_dict(saved["driver"])
        driver.workers.call("load_state_dict", [(state,) for state in workers])
        return manifest["step"]

    def save(self, driver, step: int) -> None:
        states = driver.workers.call("state_dict")
        self.metrics.sync()  # the records this checkpoint counts are on disk before it exists
        name = f"step-{step:07d}"
        partial = self.folder / f".{name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        files = {f"replica-{w:04d}.pt": state for w, state in enumerate(states)}
        files["driver.pt"] = {"arm": self.arm, "step": step, "driver": driver.state_dict()}
        sizes = {file: _save(partial / file, state) for file, state in files.items()}
        manifest = {"arm": self.arm, "step": step, "records": self.metrics.counts.get(self.arm, 0),
                    "wall_s": round(self.wall_s, 3), "files": sizes}
        write_atomic(partial / "complete.json", json.dumps(manifest, indent=1) + "\n")
        final = self.folder / name
        os.rename(partial, final)
        fsync_dir(self.folder)
        self.run._remove_steps(self.folder, keep=final)


def _save(path: Path, state) -> int:
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    return path.stat().st_size


def _load(path: Path):
    # Checkpoints hold tensors and plain values only: nothing in them runs code when read.
    return torch.load(path, weights_only=True)

