"""A real swarm arm's driver while a failed peer restarts: the restart runs beside the polls, and the arm never ends
with one under way. No Ray, no hivemind: `SwarmArm` drives fake peers whose epochs advance one per two polls, and a
fake restart that waits for what the driver must do meanwhile (each test well under a second)."""

from __future__ import annotations

import dataclasses
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from cluster.faults import parse_faults
from cluster.real.options import RealOptions
from cluster.real.messages import EpochRecord
from cluster.real.swarm_arm import SwarmArm
from cluster.real.swarm_churn import SwarmChurn
from cluster.real.swarm_state import StateLoad

N, SEQ, SAMPLES = 3, 4, 2  # workers, tokens per sample, samples per peer per poll
WAIT_S = 5.0  # what a fake restart waits at most for the driver to act meanwhile


class _Peer:
    def __init__(self, worker: int, incarnation: int, holds_state: bool):
        self.worker, self.incarnation, self.holds_state = worker, incarnation, holds_state
        self.epoch = self.samples = 0
        self.training = self.stopped = False
        self.stop_after: int | None = None
        self.new: list[EpochRecord] = []
        self.loaded = None
        self.polled = 0  # polls since it started training

    @property
    def peer_id(self) -> str:
        return f"peer-{self.worker}-{self.incarnation}"

    @property
    def done(self) -> bool:
        return self.training and (self.stopped or (self.stop_after is not None and self.epoch > self.stop_after))


class _Peers:
    """What `SwarmArm` calls on `cluster.runtime.RayRuntime`, in this process. Events are logged in order as (kind,
    worker); a call for a worker that is restarting, or anything after `close`, fails the arm."""

    def __init__(self):
        self.peers = [_Peer(w, 0, True) for w in range(N)]
        self.restarting: set[int] = set()
        self.log: list[tuple[str, int]] = []
        self.polls = 0
        self.closed = False
        self.lock = threading.Lock()  # the restart threads log too

    def note(self, kind: str, worker: int = -1) -> None:
        with self.lock:
            assert not self.closed, f"{kind} of worker {worker} after the peers were closed"
            self.log.append((kind, worker))

    def kinds(self, kind: str) -> list[int]:
        return [i for i, (k, _) in enumerate(self.log) if k == kind]

    def call(self, method, args=None, workers=None, timeout_s=None):
        workers = list(range(N)) if workers is None else list(workers)
        args = args or [()] * len(workers)
        busy = self.restarting.intersection(workers)
        assert not busy, f"{method} called on worker {sorted(busy)} while it restarts"
        if method == "progress":
            self.polls += 1
        return [getattr(self, "_" + method)(self.peers[w], *a) for w, a in zip(workers, args)]

    def kill(self, worker: int, method: str) -> None:
        assert worker not in self.restarting, f"worker {worker} killed while it restarts"
        self.note("kill", worker)
        self.peers[worker] = None

    # --- a restart, as `cluster.real.runtime._restart_peer` does it ---
    def respawn(self, worker: int, incarnation: int) -> None:
        self.note("respawn", worker)
        self.restarting.add(worker)
        self.peers[worker] = _Peer(worker, incarnation, holds_state=False)

    def up(self, worker: int) -> dict:
        peer = self.peers[worker]
        peer.training = True
        self.restarting.discard(worker)
        self.note("up", worker)
        return self._describe(peer)

    def close(self) -> None:
        with self.lock:
            self.closed = True

    # --- SwarmPeer's methods ---
    def _params(self, p):
        return np.full(8, float(p.epoch if p.holds_state else -1), dtype=np.float32)

    def _sync_progress(self, p, n, timeout_s):
        return N

    def _describe(self, p):
        return {"peer_id": p.peer_id, "worker": p.worker, "maddrs": [f"/p2p/{p.peer_id}"],
                "dial_address": ("127.0.0.1", 1000 + 10 * p.worker + p.incarnation)}

    def _relay_counters(self, p):
        return {}

    def _start_clock(self, p, *a):
        pass

    def _start_training(self, p, max_wall_s):
        p.training = True

    def _progress(self, p):
        if p.training and not p.done:
            p.polled += 1
            if not p.holds_state and p.polled >= 2:  # a new peer loads worker 0's state at its second poll
                donor = self.peers[0]
                p.holds_state, p.epoch = True, donor.epoch
                p.loaded = {"load": StateLoad(donor.peer_id, donor.epoch, 100, "digest"), "started_s": 0.0,
                            "loaded_s": 0.0}
            elif p.holds_state:
                p.samples += SAMPLES
                if self.polls % 2 == 0:
                    p.new.append(EpochRecord(p.worker, p.epoch, SAMPLES, 1.0, 0.1, 0.0, 0.01, 0.0, N, False))
                    p.epoch += 1
        records, p.new, loaded, p.loaded = p.new, [], p.loaded, None
        return {"samples": p.samples, "epoch": p.epoch, "time_s": 0.0, "done": p.done, "holds_state": p.holds_state,
                "records": records, "loaded": loaded, "open_compute_s": 0.0}

    def _snapshot(self, p):
        self.note("snapshot", p.worker)
        return p.epoch, 0.0, self._params(p)

    def _served_digests(self, p):
        return ["digest"]

    def _stop_after(self, p, epoch):
        p.stop_after = epoch

    def _stop(self, p):
        self.note("stop", p.worker)
        p.stopped = True

    def _finish_training(self, p):
        self.note("finish", p.worker)

    def _evaluate(self, p, model):
        return float(np.mean(model))


