"""A machine elsewhere joins: `farflung join`, started as a separate process, finds a running collaborative arm, loads
its state from the peers, catches up to the swarm's epoch and averages with it.

One test, 60-100 s on a 2-core machine: a 2-peer swarm on Ray (loopback, unshaped) trains until two joiners, one
listening and one in client mode, have joined and left one after the other; each joiner is a subprocess with no Ray.
Also checks that the joiners' processes are gone, that a bad address or run id is a one-line error with exit 2, and
that a joiner finding no peer that holds the state trains and serves nothing.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from realtools import unshaped_arm

from cluster.real import RealOptions, run_real_arm
from cluster.swarm_timing import SwarmTiming
from trainer.strategies.collaborative import CollaborativeSettings

REPO = Path(__file__).resolve().parents[2]
N = 2


def _swarm_arm(steps: int):
    return unshaped_arm("collab-join", N, steps, seed=3, algorithm="collaborative",
                        settings=CollaborativeSettings(target_batch_size=16),
                        swarm=SwarmTiming(matchmaking_time=2.0, averaging_timeout=20.0))


def _join(*args: str, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """`farflung join` in a session of its own: past `timeout` its whole process group is killed, its p2pd too,
    which a SIGKILL of the joiner alone would leave running."""
    process = subprocess.Popen([sys.executable, "-m", "experiments.cli", "join", *args], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.mark.ray
@pytest.mark.hivemind
def test_joining_peers_catch_up_to_the_swarm_epoch_and_average_with_it(p2pd_count):
    """One swarm, two machines joining it one after the other: a listening one, then one in client mode."""
    plan, specs = _swarm_arm(steps=100_000)  # far more than it will train: the test stops it
    records: list[dict] = []
    swarm: list = []
    stop = threading.Event()
    failure: list[BaseException] = []

    epochs_seen = [0]

    def run():
        try:
            run_real_arm(plan, specs, records.append, options=RealOptions(shaping="none"), on_swarm=swarm.append,
                         should_stop=stop.is_set, on_step=lambda: epochs_seen.__setitem__(0, epochs_seen[0] + 1))
        except BaseException as e:  # reported by the main thread
            failure.append(e)

    before = p2pd_count.pids()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    joins: list[tuple[str, subprocess.CompletedProcess]] = []
    try:
        deadline = time.monotonic() + 180
        # Join once the swarm has closed a few epochs, so that there is something to catch up to.
        while epochs_seen[0] < 3 and not failure and time.monotonic() < deadline:
            time.sleep(0.2)
        assert swarm and epochs_seen[0] >= 3, f"the swarm did not get going: {failure}"
        info = swarm[0]
        for name, mode in (("listening", []), ("client-mode", ["--client-mode"])):
            joins.append((name, _join("--initial-peers", info.initial_peers[0], "--run-id", info.run_id,
                                      "--epochs", "3", "--threads", "1", *mode, timeout=240)))
            if joins[-1][1].returncode != 0:
                break
    finally:
        stop.set()
        thread.join(timeout=240)
    assert not failure, failure
    rounds = {r.round: r for r in records if r.kind == "comm"}
    swarm_epoch = 0
    for name, joined in joins:
        assert joined.returncode == 0, (name, joined.stderr[-3000:])
        out = joined.stdout
        # It starts at epoch 0; its first step finds the swarm ahead, and it downloads the swarm's state.
        caught = re.search(r"caught up: loaded the swarm's state, epoch (\d+) -> (\d+)", out)
        assert caught, (name, out)
        assert int(caught.group(1)) == 0 and int(caught.group(2)) >= max(3, swarm_epoch), (name, out)
        # Then it closes three epochs, one after another, from the one it caught up to (or the next, if the swarm
        # moved on while it loaded: it then loads again, which shows as a second "caught up" line).
        closed = [(int(e), int(p), int(s)) for e, p, s in re.findall(r"epoch (\d+): (\d+) peers, (\d+) samples", out)]
        assert len(closed) == 3, (name, out)
        first = closed[0][0]
        assert first >= int(caught.group(2)) and [e for e, _, _ in closed] == [first, first + 1, first + 2], out
        # It contributes: its samples go into those epochs, which the swarm's own peers closed with three peers.
        assert sum(s for _, _, s in closed) > 0, (name, out)
        assert all(e in rounds for e, _, _ in closed), (name, closed, sorted(rounds))
        assert any(rounds[e].swarm_peers == N + 1 for e, _, _ in closed), (name, [rounds[e] for e, _, _ in closed])
        swarm_epoch = closed[-1][0]
    assert [name for name, _ in joins] == ["listening", "client-mode"]
    # The arm's own peers end on one model: a gradient round that reached only part of the vector (hivemind steps on
    # it) is repaired by the state average after it (average_state_every = 1), so this holds whatever the rounds did
    # (tests/cluster/test_swarm_repair.py provokes such a round).
    evals = [r for r in records if r.kind == "eval"]
    assert evals[-1].param_spread < 1e-5, evals[-1]
    assert evals[-1].loss < evals[0].loss
    left = p2pd_count.new_since(before)
    assert not left, f"p2pd processes outlived the swarm or the joiners: {left}"


def test_join_rejects_a_bad_address_with_one_line():
    bad = _join("--initial-peers", "/ip4/127.0.0.1/tcp/9", timeout=60)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "--initial-peers" in bad.stderr and "/p2p/" in bad.stderr


@pytest.mark.hivemind
def test_a_machine_joining_a_swarm_that_holds_no_state_trains_and_serves_nothing(p2pd_count):
    """`farflung join` against a run whose only peer is itself waiting for the state (a restarted one): the joiner
    waits for a donor up to --timeout and leaves with exit 1, having trained nothing and offered no state."""
    from realtools import SECRET, donors, swarm_peer

    from cluster.real.secret import SECRET_ENV
    from cluster.real.swarm_setup import SwarmSetup, arm_config
    from trainer.strategies import STRATEGIES

    settings = CollaborativeSettings(target_batch_size=16)
    _, specs = unshaped_arm("stateless", 1, 20, seed=9, algorithm="collaborative", settings=settings)
    setup = SwarmSetup.of(STRATEGIES["collaborative"], settings, SwarmTiming(matchmaking_time=1.0,
                          averaging_timeout=5.0), 1, specs[0].batch_size, "none")
    run_id = "farflung-stateless-test"
    before = p2pd_count.pids()
    waiting = swarm_peer(specs[0], run_id, holds_state=False, incarnation=1)
    try:
        waiting.join(None)
        waiting.start_optimizer(setup, 3.0, None)
        assert waiting.publish(arm_config(specs[0], setup, "stateless"), "stateless")
        joined = _join("--initial-peers", waiting.visible_maddrs()[0], "--timeout", "6", "--threads", "1",
                       timeout=120, env={**os.environ, SECRET_ENV: SECRET.decode()})
        assert joined.returncode == 1, joined.stderr[-3000:]
        assert "no peer of the run served its state within 6 s" in joined.stderr, joined.stderr[-3000:]
        assert "caught up" not in joined.stdout and "epoch" not in joined.stdout.replace("joining", ""), joined.stdout
        # Neither peer ever offered a state: the joiner's weights did not become the swarm's.
        assert all(priority is None for priority in donors(waiting.dht, run_id).values())
        assert waiting.progress()["holds_state"] is False
    finally:
        waiting.shutdown()
    left = p2pd_count.new_since(before)
    assert not left, f"the joiner or the peer left p2pd behind: {left}"


class _P2pd:
    @staticmethod
    def pids() -> set[int]:
        import psutil

        return {p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "p2pd"}

    def new_since(self, before: set[int], grace_s: float = 10.0) -> set[int]:
        """p2pd processes started since `before` that are still running after a grace period for their shutdown."""
        deadline = time.monotonic() + grace_s
        while (left := self.pids() - before) and time.monotonic() < deadline:
            time.sleep(0.5)
        return left


@pytest.fixture
def p2pd_count():
    return _P2pd()
