"""Shared fixtures. `tests/` is on sys.path (pyproject), so tests import helpers from `simtools`.

Markers: a test that starts Ray (ray.init, the Ray runtime, real mode, or `farflung run` on a file without
`runtime = "local"`) carries `@pytest.mark.ray`; one that starts hivemind (a DHT, an averager, p2pd: real mode,
`join`, `doctor`) carries `@pytest.mark.hivemind`; one that starts a multi-node `ray.cluster_utils.Cluster` also
carries `@pytest.mark.ray_cluster`. `make test` runs everything: the tests without hivemind or a cluster on every core
(each Ray test starts a local Ray of its own, `cluster.runtime.start_ray`), then the rest one at a time;
`make test-fast` runs those with neither marker. `process_guard` fails an unmarked test that starts either.
"""

import pytest

from simtools import simulate

pytest_plugins = ["process_guard", "pytester"]  # pytester: tests/test_process_guard.py


@pytest.fixture
def sim():
    """`sim(n, batch_size, steps, algorithm, settings, ...)` runs one arm in-process (see `simtools.simulate`)."""
    return simulate


@pytest.fixture
def fresh_ray(monkeypatch):
    """A tag for a test that starts (and stops) its own local Ray: every process it starts inherits the tag, so
    `proctools` can tell whether any outlived it."""
    import os
    import uuid

    import ray
    from proctools import TAG

    if ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
        pytest.skip("needs to start (and stop) its own local Ray; Ray is already running or RAY_ADDRESS is set")
    tag = uuid.uuid4().hex
    monkeypatch.setenv(TAG, tag)  # inherited by Ray's processes, the actors, their hivemind processes and p2pd
    yield tag
    if ray.is_initialized():  # the run failed before its own teardown could run
        ray.shutdown()
