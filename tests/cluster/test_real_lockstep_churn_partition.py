"""Partitions on real lockstep arms, without peers: the churn driver (`cluster.real.lockstep_churn`) and the real
`cluster.real.lockstep.PeerExchanges` over fake peers that play hivemind's part as the relays allow it.

`_CutPeers` answers the real peers' calls with in-process replicas. An all-reduce forms only among peers that were
all given that same group (`set_members`, hivemind's group key) and whose relays cut none of the others (`set_cut`),
and averages their tensors exactly; a state download comes from the first live peer holding the state that the
relays let through, as `load_state_from_peers` goes down its donors until one answers. Step s of a peer ends at s + 1
seconds of the arm's clock, so the exchange of step s starts at `now_s` = s (the last booked step's end).
"""

from __future__ import annotations

import numpy as np

from cluster.driver import average
from cluster.faults import parse_faults
from cluster.real.lockstep import PeerExchanges
from cluster.real.lockstep_churn import LockstepChurnDriver, LockstepMembers, groups_of
from cluster.real.options import RealOptions, averaging_timeouts
from cluster.real.messages import ExchangeOutcome, MeasuredStep, PendingExchange
from cluster.records import CommRecord, FaultRecord
from trainer.replica import Replica, StepDone
from trainer.strategies.ddp import DDPSettings

from simtools import SEED, TINY, TINY_DATA, TINY_OPTIM

HOST = "127.0.0.1"


def _dial(w: int, incarnation: int) -> tuple[str, int]:
    return (HOST, 1000 * (incarnation + 1) + w)


class _Peer:
    def __init__(self, spec, incarnation: int, holds_state: bool = True):
        self.replica, self.holds_state, self.incarnation = Replica(spec), holds_state, incarnation
        self.worker = spec.worker
        self.request = self.reply = None
        self.next_step, self.group, self.number = 0, tuple(range(spec.n_workers)), 0
        self.cut: set = set()
        self.fault = None

    @property
    def dial(self):
        return _dial(self.worker, self.incarnation)

    def advance(self, until_step, reply=None, finish=False):
        out = self.replica.advance(until_step, self.reply, finish)
        self.reply = None
        events = []
        for e in out:
            if isinstance(e, StepDone):
                self.next_step = e.step + 1
                events.append(MeasuredStep(e.step, e.loss, e.flops, 0.5, float(e.step + 1)))
            else:
                self.request = e
                events.append(PendingExchange(e.payload, e.collective, e.group, e.nbytes, e.raw_nbytes, e.weight,
                                              int(e.tensor.size)))
        return events

    def set_members(self, members, number, step):
        self.group, self.number = tuple(members), number

    def exchange_alone(self):
        self.reply = np.array(self.request.tensor, dtype=np.float32, copy=True)
        return ExchangeOutcome(True, "", 1, 0.0, 0.0, float(self.next_step), received_fraction=1.0)

    def keep_round(self):
        self.reply = np.array(self.request.tensor, dtype=np.float32, copy=True)

    def params(self):
        return self.replica.params()

    def evaluate(self, flat=None):
        return self.replica.evaluate(flat)


