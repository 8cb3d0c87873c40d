"""Fails a test that starts Ray or hivemind without saying so with a marker.

`make test-fast` deselects the tests marked `ray` or `hivemind` (pyproject.toml registers both), so a test that starts
either without its marker would make the fast suite slow, or flaky where p2pd cannot start. Rather than rely on every
author remembering, each unmarked test is watched while it runs (setup, call and teardown): a background thread looks
at this process's descendants every `INTERVAL_S` for the daemons that starting Ray (`raylet`, `gcs_server`) or a
hivemind DHT or averager (`p2pd`) always brings up, however deep they sit (a CLI subprocess's Ray included). After
the test, one also still running in this process (`ray.is_initialized()`, e.g. attached to a cluster at RAY_ADDRESS)
counts. Either fails the test at teardown, naming the marker to add.

A scan is a few milliseconds on a quiet machine; a daemon lives for seconds (Ray's start alone takes longer than
`INTERVAL_S`), so none is missed in practice. Processes that were already running when the test began (a previous
test's Ray still exiting) are not counted.
"""

from __future__ import annotations

import sys
import threading

import pytest

MARKERS = ("ray", "hivemind")
# Daemon process name -> the marker a test that starts it needs.
DAEMONS = {"raylet": "ray", "gcs_server": "ray", "p2pd": "hivemind"}
INTERVAL_S = 0.5


def _daemons() -> dict[int, str]:
    """This process's descendants that are Ray's or hivemind's daemons: pid -> name."""
    import psutil

    found = {}
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return found
    for child in children:
        try:
            name = child.name()
        except psutil.Error:  # exited meanwhile
            continue
        if name in DAEMONS:
            found[child.pid] = name
    return found


class DaemonWatch:
    """Records the daemons that appear among this process's descendants from its creation until `stop`."""

    def __init__(self):
        self.before = _daemons()
        ray = sys.modules.get("ray")
        self.ray_before = ray is not None and ray.is_initialized()  # a previous test's leak is not this test's
        self.seen: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="daemon-watch", daemon=True)
        self._thread.start()

    def _scan(self) -> None:
        for pid, name in _daemons().items():
            if pid not in self.before:
                self.seen.setdefault(pid, name)

    def _watch(self) -> None:
        while not self._stop.wait(INTERVAL_S):
            self._scan()

    def stop(self) -> dict[int, str]:
        self._stop.set()
        self._thread.join()
        self._scan()  # whatever is still running now
        return self.seen


_WATCH = pytest.StashKey[DaemonWatch]()


def _unmarked(item: pytest.Item) -> bool:
    return not any(item.get_closest_marker(m) for m in MARKERS)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_setup(item: pytest.Item):
    # tryfirst: started before any fixture, so a fixture that starts a daemon is watched too.
    if _unmarked(item):
        item.stash[_WATCH] = DaemonWatch()
    return (yield)


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem):
    result = yield
    watch = item.stash.get(_WATCH, None)
    if watch is None:
        return result
    del item.stash[_WATCH]
    seen = watch.stop()
    needed = {DAEMONS[name] for name in seen.values()}
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized() and not watch.ray_before:
        needed.add("ray")
    if needed:
        names = ", ".join(sorted(set(seen.values()))) or "ray.init()"
        marks = " ".join(f"@pytest.mark.{m}" for m in sorted(needed))
        pytest.fail(f"{item.nodeid} started {names} without its marker: add {marks} (or a module-level "
                    f"pytestmark), so that `make test-fast` leaves it out; see tests/process_guard.py", pytrace=False)
    return result


