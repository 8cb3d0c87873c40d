"""What a run is and what comes out: specs, the runner, reports and the CLI.

From a notebook: `from experiments import run; result = run("experiments/demo.toml", ["run.tokens=200000"])`.
"""


def run(experiment, overrides=(), out=None, progress=False, runtime=None):
    """Run an experiment file or spec; returns a RunResult with `run_dir` and `summary`."""
    from experiments.runner import run as _run

    return _run(experiment, overrides, out=out, progress=progress, runtime=runtime)
