"""Ctrl-C during a real run: `farflung run` exits 130, leaves no result folder passed off as complete, and every process
it started (Ray, the actors, hivemind's averagers and DHTs, p2pd) is gone. 20-40 s on a 2-core machine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from proctools import TAG, tagged_processes, wait_until_gone

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.ray, pytest.mark.hivemind]


def test_ctrl_c_during_a_real_run_stops_every_process(tmp_path):
    if os.environ.get("RAY_ADDRESS"):
        pytest.skip("starts and stops its own local Ray")
    tag = uuid.uuid4().hex
    out = tmp_path / "run"
    command = [sys.executable, "-m", "experiments.cli", "run", "experiments/fidelity-20mbit.toml", "--quiet",
               "--out", str(out)]
    process = subprocess.Popen(command, cwd=REPO, env={**os.environ, TAG: tag}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        # Interrupt once the first arm's swarm is up and training (its address is printed then).
        deadline = time.monotonic() + 180
        lines = []
        while time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line:
                break
            lines.append(line)
            if " swarm /ip4/" in line:
                break
        assert any(" swarm /ip4/" in line for line in lines), "".join(lines)[-3000:]
        assert tagged_processes(tag), "the run started no tagged process"
        time.sleep(2.0)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, stderr[-3000:]
    assert "interrupted" in stderr
    assert not out.exists() or not any(out.iterdir())  # nothing passed off as a finished run
    left = wait_until_gone(tag, timeout_s=30.0)
    assert not left, f"processes outlived the interrupted run: {left}"
