"""`farflung run` killed at random points (SIGTERM, then SIGKILL, of the real CLI process) and resumed with
`--resume` ends with the bytes of a run never interrupted; resuming what cannot be resumed is one line and exit 2.
Three CLI processes of a few seconds each, after the import of torch."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import experiments
from experiments import cli

RESUME = Path(__file__).parent / "files" / "resume.toml"


def farflung() -> list[str]:
    script = Path(sys.executable).with_name("farflung")
    return [str(script)] if script.exists() else [sys.executable, "-m", "experiments.cli"]


def lines_in(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def run_until(command: list[str], metrics: Path, lines: int, sig: int) -> subprocess.CompletedProcess:
    """Start `command` and send it `sig` as soon as `metrics` holds `lines` lines."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while process.poll() is None and lines_in(metrics) < lines and time.monotonic() < deadline:
            time.sleep(0.005)
        process.send_signal(sig)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def test_a_run_killed_at_random_points_resumes_to_the_bytes_of_one_never_stopped(tmp_path, capsys):
    reference = experiments.run(RESUME, ["run.checkpoint_every=0"], out=tmp_path / "reference").run_dir
    total = lines_in(reference / "metrics.jsonl")
    # Two seeded points in the first 90 % of the records, so that the run is still training when they come.
    first, second = sorted(random.Random(11).sample(range(1, int(0.9 * total)), 2))
    out, work = tmp_path / "run", tmp_path / ".run.incomplete"
    metrics = work / "metrics.jsonl"

    stopped = run_until([*farflung(), "run", str(RESUME), "--out", str(out), "--quiet"], metrics, first,
                        signal.SIGTERM)
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    assert f"farflung run --resume {out}" in stopped.stderr and "Traceback" not in stopped.stderr
    assert not out.exists() and (work / "config.toml").is_file()

    # A new run into the same folder would throw the interrupted one away: refused, and nothing is touched.
    kept = sorted(p.relative_to(work) for p in work.rglob("*"))
    assert cli.main(["run", str(RESUME), "--out", str(out), "--quiet"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert sorted(p.relative_to(work) for p in work.rglob("*")) == kept

    # The stopped run may have written past `first` before it stopped: kill the resumed one only once it has
    # written records of its own beyond what the file held.
    second = max(second, lines_in(metrics) + 1)
    killed = run_until([*farflung(), "run", "--resume", str(out), "--quiet"], metrics, second, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert "farflung: resuming" in killed.stderr

    done = subprocess.run([*farflung(), "run", "--resume", str(work), "--quiet"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "from its checkpoint at step" in killed.stderr + done.stderr  # not merely run again from the start
    assert Path(done.stdout.strip().splitlines()[-1]) == out.resolve()
    for name in ("metrics.jsonl", "summary.json"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    assert not work.exists()

    # Nothing left to resume: a finished run, a folder that holds no run, FILE given beside --resume.
    for argv in (["run", "--resume", str(out)], ["run", "--resume", str(tmp_path / "nothing")],
                 ["run", str(RESUME), "--resume", str(out)]):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("farflung: error: --resume: "), err