def _plan():
    from cluster.devices import get_device
    from cluster.driver import ArmPlan
    from cluster.network import Network
    from cluster.real.options import UNSHAPED

    # A snapshot every poll or two (N peers x SAMPLES x SEQ tokens per poll); the budget is never reached.
    return ArmPlan(name="restart", n_workers=N, network=Network(links=(UNSHAPED,) * N),
                   devices=(get_device("laptop-cpu"),) * N, speed_factors=(1.0,) * N, codec="none",
                   total_steps=10**6, tokens_per_step=N * SAMPLES * SEQ, eval_every_steps=1, seed=5)


def _arm(events: list[dict], restart, should_stop):
    """A 3-peer arm on fake peers with a written trace; `restart(peers, worker, incarnation)` is the new peer's
    start. Returns (arm, peers, records)."""
    peers, records, plan = _Peers(), [], _plan()

    def emit(record) -> None:
        records.append(record)
        if record.kind == "fault":
            peers.note(f"{record.event} record", record.worker)

    def restart_peer(worker, incarnation, initial_peers, arm_clock):
        return restart(peers, worker, incarnation)

    churn = SwarmChurn(parse_faults("faults", {"events": events}, N), plan, peers, restart_peer, emit)
    spec = SimpleNamespace(model=SimpleNamespace(block_size=SEQ))
    setup = SimpleNamespace(codec="none", use_local_updates=False, delay_state_averaging=False)
    arm = SwarmArm(peers, plan, spec, setup, RealOptions(shaping="none", startup_timeout_s=WAIT_S,
                                                         swarm_timeout_s=60.0),
                   [("127.0.0.1", 1000 + 10 * w) for w in range(N)], emit, on_step=lambda: peers.note("on_step"),
                   should_stop=lambda: should_stop(peers, records), churn=churn)
    arm.POLL_S = 0.01
    return arm, peers, records


def _faults(records) -> list[tuple[int, str]]:
    return [(r.worker, r.event) for r in records if r.kind == "fault"]


def test_the_driver_goes_on_polling_while_a_peer_restarts():
    """Worker 2 fails at 0.05 s and comes back at 0.1 s; its new peer takes until worker 1 has failed (0.4 s) to
    start. Meanwhile the driver notices epochs, takes snapshots and plays worker 1's failure at its time, and never
    calls worker 2. Worker 2's next failure (0.2 s) fell due while it restarted: it is played once it is up."""

    def restart(peers, worker, incarnation):
        peers.respawn(worker, incarnation)
        if incarnation == 1:
            deadline = time.monotonic() + WAIT_S
            while not peers.kinds("kill")[1:] and time.monotonic() < deadline:
                time.sleep(0.005)
            assert peers.kinds("kill")[1:], "the driver played no failure while worker 2 restarted"
        return peers.up(worker)

    def should_stop(peers, records):
        join = next((r for r in records if r.kind == "fault" and r.event == "join"), None)
        return join is not None and max(p.epoch for p in peers.peers if p is not None) >= join.step + 2

    events = [{"worker": 2, "leave_s": 0.05, "return_s": 0.1}, {"worker": 2, "leave_s": 0.2, "return_s": 0.25},
              {"worker": 1, "leave_s": 0.4}]
    arm, peers, records = _arm(events, restart, should_stop)
    arm.run()
    peers.close()
    assert _faults(records) == [(2, "leave"), (2, "return"), (1, "leave"), (2, "leave"), (2, "return"), (2, "join")]
    log = peers.log
    started, up = log.index(("respawn", 2)), log.index(("up", 2))
    during = [kind for kind, _ in log[started:up]]
    # Two epochs at least are noticed, and a snapshot taken, while the first restart is under way.
    assert during.count("on_step") >= 2 and during.count("snapshot") >= 1, during
    assert ("leave record", 1) in log[started:up] and ("kill", 1) in log[started:up]
    # Worker 2's second failure waits for its peer to be up, and goes to that new peer.
    leaves_2 = [r for r in records if r.kind == "fault" and r.event == "leave" and r.worker == 2]
    assert log.index(("kill", 2), up) > up and leaves_2[1].time_s >= 0.2
    back_1, back_2 = [r for r in records if r.kind == "fault" and r.event == "return"]
    assert 0.1 <= back_1.time_s < leaves_2[1].time_s <= back_2.time_s
    # The peer of its second return is polled from its first poll on: it loads the state and trains.
    join = records[[r.kind == "fault" and r.event == "join" for r in records].index(True)]
    assert join.sources == [0] and arm.live == [0, 2]
    # Each epoch's participants: worker 1 until it failed, worker 2 until its first failure and from its join.
    leave_1 = next(r for r in records if r.kind == "fault" and r.event == "leave" and r.worker == 1)
    comms = [r for r in records if r.kind == "comm"]
    assert comms[-1].round > join.step + 1
    assert [c.participants for c in comms] == [
        [0] + [1] * (c.round < leave_1.step) + [2] * (c.round < leaves_2[0].step or c.round >= join.step)
        for c in comms]
    assert sorted(w for k, w in log if k == "finish") == [0, 2]


