"""Shared fixtures. `tests/` is on sys.path (pyproject), so tests import helpers from `simtools`."""

import pytest

from simtools import simulate


@pytest.fixture
def sim():
    """`sim(n, batch_size, steps, algorithm, settings, ...)` runs one arm in-process (see `simtools.simulate`)."""
    return simulate
