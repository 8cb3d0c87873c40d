"""`farflung run FILE`, `demo`, `fidelity FILE`, `estimate`, `algorithms`, `join`, `doctor`: the command line over
`experiments.run`, `experiments.estimate` and the real mode's volunteer commands (`cluster.real.join`,
`cluster.real.doctor`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from experiments.fields import ConfigError

DEMO = Path(__file__).resolve().parent / "demo.toml"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="farflung", description="Far-flung training testbed.")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run every arm of an experiment file")
    run.add_argument("file", nargs="?", help="experiment file (.toml)")
    run.add_argument("--resume", metavar="DIR", help="continue an interrupted run from its last checkpoint (DIR: the "
                     "folder given to --out, or its .NAME.incomplete folder); no FILE, --set or --out with it")
    demo = sub.add_parser("demo", help="run experiments/demo.toml")
    sw = sub.add_parser("sweep", help="run an experiment over the grid of its [sweep] table")
    sw.add_argument("file", help="experiment file (.toml) with a [sweep] table")
    sw.add_argument("--resume", metavar="DIR", help="finish an interrupted sweep: run only its unfinished points")
    rep = sub.add_parser("report", help="write a sweep folder's report.html (frontier, plots, table) again")
    rep.add_argument("folder", help="a folder `farflung sweep` wrote")
    fid = sub.add_parser("fidelity", help="run an experiment in the simulator and on real peers, and compare")
    fid.add_argument("file", help="experiment file (.toml); its arms must run in real mode (see farflung algorithms)")
    fid.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    fid.add_argument("--out", help="folder to create (default results/<experiment>/fidelity-<timestamp>)")
    from experiments import estimate

    estimate.add_arguments(sub.add_parser("estimate", help="estimate utilisation and time at any scale, no training"))
    algorithms = sub.add_parser("algorithms", help="list every algorithm with its settings, defaults and ranges")
    algorithms.add_argument("--json", action="store_true", help="print the list as JSON")
    from cluster.real import doctor, join

    join.add_arguments(sub.add_parser("join", help="join a running real experiment from this machine (no Ray needed)"))
    doctor.add_arguments(sub.add_parser("doctor", help="check that this machine can take part in a real run"))
    for s in (run, demo, sw):
        s.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a setting, e.g. run.tokens=200000 or arm.diloco-home.device=h100 (repeatable)")
        s.add_argument("--out", help="run folder to create (default results/<experiment>/<timestamp>)")
        s.add_argument("--runtime", choices=["ray", "local"], help="where workers run (default: the file's run.runtime)")
        s.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command in ("run", "demo", "sweep"):
        _interrupt_on_sigterm()
    try:
        if args.command == "fidelity":
            return _fidelity(args)
        if args.command == "algorithms":
            return _algorithms(args)
        if args.command == "estimate":
            from experiments import estimate

            return estimate.main(args)
        if args.command == "sweep":
            return _sweep(args)
        if args.command == "report":
            from experiments.sweep_report import write_sweep_report

            if not (Path(args.folder) / "grid.json").is_file():
                raise ConfigError(f"report: {args.folder} is not a sweep folder (no grid.json); give the folder "
                                  "`farflung sweep` printed")
            print(write_sweep_report(args.folder))
            return 0
        if args.command in ("join", "doctor"):
            from cluster.real import doctor, join

            return {"join": join, "doctor": doctor}[args.command].main(args)
        return _run(args)
    except ConfigError as e:
        print(f"farflung: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        hint = getattr(e, "hint", "interrupted; nothing was completed (a run folder is renamed only once whole)")
        print(f"farflung: {hint}", file=sys.stderr)
        return 143 if getattr(e, "terminated", False) else 130


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is: every process the run started is stopped and what it finished is kept."""

    terminated = True


def _interrupt_on_sigterm() -> None:
    import signal
    import threading

    def terminate(signum, frame):
        raise Terminated()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, terminate)


