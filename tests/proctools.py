"""Counting the processes a test started: Ray's, the actors', hivemind's and p2pd.

A test puts a fresh value of `TAG` in its environment before it starts anything; every process started from there
inherits it, however it descends (Ray's raylet and workers, hivemind's averager processes, p2pd daemons).
"""

from __future__ import annotations

import os
import time

TAG = "FARFLUNG_REAL_TEST_TAG"


def tagged_processes(tag: str) -> dict[int, str]:
    """Processes (other than this one) whose environment carries `tag`: everything this test started, by descent."""
    import psutil

    found = {}
    for process in psutil.process_iter(["pid", "name"]):
        if process.pid == os.getpid():
            continue
        try:
            if process.environ().get(TAG) == tag:
                found[process.pid] = process.info["name"]
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            pass
    return found


def wait_until_gone(tag: str, timeout_s: float = 30.0) -> dict[int, str]:
    """The tagged processes still running after up to `timeout_s` (empty once everything has exited)."""
    deadline = time.monotonic() + timeout_s
    while (left := tagged_processes(tag)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left
