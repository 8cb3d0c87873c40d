"""Network partitions on real peers (`cluster.real.partition`): the cut in the shaping relays, the driver's timing of
cut and heal, and 4 real collaborative peers on Ray over loopback split into two sides for a while.
"""

from __future__ import annotations

import socket
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from cluster.faults import parse_faults
from realtools import FakeSwarmPeers, driver_plan


# --- the relay's cut, on loopback ----------------------------------------------------------------------------------
class _Echo:
    """A TCP server that echoes what it receives and counts the connections it accepted."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn):
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)


def _dial(relay_address, from_port: int) -> socket.socket:
    """A connection from a fixed local port, as libp2p dials from its listening port."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", from_port))
    s.settimeout(5.0)
    s.connect(tuple(relay_address))
    return s


def _echoes(s: socket.socket, payload: bytes) -> bool:
    """Whether the payload comes back whole; False if the relay closed or reset the connection."""
    try:
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = s.recv(65536)
            if not chunk:
                return False
            got += chunk
        return got == payload
    except (ConnectionError, OSError):
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_cut_relay_refuses_and_drops_its_cut_clients_and_accepts_them_again_once_lifted():
    from cluster.real.accounting import CountingRelay
    from cluster.shaping.relay import RelayThread

    echo = _Echo()
    cut_port, other_port = _free_port(), _free_port()
    cut_client, other_client = ("127.0.0.1", cut_port), ("127.0.0.1", other_port)
    try:
        with RelayThread(CountingRelay(echo.server.getsockname()[:2], 1e9, 1e9)) as relay:
            a, b = _dial(relay.address, cut_port), _dial(relay.address, other_port)
            assert _echoes(a, b"x" * 1000) and _echoes(b, b"y" * 500)
            assert relay.set_cut([cut_client]) == 1  # a's connection closed; b's stays
            assert not _echoes(a, b"x" * 1000)
            assert _echoes(b, b"y" * 500)
            a.close()
            accepted = echo.accepted
            refused = _dial(relay.address, cut_port)  # the relay accepts the TCP handshake, then closes at once
            assert not _echoes(refused, b"z" * 100)
            refused.close()
            assert echo.accepted == accepted and relay.relay.refused == 1  # the target never saw it
            counts = relay.relay.snapshot()
            # Through the relay: 1000 bytes each way for a before the cut, 500 + 500 for b; nothing after it for a.
            assert counts[cut_client] == (1000, 1000) and counts[other_client] == (1000, 1000)
            assert relay.set_cut([]) == 0
            again = _dial(relay.address, cut_port)
            assert _echoes(again, b"w" * 300)
            again.close()
            b.close()
            assert relay.relay.snapshot()[cut_client] == (1300, 1300) and echo.accepted == accepted + 1
            assert (relay.relay.bytes_inbound, relay.relay.bytes_outbound) == (2300, 2300)
    finally:
        echo.server.close()


# --- the experiment file, and the driver's cuts, without peers ----------------------------------------------------
def _spec(algorithm: str, faults: dict, **arm):
    from experiments.spec import parse_spec

    return parse_spec({"run": {"mode": "real", "workers": 4, "tokens": 4096}, "model": {"preset": "tiny"},
                       "faults": faults, "arm": [{"name": "a", "algorithm": algorithm, "network": "home-broadband",
                                                  **arm}]})


def test_the_experiment_file_takes_partitions_on_real_arms_averaging_with_hivemind():
    from experiments.fields import ConfigError

    cut = {"partition": [{"groups": [[0, 1]], "from_s": 1, "to_s": 2}]}
    assert _spec("collaborative", cut).arms[0].faults.partition[0].groups == ((0, 1),)
    assert _spec("local-updates", cut).arms[0].faults.partition[0].to_s == 2.0
    assert _spec("diloco", cut).arms[0].faults.partition[0].from_s == 1.0
    assert _spec("ddp", cut).arms[0].faults.sides(1.5, 4) == [(0, 1), (2, 3)]
    with pytest.raises(ConfigError) as error:
        _spec("ddp", cut, allreduce="gloo", codec="none")
    assert str(error.value) == ("faults: a gloo all-reduce has a fixed process group, so real peers cannot leave "
                                "it; set allreduce = 'hivemind' for this arm, or give it mode = 'sim'")


