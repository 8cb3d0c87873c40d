"""`farflung sweep FILE`: one experiment over a grid of settings, each point a run folder, one table of results.

The file's `[sweep]` table maps any `--set` key to a list of values or a range, with units where the key takes them:

    [sweep]
    "arm.*.network.bandwidth" = { log = ["10Mbit", "100Gbit", 9] }
    "arm.*.network.latency" = ["1ms", "10ms", "50ms", "150ms", "300ms"]
    # zip = true pairs the keys' values instead of taking every combination

Every point is checked before anything runs: a bad key or value fails naming the key and the point. An arm whose
strategy is retimable (`Strategy.retimable`) trains once per training configuration (what it trains, not its network,
devices or speed factors) and is re-timed from that trace at every other point (`cluster.retime`). On Ray the points
run side by side, their arms sharing the cluster's CPUs (`cluster.arm_scheduler`); with `runtime = "local"` one after
another. Either way the same arms train and every point's records are the same, bit for bit. `DIR/results.csv` and
`DIR/results.jsonl` hold one row per point and arm and are rewritten whole after every point that finishes. Interrupted, `--resume DIR` runs only the points without a finished run folder; traces are kept in
`DIR/traces/` so a resumed sweep does not train again what it already trained. At the end the sweep writes
`DIR/report.html` (`experiments.sweep_report`): the frontier the file's `[frontier]` table defines, and the plots.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import itertools
import json
import math
import os
import pickle
import sys
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w

from cluster.network import parse_bandwidth, parse_duration
from cluster.replica_hosts import HostPool
from cluster.runtime import start_ray
from experiments.fields import ConfigError
from experiments.frontier import FrontierCriteria
from experiments.spec import apply_overrides, parse_spec
from experiments.sweep_report import write_sweep_report

COLUMNS = ["point", "arm", "algorithm", "final_loss", "loss_ratio", "sim_time_s", "time_ratio", "time_to_target_s",
           "bytes_sent", "compute_utilisation", "retimed", "run_dir"]
# Keys whose values carry units: the last part of the key says which parser reads "10Mbit" or "40ms".
UNITS = {"bandwidth": parse_bandwidth, "uplink": parse_bandwidth, "downlink": parse_bandwidth,
         "inter_bandwidth": parse_bandwidth, "latency": parse_duration, "jitter": parse_duration,
         "inter_latency": parse_duration}


def grid_of(table: Any) -> tuple[list[str], list[tuple]]:
    """The swept keys and the points (one value per key), from a `[sweep]` table."""
    if not isinstance(table, dict) or not table:
        raise ConfigError("sweep: the file needs a [sweep] table mapping --set keys to lists or ranges, e.g. "
                          "\"arm.*.network.latency\" = [\"10ms\", \"100ms\"]")
    zipped = table.get("zip", False)
    if not isinstance(zipped, bool):
        raise ConfigError(f"sweep.zip: must be true or false, got {zipped!r}")
    keys = [k for k in table if k != "zip"]
    if not keys:
        raise ConfigError("sweep: no keys to sweep; add e.g. \"arm.*.network.latency\" = [\"10ms\", \"100ms\"]")
    values = [_values(key, table[key]) for key in keys]
    if zipped:
        lengths = {len(v) for v in values}
        if len(lengths) > 1:
            raise ConfigError(f"sweep.zip: zipped keys need as many values each, got "
                              f"{dict(zip(keys, map(len, values)))}")
        return keys, list(zip(*values))
    return keys, list(itertools.product(*values))


def _values(key: str, spec: Any) -> list:
    if isinstance(spec, list):
        if not spec:
            raise ConfigError(f"sweep.{key}: an empty list sweeps nothing; give at least one value")
        return spec
    if isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in ("log", "linear"):
        kind, bounds = next(iter(spec.items()))
        if not (isinstance(bounds, list) and len(bounds) == 3 and isinstance(bounds[2], int)
                and not isinstance(bounds[2], bool) and bounds[2] >= 2):
            raise ConfigError(f"sweep.{key}.{kind}: must be [low, high, points] with points an integer >= 2, "
                              f"got {bounds!r}")
        low, high = (_number(key, kind, b) for b in bounds[:2])
        if kind == "log" and not 0 < low < high:
            raise ConfigError(f"sweep.{key}.log: needs 0 < low < high, got {bounds[0]!r} and {bounds[1]!r}")
        if kind == "linear" and not low < high:
            raise ConfigError(f"sweep.{key}.linear: needs low < high, got {bounds[0]!r} and {bounds[1]!r}")
        points = np.geomspace(low, high, bounds[2]) if kind == "log" else np.linspace(low, high, bounds[2])
        # Rounded to 12 significant digits: 1e7 stays 1e7 in the table, not 9999999.999999998.
        return [float(f"{p:.12g}") for p in points]
    raise ConfigError(f"sweep.{key}: must be a list of values or {{ log = [low, high, points] }} / "
                      f"{{ linear = [low, high, points] }}, got {spec!r}")


def _number(key: str, kind: str, value: Any) -> float:
    parser = UNITS.get(key.rsplit(".", 1)[-1])
    try:
        if parser is not None:
            return parser(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expected a number, got {value!r}")
        return float(value)
    except ValueError as e:
        raise ConfigError(f"sweep.{key}.{kind}: {e}") from None


def _override(key: str, value: Any) -> str:
    return f"{key}={tomli_w.dumps({'v': value})[4:].strip()}"


def point_specs(raw: dict, keys: list[str], points: list[tuple]) -> list:
    """Every point's spec, parsed before anything runs; a bad key or value names the point."""
    specs = []
    for index, values in enumerate(points):
        overrides = [_override(k, v) for k, v in zip(keys, values)]
        try:
            specs.append(parse_spec(apply_overrides(json.loads(json.dumps(raw)), overrides)))
        except ConfigError as e:
            where = ", ".join(f"{k}={v!r}" for k, v in zip(keys, values))
            raise ConfigError(f"sweep point {index} ({where}): {e}") from None
    return specs


def sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = (), out: str | Path | None = None,
          resume: str | Path | None = None, progress: bool = True, runtime: str | None = None) -> Path:
    """Run every point of the file's sweep; returns the sweep folder."""
    from experiments.runner import PROJECT_ROOT, run

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: experiment file not found; give the path of a .toml file with a [sweep] table")
    raw = apply_overrides(tomllib.loads(path.read_text(encoding="utf-8")), overrides)
    raw.setdefault("name", path.stem)
    keys, points = grid_of(raw.pop("sweep", None))
    criteria = FrontierCriteria.parse(raw.pop("frontier", None))
    specs = point_specs(raw, keys, points)
    out_dir = _sweep_dir(specs[0].name, out, resume, PROJECT_ROOT)
    grid = {"file": str(path), "overrides": list(overrides), "keys": keys, "points": [list(p) for p in points],
            "frontier": dataclasses.asdict(criteria), "baseline": specs[0].baseline.name}
    _check_resume(out_dir, grid)
    traces = _Traces(out_dir / "traces")
    rows: dict[int, list[dict]] = {}
    bar = _bar(len(points), progress)
    todo = [i for i in range(len(points)) if not (_point_dir(out_dir, i) / "summary.json").is_file()]

    def finished(index: int) -> None:
        traces.save()
        rows[index] = _rows(index, dict(zip(keys, points[index])), _point_dir(out_dir, index))
        _write_results(out_dir, keys, rows)
        bar.update(1)
        retimed = sum(r["retimed"] for rs in rows.values() for r in rs)
        bar.set_postfix(arms_trained=sum(map(len, rows.values())) - retimed, arms_retimed=retimed)

    for index in range(len(points)):
        if index not in todo:
            finished(index)
    # One Ray and one set of simulator actors for the whole sweep, not a start and stop per point.
    on_ray = (runtime or specs[0].run.runtime) == "ray" and specs[0].run.mode == "sim"
    started_ray = on_ray and start_ray()
    try:
        if on_ray:
            _run_side_by_side(run, [(i, specs[i]) for i in todo], out_dir, runtime, traces, finished)
        else:
            for index in todo:
                run(specs[index], out=_point_dir(out_dir, index), runtime=runtime, traces=traces)
                finished(index)
    finally:
        # Points that finished while another failed were not counted above; their traces are whole: keep them.
        traces.save()
        bar.close()
        if started_ray:
            import ray

            ray.shutdown()
    write_sweep_report(out_dir)
    return out_dir


def _point_dir(out_dir: Path, index: int) -> Path:
    return out_dir / "points" / f"{index:04d}"


