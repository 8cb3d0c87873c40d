"""The estimate against published runs: experiments/published/calibration.toml in, CALIBRATION.md's table out.

`python -m experiments.calibration` prints the table; tests/experiments/test_calibration.py checks that the markdown
holds exactly what it prints, so the document cannot drift from the code.
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

from cluster import estimate as cost
from experiments.estimate import add_arguments, arm_from_flags, estimate_arm, solve

INPUTS = Path(__file__).resolve().parent / "published" / "calibration.toml"
DOCUMENT = Path(__file__).resolve().parent / "CALIBRATION.md"
_NOT_FLAGS = ("name", "study", "source", "metric", "reported", "assumed")
# Utilisation (0-1), wall time of the run and seconds of one synchronisation between workers.
METRICS = ("compute_utilisation", "wall_s", "exchange_s")
_NETWORK_INPUTS = ("bandwidth", "latency", "network")


def load_runs(path: Path = INPUTS) -> list[dict]:
    runs = tomllib.loads(path.read_text(encoding="utf-8"))["run"]
    for run in runs:
        assert run["metric"] in METRICS, f"{run['name']}: metric must be one of {METRICS}"
    return runs


def arm_of(run: dict):
    """The run's arm, through the same parser as `farflung estimate --params ...`."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = [part for key, value in run.items() if key not in _NOT_FLAGS
            for part in (f"--{key.replace('_', '-')}", str(value))]
    return arm_from_flags(parser.parse_args(argv))


def row(run: dict) -> dict:
    arm = arm_of(run)
    est = estimate_arm(arm)
    if run["metric"] == "compute_utilisation":
        estimate, reported = est.compute_utilisation, run["reported"]
        implied = solve(arm, "bandwidth", reported).value
        return {"estimate": f"{estimate:.1%}", "reported": f"{reported:.1%}",
                "error": f"{100 * (estimate - reported):+.1f} points",
                "implied": "unreachable" if implied is None else _bits(implied)}
    if run["metric"] == "exchange_s":
        estimate, reported = est.exchange_s, run["reported"]
        implied = bandwidth_for_exchange(arm, reported).value
        return {"estimate": _seconds(estimate), "reported": _seconds(reported),
                "error": f"{estimate / reported - 1:+.0%}",
                "implied": "unreachable" if implied is None else _bits(implied)}
    estimate, reported = est.wall_s, run["reported"]
    return {"estimate": f"{estimate / 86400:.1f} days", "reported": f"{reported / 86400:.1f} days",
            "error": f"{estimate / reported - 1:+.0%}", "implied": "-"}


def bandwidth_for_exchange(arm, seconds: float) -> cost.Solved:
    """The least bandwidth (every worker's link) at which one synchronisation takes at most `seconds`: the solver
    finds where a quantity that grows with bandwidth reaches its target, and minus the exchange time is one."""
    return cost.solve_bandwidth(lambda network: -estimate_arm(arm, network).exchange_s, arm.network, -seconds)


def _seconds(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds >= 100 else f"{seconds:.1f} s"


def _bits(bps: float) -> str:
    return f"{bps / 1e9:.2f} Gbit/s" if bps >= 1e9 else f"{bps / 1e6:.0f} Mbit/s"


def _network(run: dict) -> str:
    link = f"preset {run['network']}" if "network" in run else f"{run['bandwidth']}/s, {run['latency']} access latency"
    assumed = any(item.split()[0] in _NETWORK_INPUTS for item in run["assumed"])
    return f"{link} ({'assumed' if assumed else 'measured'})"


def table(runs: list[dict] | None = None) -> str:
    runs = load_runs() if runs is None else runs
    lines = ["| run | model | hardware | network | algorithm, codec | reported | farflung | error | "
             "bandwidth for the reported figure |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        r = row(run)
        algorithm = f"{run['algorithm']} H={run['inner_steps']}" if "inner_steps" in run else run["algorithm"]
        lines.append(
            f"| {run['name']} | {run['params'] / 1e9:.3g}B | {run['workers']} x {run['devices_per_worker']} "
            f"{run['device']} | {_network(run)} | {algorithm}, {run['codec']} | {r['reported']} | {r['estimate']} | "
            f"{r['error']} | {r['implied']} |")
    return "\n".join(lines)


def document_table(path: Path = DOCUMENT) -> str:
    """The table between the markers of CALIBRATION.md."""
    text = path.read_text(encoding="utf-8")
    start = text.index("<!-- table: python -m experiments.calibration -->\n") + len(
        "<!-- table: python -m experiments.calibration -->\n")
    return text[start:text.index("\n<!-- end of table -->", start)]


if __name__ == "__main__":
    print(table())
