"""What a run was made with: versions, commit, corpus, seed, mode and how links were shaped."""

from __future__ import annotations

import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

PACKAGES = ("farflung", "torch", "hivemind", "ray", "numpy", "matplotlib")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_state(root: Path) -> dict[str, object]:
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def build_manifest(spec, corpus, runtime: str, root: Path) -> dict:
    import os

    return {
        "experiment": spec.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": sys.argv,
        "mode": spec.run.mode,
        "seed": spec.run.seed,
        # In the simulator no byte crosses a real link: durations come from the network model.
        "shaping_backend": "virtual-clock (alpha-beta network model; no real traffic)",
        "runtime": runtime,
        "ray_address": os.environ.get("RAY_ADDRESS") if runtime == "ray" else None,
        "git": git_state(root),
        "packages": package_versions(),
        "platform": platform.platform(),
        "corpus": {
            "name": corpus.name,
            "sha256": corpus.sha256,
            "bytes": corpus.n_bytes,
            "train_bytes": int(corpus.train.size),
            "heldout_bytes": int(corpus.heldout.size),
            "description": corpus.description,
            "entropy_rate_nats": corpus.entropy_rate_nats,
        },
        "steps": spec.total_steps,
        "tokens_per_step": spec.tokens_per_step,
    }