def _run_side_by_side(run, todo: list, out_dir: Path, runtime: str | None, traces: dict, finished) -> None:
    """The points on Ray, as many at once as the scheduler has slots for their arms (and a few more, so that a
    point that only re-times never waits behind one that trains); each point's arms side by side within it.

    Which arm trains each configuration is claimed in point order before any point starts, so the same arms train
    as when the points run one after another. A point's folder is complete when its run returns, in any order."""
    from cluster.arm_scheduler import ArmScheduler, completed
    from experiments.arms import STRATEGIES, claim_traces, training_key

    if not todo:
        return
    first = todo[0][1]
    trained = {training_key(spec, arm) if STRATEGIES[arm.algorithm].retimable else (i, arm.name)
               for i, spec in todo for arm in spec.arms}
    with HostPool() as pool, ArmScheduler.for_cluster(pool, first.run.workers, len(trained)) as scheduler:
        for _, spec in todo:
            claim_traces(scheduler, spec, traces)
        in_flight = max(2, 2 * scheduler.concurrency)
        with ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="point") as threads:
            futures = {threads.submit(run, spec, out=_point_dir(out_dir, i), runtime=runtime, traces=traces): i
                       for i, spec in todo}
            try:
                for future in completed(futures):
                    future.result()
                    finished(futures[future])
            except BaseException:
                scheduler.cancel()  # running arms stop at their next step, points not begun never begin
                for future in futures:
                    future.cancel()
                raise


class _Traces(dict):
    """Recorded lockstep arms by training configuration, also on disk (one pickle per configuration, written whole
    under a temporary name and renamed, so an interrupted sweep never leaves half a trace)."""

    def __init__(self, folder: Path):
        super().__init__()
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        for file in sorted(folder.glob("*.pkl")):
            key, trace = pickle.loads(file.read_bytes())
            self[key] = trace

    def save(self) -> None:
        for key, trace in list(self.items()):  # arms of points still running may add traces meanwhile
            file = self.folder / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.pkl"
            if not file.exists():
                partial = file.with_suffix(".partial")
                partial.write_bytes(pickle.dumps((key, trace)))
                os.replace(partial, file)


def _sweep_dir(name: str, out, resume, root: Path) -> Path:
    if resume is not None:
        folder = Path(resume)
        if not (folder / "grid.json").is_file():
            raise ConfigError(f"--resume: {folder} holds no sweep (no grid.json); give the folder a sweep wrote")
        return folder
    folder = Path(out) if out is not None else root / "results" / name / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    if folder.exists() and any(folder.iterdir()):
        raise ConfigError(f"--out: {folder} already holds files; give a new or empty folder, or --resume it")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _check_resume(folder: Path, grid: dict) -> None:
    stored = folder / "grid.json"
    if stored.is_file():
        before = json.loads(stored.read_text())
        if before != grid:
            raise ConfigError(f"--resume: {folder} swept another grid ({before['file']}, keys {before['keys']}); "
                              "resume with the same file and --set values, or start a new sweep")
        return
    _atomic_write(stored, json.dumps(grid, indent=1) + "\n")


def _rows(index: int, swept: dict, run_dir: Path) -> list[dict]:
    summary = json.loads((run_dir / "summary.json").read_text())
    retimed = set(json.loads((run_dir / "manifest.json").read_text()).get("retimed", []))
    return [
        {"point": index, "arm": name, "algorithm": arm["algorithm"], **swept, "final_loss": arm["final_loss"],
         "loss_ratio": arm["loss_ratio"], "sim_time_s": arm["time_s"], "time_ratio": arm["time_ratio"],
         "time_to_target_s": arm["time_to_target_s"], "bytes_sent": arm["bytes_sent"],
         "compute_utilisation": arm["compute_utilisation"], "retimed": name in retimed, "run_dir": str(run_dir)}
        for name, arm in summary["arms"].items()
    ]


def _write_results(folder: Path, keys: list[str], rows: dict[int, list[dict]]) -> None:
    ordered = [row for index in sorted(rows) for row in rows[index]]
    _atomic_write(folder / "results.jsonl", "".join(json.dumps(row) + "\n" for row in ordered))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS[:3] + keys + COLUMNS[3:], lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else v) for k, v in row.items()}
                     for row in ordered)
    _atomic_write(folder / "results.csv", text.getvalue())


def _atomic_write(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


class _NoBar:
    def update(self, n: int = 1) -> None: ...

    def set_postfix(self, **values) -> None: ...

    def close(self) -> None: ...


def _bar(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="point", file=sys.stderr, dynamic_ncols=True)