@pytest.mark.parametrize("ending", ["stop", "interrupt"])
def test_an_arm_that_ends_while_a_peer_restarts_waits_for_it_and_starts_nothing_after(ending):
    """The arm is told to stop (or is interrupted) at the poll after worker 2's return, while its new peer is still
    starting: `run` returns (raises) only once that start has ended; a stopped arm stops the late peer and ends it with
    the others, without records or a place in the final evaluation; no other restart is started."""

    def restart(peers, worker, incarnation):
        time.sleep(0.3)  # the actor is still being created when the arm ends
        peers.respawn(worker, incarnation)
        time.sleep(0.05)
        return peers.up(worker)

    def should_stop(peers, records):
        if (2, "return") not in _faults(records):
            return False
        if ending == "interrupt":
            raise KeyboardInterrupt
        return True

    # Worker 1's outage falls due after the stop, before the arm ends: it is never played.
    events = [{"worker": 2, "leave_s": 0.05, "return_s": 0.1}, {"worker": 1, "leave_s": 0.25, "return_s": 0.3}]
    arm, peers, records = _arm(events, restart, should_stop)
    if ending == "interrupt":
        with pytest.raises(KeyboardInterrupt):
            arm.run()
    else:
        arm.run()
    peers.close()  # the teardown: a restart still under way would fail at its next step
    assert ("up", 2) in peers.log and not arm.restarting
    assert _faults(records) == [(2, "leave"), (2, "return")]
    if ending == "stop":
        up = peers.log.index(("up", 2))
        assert ("stop", 2) in peers.log[up:] and ("finish", 2) in peers.log[up:]
        assert arm.live == [0, 1, 2] and arm.late == {2}
        leave = next(r for r in records if r.kind == "fault")
        assert not any(r.worker == 2 for r in records if r.kind == "step" and r.step >= leave.step)
        assert max(r.step for r in records if r.kind == "step") >= leave.step  # the others trained on
        assert len(arm.last_params) == 2  # the final evaluation is of workers 0 and 1


def test_a_failed_restart_is_raised_in_the_driver_after_the_other_restarts_end():
    """Workers 1 and 2 come back together; worker 1's new peer fails to start, worker 2's takes a while. The arm
    raises worker 1's error, once worker 2's start has ended."""

    def restart(peers, worker, incarnation):
        if worker == 1:
            raise RuntimeError("worker 1's new actor did not start")
        time.sleep(0.3)
        peers.respawn(worker, incarnation)
        return peers.up(worker)

    events = [{"worker": w, "leave_s": 0.05, "return_s": 0.1} for w in (1, 2)]
    arm, peers, records = _arm(events, restart, lambda peers, records: False)
    with pytest.raises(RuntimeError, match="^worker 1's new actor did not start$"):
        arm.run()
    peers.close()
    assert ("up", 2) in peers.log and 1 not in arm.live
    assert sorted(_faults(records)) == [(1, "leave"), (1, "return"), (2, "leave"), (2, "return")]


def test_a_restart_after_the_arms_restarts_are_closed_is_refused():
    churn = SwarmChurn(parse_faults("faults", {"events": [{"worker": 0, "leave_s": 1, "return_s": 2}]}, N),
                       dataclasses.replace(_plan(), name="closed"), _Peers(), lambda *a: {}, lambda r: None)
    churn.close()
    with pytest.raises(AssertionError, match="restarted after the arm's restarts were closed"):
        churn.restart(0, 2.0, 0, [], lambda: 2.0)