def test_relay_cuts_name_the_other_sides_dial_addresses_and_tell_each_relay_once_per_change():
    from cluster.real.partition import RelayCuts

    faults = parse_faults("faults", {"partition": [{"groups": [[0, 1], [2]], "from_s": 10, "to_s": 20}]}, 5)
    cuts = RelayCuts(faults, 5)
    dial = [("10.0.0.1", 4000 + w) for w in range(5)]
    former = {("10.0.0.1", 3003): 3}  # worker 3's address before a restart
    assert cuts.due(9.99, range(5), dial, former) == {}  # whole: nothing to tell a relay that was never cut
    at_cut = cuts.due(10.0, range(5), dial, former)
    # Sides [0, 1], [2] and the unlisted workers together: [3, 4].
    assert at_cut == {0: frozenset([dial[2], dial[3], dial[4], ("10.0.0.1", 3003)]),
                      1: frozenset([dial[2], dial[3], dial[4], ("10.0.0.1", 3003)]),
                      2: frozenset([dial[0], dial[1], dial[3], dial[4], ("10.0.0.1", 3003)]),
                      3: frozenset([dial[0], dial[1], dial[2]]), 4: frozenset([dial[0], dial[1], dial[2]])}
    assert cuts.due(15.0, range(5), dial, former) == {}  # told already
    # Worker 2 restarts with a new dial address during the cut: every other relay is told; its new relay too.
    cuts.forget(2)
    former[tuple(dial[2])] = 2
    dial[2] = ("10.0.0.1", 5002)
    changed = cuts.due(16.0, range(5), dial, former)
    assert sorted(changed) == [0, 1, 2, 3, 4]
    assert changed[3] == frozenset([dial[0], dial[1], ("10.0.0.1", 5002), ("10.0.0.1", 4002)])
    assert changed[2] == frozenset([dial[0], dial[1], dial[3], dial[4], ("10.0.0.1", 3003)])
    # The heal at to_s lifts every cut.
    assert cuts.due(20.0, [0, 1, 2, 3, 4], dial, former) == {w: frozenset() for w in range(5)}
    assert cuts.due(30.0, range(5), dial, former) == {}
    assert cuts.side_of(4, 12.0) == (3, 4) and cuts.side_of(4, 25.0) == (0, 1, 2, 3, 4)


def test_lifted_names_the_current_workers_each_relay_stops_refusing():
    from cluster.real.partition import lifted

    dial = [("10.0.0.1", 4000 + w) for w in range(4)]
    before = {0: frozenset([dial[2], dial[3], ("10.0.0.1", 3003)]), 1: frozenset([dial[2], dial[3]]),
              2: frozenset([dial[0], dial[1]]), 3: frozenset([dial[0], dial[1]])}
    # 0 healed; the cut becomes [0, 1, 2] / [3]: 1 and 2 still refuse 3, and 3's cut stays as it was.
    after = {0: frozenset(), 1: frozenset([dial[3]]), 2: frozenset([dial[3]]), 3: frozenset([dial[0], dial[1]])}
    # 0's former address of 3 is no current worker's: nobody to ping there. 3's cut did not shrink.
    assert lifted(before, after, dial) == {0: [2, 3], 1: [2], 2: [0, 1]}
    assert lifted({}, {0: frozenset([dial[1]])}, dial) == {}  # a first cut frees nobody


def test_an_epochs_records_split_by_the_group_that_averaged_together():
    from cluster.real.partition import RelayCuts, epoch_groups
    from cluster.real.messages import EpochRecord

    cuts = RelayCuts(parse_faults("faults", {"partition": [{"groups": [[0, 1]], "from_s": 0, "to_s": 50}]}, 4), 4)

    def record(w, time_s, group):
        return EpochRecord(w, 3, 8, 1.0, 0.1, 0.0, 0.1, time_s, 2, False, group_peers=tuple(f"p{g}" for g in group))

    worker_of = {f"p{w}": w for w in range(4)}
    # 3 and 2 averaged together; 1 averaged with 0; 0 ran no gradient round (its side at 10 s: [0, 1]). At 60 s,
    # healed: 2 ran none, so it goes with the whole network's group of 0; 1 averaged with a peer outside the arm.
    records = [record(3, 10, (2, 3)), record(1, 10, (0, 1)), record(0, 10, ()), record(2, 11, (3, 2))]
    assert [[r.worker for r in g] for g in epoch_groups(records, worker_of, cuts)] == [[0, 1], [2, 3]]
    records = [record(0, 60, (0, 1, 2, 3)), record(2, 60, ()), record(1, 60, ("q",))]
    assert [[r.worker for r in g] for g in epoch_groups(records, worker_of, cuts)] == [[0, 2], [1]]