def _run(args) -> int:
    from experiments.runner import resume, run

    if args.command == "run" and args.resume is not None:
        given = [flag for flag, value in (("FILE", args.file), ("--set", args.overrides), ("--out", args.out)) if value]
        if given:
            raise ConfigError(f"--resume: the run's own config.toml says what it runs; drop {', '.join(given)}")
        result = resume(args.resume, progress=not args.quiet, runtime=args.runtime)
        print_summary(result.summary)
        print(result.run_dir)
        return 0
    if args.command == "run" and args.file is None:
        raise ConfigError("run: give an experiment FILE, or --resume DIR to continue an interrupted run")
    path = DEMO if args.command == "demo" else args.file
    if args.command == "run":
        from experiments import estimate
        from experiments.spec import load_spec

        if load_spec(path, args.overrides).run.mode == "estimate":  # nothing trains: the arms are estimated
            for arm, row in zip(arms := estimate.load_arms(path, args.overrides), estimate.arm_rows(arms)):
                print(estimate.describe(arm, row))
            return 0
    result = run(path, args.overrides, out=args.out, progress=not args.quiet, runtime=args.runtime)
    print_summary(result.summary)
    print(result.run_dir)
    return 0


def _sweep(args) -> int:
    from experiments.spec import load_spec
    from experiments.sweep import sweep

    if load_spec(args.file, args.overrides).run.mode == "estimate":
        raise ConfigError("run.mode: a sweep runs its points in mode 'sim' or 'real'; for the estimate at one point "
                          "use farflung estimate FILE")

    try:
        out = sweep(args.file, args.overrides, out=args.out, resume=args.resume, progress=not args.quiet,
                    runtime=args.runtime)
    except KeyboardInterrupt:
        print("farflung: interrupted; finished points are kept: rerun with --resume DIR to finish the others",
              file=sys.stderr)
        return 130
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    print(f"{len({r['point'] for r in rows})} points, {len(rows)} arm runs, "
          f"{sum(r['retimed'] for r in rows)} re-timed from a trace instead of trained")
    print(out)
    return 0


def _fidelity(args) -> int:
    from experiments.fidelity import fidelity

    out = fidelity(args.file, args.overrides, args.out)
    result = json.loads((out / "fidelity.json").read_text())
    print(f"{'arm':12} {'figure':20} {'predicted':>12} {'measured':>12} {'ratio':>7}")
    for arm, figures in result["arms"].items():
        for key, row in figures.items():
            flag = "  <-- off by more than 25 %" if row["flagged"] else ""
            print(f"{arm:12} {key:20} {_figure(row['predicted']):>12} {_figure(row['measured']):>12} "
                  f"{_figure(row['ratio']):>7}{flag}")
    print(out)
    return 0


def _algorithms(args) -> int:
    from experiments.spec import algorithm_catalog
    from trainer.compression import CODECS, TOPK_HELP

    catalog = algorithm_catalog()
    if args.json:
        codecs = [{"name": name, "help": codec.help} for name, codec in CODECS.items()]
        print(json.dumps({"algorithms": catalog, "codecs": codecs}, indent=1))
        return 0
    real = {"lockstep": "lockstep averaging", "swarm": "hivemind.Optimizer swarm", None: "simulator only"}
    for algorithm in catalog:
        print(f"{algorithm['name']}: {algorithm['summary'].replace('`', '')}")
        print(f"  real mode: {real[algorithm['real_mode']]}")
        rows = [(s["name"], _toml(s["default"]), s["allowed"], s["help"]) for s in algorithm["settings"]]
        widths = [max((len(r[i]) for r in rows), default=0) for i in range(3)]
        for row in rows:
            print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[3])
        print()
    print("codecs (an arm's codec):")
    for name, codec in CODECS.items():
        print(f"  {name:<15}{codec.help}")
    print(f"  {'topk:FRACTION':<15}{TOPK_HELP} (simulator only)")
    return 0


def _toml(value) -> str:
    """A default as an experiment file writes it."""
    if value is None:
        return "unset"
    return json.dumps(value) if isinstance(value, (bool, str)) else str(value)


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def print_summary(summary: dict) -> None:
    from experiments.report import human_bytes, human_seconds

    rows = [("arm", "final loss", "x loss", "time", "x time", "bytes sent", "x bytes")]
    for name, a in summary["arms"].items():
        def ratio(v):
            return "-" if v is None else f"{v:.3g}"

        rows.append((name, f"{a['final_loss']:.4f}", ratio(a["loss_ratio"]), human_seconds(a["time_s"]),
                     ratio(a["time_ratio"]), human_bytes(a["bytes_sent"]), ratio(a["bytes_ratio"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    ranking = summary.get("ranking", {})
    if len(summary["arms"]) > 2 and ranking:
        print("ranked by time to target loss:", ", ".join(ranking["time_to_target"]))
        print("ranked by bytes sent:", ", ".join(ranking["bytes_sent"]))


if __name__ == "__main__":
    sys.exit(main())