class _CutPeers:
    def __init__(self, specs):
        self.specs = specs
        self.slots: list[_Peer | None] = [_Peer(s, 0) for s in specs]
        self.incarnations = [0] * len(specs)
        self.killed, self.restarts, self.cuts, self.remeets, self.members_set = [], [], [], [], []
        self.allreduces: list[tuple[int, ...]] = []

    def dial_addresses(self):
        return [p.dial for p in self.slots]

    def call(self, method, args=None, workers=None, timeout_s=None):
        workers = list(range(len(self.slots)) if workers is None else workers)
        args = args or [()] * len(workers)
        assert all(self.slots[w] is not None for w in workers), f"{method} called on a killed peer: {workers}"
        if method == "exchange":
            return self._allreduce(tuple(workers))
        return [getattr(self, "_" + method, None)(w, *a) if hasattr(self, "_" + method)
                else getattr(self.slots[w], method)(*a) for w, a in zip(workers, args)]

    def _reach(self, a: int, b: int) -> bool:
        pa, pb = self.slots[a], self.slots[b]
        return pb.dial not in pa.cut and pa.dial not in pb.cut

    def _allreduce(self, group):
        peers = [self.slots[w] for w in group]
        self.allreduces.append(group)
        end_s = float(max(p.next_step for p in peers))
        formed = all(p.group == group and p.number == peers[0].number for p in peers) and \
            all(self._reach(a, b) for a in group for b in group if a < b)
        if not formed:  # hivemind's matchmaking finds no group of them all: every attempt fails
            return [ExchangeOutcome(False, "no group", 0, 0.0, 0.0, end_s) for _ in group]
        cancelled = [w for w, p in zip(group, peers) if p.fault == "cancel"]
        if cancelled:  # its part is lost at once; the others average the rest
            for p in peers:
                p.fault = None
            half = 1.0 - 1.0 / len(group)
            return [ExchangeOutcome(False, "cancelled", len(group), 0.0, 0.0, end_s) if w in cancelled else
                    ExchangeOutcome(False, "partial", len(group), 0.0, 0.0, end_s, received_fraction=half,
                                    missing_workers=tuple(cancelled)) for w in group]
        mean = average([np.asarray(p.request.tensor, dtype=np.float32) for p in peers],
                       [p.request.weight for p in peers])
        for p in peers:
            p.reply = mean.copy()
        return [ExchangeOutcome(True, "", len(group), 0.0, 0.0, end_s, received_fraction=1.0) for _ in group]

    def _relay_counters(self, w):
        return {}

    def _arm_exchange_fault(self, w, phase):
        assert phase == "cancel", "only a cancel plays here"
        self.slots[w].fault = phase

    def _set_cut(self, w, clients):
        self.slots[w].cut = {tuple(c) for c in clients}
        self.cuts.append((w, [c[1] for c in clients]))

    def _visible_maddrs(self, w):
        return [f"/p2p/p{w}.{self.incarnations[w]}"]

    def _remeet(self, w, maddrs):
        self.remeets.append((w, maddrs))

    def _remeet_done(self, w, timeout_s):
        return len(next(m for v, m in reversed(self.remeets) if v == w))

    def _set_members(self, w, members, number, step):
        self.members_set.append((step, w, tuple(members), number))
        self.slots[w].set_members(members, number, step)

    def _load_state(self, w, timeout_s):
        me = self.slots[w]
        donors = [v for v, p in enumerate(self.slots) if p is not None and p.holds_state and self._reach(w, v)]
        if not donors:
            return None
        donor = self.slots[donors[0]]
        nbytes = me.replica.import_state(donor.replica.export_state())
        me.replica._progress.step = me.next_step = donor.next_step
        me.holds_state = True
        return {"donor": donors[0], "step": donor.next_step, "state_bytes": nbytes, "download_s": 0.25}

    def kill(self, worker, method):
        self.slots[worker] = None
        self.killed.append(worker)

    def restart(self, worker, initial_peers, arm_clock_s):
        self.incarnations[worker] += 1
        self.restarts.append((worker, initial_peers))
        self.slots[worker] = _Peer(self.specs[worker], self.incarnations[worker], holds_state=False)
        return {"dial_address": self.slots[worker].dial}


def _run(n: int, steps: int, faults: dict):
    from cluster.devices import get_device
    from cluster.driver import ArmPlan
    from cluster.network import build_network
    from trainer.replica import ReplicaSpec

    plan = ArmPlan(name="arm", n_workers=n, network=build_network("datacenter", n),
                   devices=(get_device("laptop-cpu"),) * n, speed_factors=(1.0,) * n, codec="none",
                   total_steps=steps, tokens_per_step=n * 2 * TINY.block_size, eval_every_steps=steps, seed=SEED)
    specs = [ReplicaSpec(w, n, SEED, TINY, TINY_DATA, TINY_OPTIM, 2, steps, "ddp", DDPSettings(), eval_batches=2)
             for w in range(n)]
    trace = parse_faults("faults", faults, n)
    peers = _CutPeers(specs)
    options = RealOptions(shaping="none")
    exchanges = PeerExchanges(peers, plan, averaging_timeouts(plan.network, 4096, options), options,
                              peers.dial_addresses())
    records: list = []
    driver = LockstepChurnDriver(peers, plan, exchanges, records.append, members=LockstepMembers(trace, plan),
                                 restart=peers.restart, load_timeout_s=5.0)
    driver.run()
    return peers, records, driver


def _rounds(records):
    return [(c.step, c.round, c.group, c.participants, c.absent) for c in records if isinstance(c, CommRecord)]


def _events(records):
    return [(f.worker, f.event, f.step) + ((f.sources,) if f.event == "join" else ()) for f in records
            if isinstance(f, FaultRecord)]


def test_groups_are_each_sides_live_workers_in_order_of_their_lowest():
    assert groups_of([0, 1, 2, 3], None) == [(0, 1, 2, 3)]
    assert groups_of([0, 2, 3], [(3, 2), (0, 1)]) == [(0,), (2, 3)]
    assert groups_of([0, 1], [(2, 3), (0, 1)]) == [(0, 1)]


