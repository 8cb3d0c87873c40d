"""Shared fixtures. `tests/` is on sys.path (pyproject), so tests import helpers from `simtools`.

Markers: a test that starts Ray (ray.init, the Ray runtime, real mode, or `farflung run` on a file without
`runtime = "local"`) carries `@pytest.mark.ray`; one that starts hivemind (a DHT, an averager, p2pd: real mode,
`join`, `doctor`) carries `@pytest.mark.hivemind`. `make test` runs everything, `make test-fast` the rest.
`process_guard` fails an unmarked test that starts either.
"""

import pytest

from simtools import simulate

pytest_plugins = ["process_guard", "pytester"]  # pytester: tests/test_process_guard.py


@pytest.fixture
def sim():
    """`sim(n, batch_size, steps, algorithm, settings, ...)` runs one arm in-process (see `simtools.simulate`)."""
    return simulate