class _SidedPeers(FakeSwarmPeers):
    """Fake swarm peers: each closes an epoch every other poll, averaging with the peers its relay's cut leaves it
    (every one whose dial address it does not refuse); logs the cuts each relay was given, at the arm's time."""

    def __init__(self, n: int, clock):
        from cluster.real.messages import EpochRecord

        self.n, self.clock, self.polls = n, clock, 0
        self.epoch, self.samples, self.stopped = [0] * n, [0] * n, [False] * n
        self.cut = [frozenset()] * n
        self.cuts_log: list[tuple[int, float, frozenset]] = []
        self.remeets: list[tuple[int, float, list[str]]] = []
        self.new = [[] for _ in range(n)]
        self.EpochRecord = EpochRecord

    def call(self, method, args=None, workers=None, timeout_s=None):
        workers = list(range(self.n)) if workers is None else list(workers)
        args = args or [()] * len(workers)
        if method == "progress" and len(workers) > 1:
            self.polls += 1
        return [getattr(self, "_" + method)(w, *a) for w, a in zip(workers, args)]

    def kill(self, worker, method):
        raise AssertionError("no peer is killed")

    def _remeet(self, w, maddrs):
        self.remeets.append((w, self.clock(), sorted(m[0] for m in maddrs)))

    def _set_cut(self, w, clients):
        self.cut[w] = frozenset(tuple(c) for c in clients)
        self.cuts_log.append((w, self.clock(), self.cut[w]))
        return 0

    def _progress(self, w):
        if not self.stopped[w] and self.polls % 2 == 0:
            group = [g for g in range(self.n) if ("127.0.0.1", 1000 + g) not in self.cut[w]]
            self.new[w].append(self.EpochRecord(w, self.epoch[w], 2, 1.0, 0.1, 0.0, 0.01, self.clock(), len(group),
                                                False, group_peers=tuple(f"p{g}" for g in group)))
            self.epoch[w] += 1
            self.samples[w] += 2
        records, self.new[w] = self.new[w], []
        return {"samples": self.samples[w], "epoch": self.epoch[w], "time_s": 0.0, "done": self.stopped[w],
                "holds_state": True, "records": records, "loaded": None, "open_compute_s": 0.0}


def test_the_driver_cuts_at_from_s_heals_at_to_s_and_records_each_sides_rounds():
    from cluster.real.options import RealOptions
    from cluster.real.swarm_arm import SwarmArm
    from cluster.real.swarm_churn import SwarmChurn

    n = 4
    plan = driver_plan("cut", n)
    faults = parse_faults("faults", {"partition": [{"groups": [[0, 1], [2, 3]], "from_s": 0.1, "to_s": 0.3}]}, n)
    arm_box = []
    peers = _SidedPeers(n, lambda: time.monotonic() - arm_box[0].started)
    records = []
    churn = SwarmChurn(faults, plan, peers, lambda *a: pytest.fail("nothing returns"), records.append)
    setup = SimpleNamespace(codec="none", use_local_updates=False, delay_state_averaging=False, average_state_every=1)
    arm = SwarmArm(peers, plan, SimpleNamespace(model=SimpleNamespace(block_size=4)), setup,
                   RealOptions(shaping="none", swarm_timeout_s=30.0), [("127.0.0.1", 1000 + w) for w in range(n)],
                   records.append, should_stop=lambda: time.monotonic() - arm.started > 0.45, churn=churn)
    arm_box.append(arm)
    arm.POLL_S = 0.005
    arm.run()
    a = lambda *ws: frozenset(("127.0.0.1", 1000 + w) for w in ws)  # noqa: E731
    # Each relay was told twice: the other side's addresses at the first poll at or after 0.1 s, nothing at 0.3 s.
    told = {w: [(cut, t) for v, t, cut in peers.cuts_log if v == w] for w in range(n)}
    for w, other in ((0, a(2, 3)), (1, a(2, 3)), (2, a(0, 1)), (3, a(0, 1))):
        assert [cut for cut, _ in told[w]] == [other, frozenset()], told
        assert 0.1 <= told[w][0][1] < 0.3 <= told[w][1][1], told
    # At the heal, right after its relay's cut is lifted, each peer pings the other side's peers, once.
    healed_at = {w: told[w][1][1] for w in range(n)}
    assert sorted((w, m) for w, _, m in peers.remeets) == [(0, ["/p2p/p2", "/p2p/p3"]), (1, ["/p2p/p2", "/p2p/p3"]),
                                                          (2, ["/p2p/p0", "/p2p/p1"]), (3, ["/p2p/p0", "/p2p/p1"])]
    assert all(t >= healed_at[w] for w, t, _ in peers.remeets), (peers.remeets, healed_at)
    comms = [r for r in records if r.kind == "comm"]
    cut_rounds = [c for c in comms if 0.1 <= c.time_s < 0.3 and c.participants != [0, 1, 2, 3]]
    assert cut_rounds and all((c.participants, c.absent, c.group) in (([0, 1], [2, 3], 0), ([2, 3], [0, 1], 1))
                              for c in cut_rounds), comms
    whole = [c for c in comms if c.time_s >= 0.3 + 0.05]
    assert whole and all(c.participants == [0, 1, 2, 3] and c.absent is None and c.group == 0 for c in whole), comms


