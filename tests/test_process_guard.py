"""tests/process_guard.py itself: an unmarked test that starts a daemon fails, a marked one and a clean one pass.

A real Ray or p2pd would take seconds and need the marker this test checks, so the inner session (a pytest
subprocess, ~2 s) watches for a stand-in: `sleep` run under a daemon's name, which the outer guard does not watch.
"""

from __future__ import annotations

import shutil
from pathlib import Path

TESTS = Path(__file__).resolve().parent

INNER_CONFTEST = """
import process_guard

process_guard.DAEMONS["ff-fake-daemon"] = "hivemind"
pytest_plugins = ["process_guard"]
"""

INNER_TESTS = """
import os
import subprocess

import pytest

FAKE = os.environ["FAKE_DAEMON"]


def start():
    return subprocess.Popen([FAKE, "30"])


def stop(process):
    process.kill()
    process.wait()


def test_unmarked_test_that_starts_a_daemon():
    process = start()
    try:
        subprocess.run(["sleep", "1.2"])  # the daemon lives for a couple of the guard's scans
    finally:
        stop(process)  # gone before the test ends: only the scans during it can see it


@pytest.fixture
def daemon():
    process = start()
    subprocess.run(["sleep", "1.2"])
    yield
    stop(process)


def test_unmarked_test_whose_fixture_starts_a_daemon(daemon):
    pass


@pytest.mark.hivemind
def test_marked_test_that_starts_a_daemon():
    stop(start())


def test_clean_test():
    pass
"""


def test_guard_fails_only_the_unmarked_tests_that_start_a_daemon(pytester, monkeypatch):
    fake = pytester.path / "bin" / "ff-fake-daemon"
    fake.parent.mkdir()
    fake.symlink_to(shutil.which("sleep"))  # the process is named after the link: ff-fake-daemon
    monkeypatch.setenv("FAKE_DAEMON", str(fake))
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    pytester.makeconftest(INNER_CONFTEST)
    pytester.makeini("[pytest]\nmarkers =\n    hivemind: stand-in\n")
    pytester.makepyfile(test_inner=INNER_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rE")
    result.assert_outcomes(passed=4, errors=2)
    result.stdout.fnmatch_lines([
        "*test_unmarked_test_that_starts_a_daemon started ff-fake-daemon without its marker: add "
        "@pytest.mark.hivemind*",
        "*test_unmarked_test_whose_fixture_starts_a_daemon started ff-fake-daemon without its marker*",
    ])