def test_each_side_averages_apart_during_the_cut_and_a_return_loads_from_its_own_side():
    """ddp, 4 workers, 8 steps: sides [0, 1] and [2, 3] over [2 s, 5 s), the exchanges of steps 2, 3, 4. Worker 3
    leaves at step 1 and returns at step 3 (during the cut), loads from worker 2; worker 1 cancels in round 4."""
    n, steps = 4, 8
    peers, records, driver = _run(n, steps, {
        "events": [{"worker": 3, "leave_step": 1, "return_step": 3}],
        "partition": [{"groups": [[0, 1], [2, 3]], "from_s": 2, "to_s": 5}],
        "exchange": [{"worker": 1, "round": 4, "phase": "cancel"}]})
    # Round r is step r's exchange; during the cut one record per side (group 0, 1 by lowest worker), absent the
    # workers the round wanted that are gone or across the cut; worker 2 alone on its side keeps its own tensor.
    assert _rounds(records) == [
        (0, 0, 0, [0, 1, 2, 3], None), (1, 1, 0, [0, 1, 2], [3]),
        (2, 2, 0, [0, 1], [2, 3]), (2, 2, 1, [2], [0, 1, 3]),
        (3, 3, 0, [0, 1], [2, 3]), (3, 3, 1, [2], [0, 1, 3]),
        (4, 4, 0, [0, 1], [2, 3]), (4, 4, 1, [2, 3], [0, 1]),
        (5, 5, 0, [0, 1, 2, 3], None), (6, 6, 0, [0, 1, 2, 3], None), (7, 7, 0, [0, 1, 2, 3], None)]
    # The all-reduces that ran (a group of one runs none), each side's at once in round 4.
    assert peers.allreduces == [(0, 1, 2, 3), (0, 1, 2), (0, 1), (0, 1), (0, 1), (2, 3)] + [(0, 1, 2, 3)] * 3
    cancelled = [c for c in records if isinstance(c, CommRecord) and c.round == 4]
    assert [(c.missing_peers, c.received_fraction) for c in cancelled] == [([1], [0.5, 0.0]), ([], [1.0, 1.0])]
    # The return during the cut joined through its side only and loaded from it.
    assert _events(records) == [(3, "leave", 1), (3, "return", 3), (3, "join", 3, [2]), (1, "cancel", 4)]
    assert peers.restarts == [(3, ["/p2p/p2.0"])]
    # The relays: cut at step 2's boundary (worker 3's dead peer's address too), worker 3's new peer (dialling from
    # 2003) cut from the other side and named in its cuts, then every cut lifted at step 5's boundary.
    assert peers.cuts == [(0, [1002, 1003]), (1, [1002, 1003]), (2, [1000, 1001]),
                          (0, [1002, 1003, 2003]), (1, [1002, 1003, 2003]), (3, [1000, 1001]),
                          (0, []), (1, []), (2, []), (3, [])]
    # At the heal each peer pinged the current peers it had refused, before the next round.
    assert peers.remeets == [(0, [["/p2p/p2.0"], ["/p2p/p3.1"]]), (1, [["/p2p/p2.0"], ["/p2p/p3.1"]]),
                             (2, [["/p2p/p0.0"], ["/p2p/p1.0"]]), (3, [["/p2p/p0.0"], ["/p2p/p1.0"]])]
    assert driver.remeets == [(0, [2, 3], 2), (1, [2, 3], 2), (2, [0, 1], 2), (3, [0, 1], 2)]
    # Each peer was told its group, with a membership number of its own at each leave, cut, join and heal.
    told = {}
    for step, w, group, number in peers.members_set:
        told.setdefault(step, set()).add((w, group, number))
    assert told == {1: {(w, (0, 1, 2), 1) for w in (0, 1, 2)},
                    2: {(0, (0, 1), 2), (1, (0, 1), 2), (2, (2,), 2)},
                    4: {(0, (0, 1), 3), (1, (0, 1), 3), (2, (2, 3), 3), (3, (2, 3), 3)},
                    5: {(w, (0, 1, 2, 3), 4) for w in range(4)}}
    # Nothing re-synchronises ddp's parameters after the heal: each side ends on its own bits.
    final = driver.last_params
    assert np.array_equal(final[2], final[3]) and not np.array_equal(final[0], final[2])


def test_a_return_alone_on_its_side_waits_for_the_heal_to_load_the_state():
    """ddp, 4 workers, 8 steps: sides [0, 1, 2] and [3] over [2 s, 5 s); worker 3 leaves at step 1 and returns at
    step 2 with no live peer on its side: it starts alone, serves nothing, and loads once the heal reaches it: the
    clock is at 5 s once step 4 is booked, after that step's round."""
    peers, records, driver = _run(4, 8, {
        "events": [{"worker": 3, "leave_step": 1, "return_step": 2}],
        "partition": [{"groups": [[0, 1, 2], [3]], "from_s": 2, "to_s": 5}]})
    assert peers.restarts == [(3, [])]  # the lone-restart guard: nobody on its side to join through
    assert _events(records) == [(3, "leave", 1), (3, "return", 2), (3, "join", 4, [0])]
    assert _rounds(records) == ([(0, 0, 0, [0, 1, 2, 3], None)] + [(s, s, 0, [0, 1, 2], [3]) for s in range(1, 5)]
                                + [(s, s, 0, [0, 1, 2, 3], None) for s in (5, 6, 7)])
    assert peers.cuts == [(0, [1003]), (1, [1003]), (2, [1003]),
                          (0, [1003, 2003]), (1, [1003, 2003]), (2, [1003, 2003]), (3, [1000, 1001, 1002]),
                          (0, []), (1, []), (2, []), (3, [])]
    assert driver.remeets == [(0, [3], 1), (1, [3], 1), (2, [3], 1), (3, [0, 1, 2], 3)]
    final = driver.last_params
    assert all(np.array_equal(final[0], p) for p in final)  # it took the swarm's state, not its fresh weights