# --- 4 real peers on Ray -----------------------------------------------------------------------------------------
CUT_FROM_S, CUT_TO_S = 4.0, 15.0
# The peers' final parameters after the heal differ by float32 rounding of the state round's delta at most
# (measured 0 here; 4.7e-10 in the exchange-fault test); sides that never merged again ended 2.5e-3 to 3e-2 apart.
SPREAD_BOUND = 1e-5


@pytest.mark.ray
@pytest.mark.hivemind
def test_two_sides_average_apart_during_the_cut_and_together_again_after_the_heal(fresh_ray):
    """4 collaborative peers, sides [0, 1] and [2, 3] from 4 s to 15 s of the arm's clock: some epoch averages in
    exactly the two sides, and no round closing in the cut holds both but for the one under way when it fell; after
    the heal the peers find each other again (`cluster.real.partition.Remeet`) and the last epoch is one round of all
    4; the peers end on one model and the loss falls.

    The cut lasts 11 s: the epoch under way when it falls closes some 5-7 s later (a round waiting out the averaging
    timeout, 5 s), and an 8 s cut left no epoch averaging inside it in 1 run of 5 under load.
    A matchmaking window of 2.5 s (about one epoch): after the heal the two sides close their epochs out of phase,
    and with a 1 s window each side's matchmaking often found only its own peers (in 2 runs of 4 the sides were still
    apart at the end, 11-23 s after the heal); a window as long as the phase difference lets them meet."""
    from proctools import tagged_processes, wait_until_gone
    from realtools import unshaped_arm

    from cluster.real import RealOptions, run_real_arm
    from cluster.swarm_timing import SwarmTiming
    from trainer.strategies.collaborative import CollaborativeSettings

    n = 4
    plan, specs = unshaped_arm("collab-cut", n, 10_000, seed=4, algorithm="collaborative",
                               settings=CollaborativeSettings(target_batch_size=16),
                               swarm=SwarmTiming(matchmaking_time=2.5, averaging_timeout=5.0, target_group_size=n))
    faults = parse_faults("faults", {"partition": [{"groups": [[0, 1], [2, 3]], "from_s": CUT_FROM_S,
                                                    "to_s": CUT_TO_S}]}, n)
    first_epoch_at: list[float] = []

    def on_step() -> None:
        if not first_epoch_at:
            first_epoch_at.append(time.monotonic())

    records: list = []
    started = time.monotonic()
    result = run_real_arm(plan, specs, records.append, on_step=on_step, faults=faults,
                          options=RealOptions(shaping="none", swarm_timeout_s=300.0),
                          should_stop=lambda: bool(first_epoch_at) and time.monotonic() - first_epoch_at[0] > 23.0)
    took_s = time.monotonic() - started
    left = wait_until_gone(fresh_ray, timeout_s=15.0)
    assert not left, f"processes outlived the run: {left}"
    assert tagged_processes(fresh_ray) == {}

    comms = [r for r in records if r.kind == "comm"]
    shown = [(round(c.time_s, 1), c.round, c.group, c.participants, c.received_fraction) for c in comms]
    evals = [r for r in records if r.kind == "eval"]
    spread = max(float(np.max(np.abs(p - result.final_params[0]))) for p in result.final_params)
    print("rounds (time, epoch, group, participants, fraction received):", shown)
    print(f"took {took_s:.0f} s; final spread {spread:.3g}, param_spread {evals[-1].param_spread:.3g}; "
          f"loss {evals[0].loss:.3f} -> {evals[-1].loss:.3f}")
    sides = ([0, 1], [2, 3])
    by_epoch = {e: [c.participants for c in comms if c.round == e] for e in sorted({c.round for c in comms})}
    # The cut splits the swarm: some epoch's rounds are exactly the two sides, each without the other.
    assert any(sorted(g) == list(sides) for g in by_epoch.values()), shown
    assert all(c.absent == sides[1 - sides.index(c.participants)] for c in comms if c.participants in sides), shown
    # No round closing in the cut holds both sides, but for the one under way when it fell (its group formed before;
    # it may wait out the averaging timeout, 5 s, before stepping).
    assert not [c for c in comms if CUT_FROM_S + 6.0 <= c.time_s < CUT_TO_S
                and {0, 1} & set(c.participants) and {2, 3} & set(c.participants)], shown
    # Healed: the last epoch is one round of all 4.
    assert by_epoch[max(by_epoch)] == [[0, 1, 2, 3]], shown
    assert spread < SPREAD_BOUND, shown
    assert evals[-1].loss < evals[0].loss - 0.3
