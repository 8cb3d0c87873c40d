"""Network partitions on real swarm peers (`faults.partition`): cuts in the shaping relays, set and lifted by the
driver.

Every connection to peer i passes i's relay (`cluster.real.peer`), and the relay knows each client by its address: a
peer dials from its p2pd's listening port, its `dial_address` (`cluster.real.accounting`). While a partition is in
force (`FaultsConfig.sides` at the arm's clock: wall seconds since training started, as the real mode's `leave_s`),
the relay of each live peer is given the dial addresses of every worker on another side, current and former ones
(`ShapingRelay.set_cut`): it drops the connections it has with them and refuses new ones, so both directions of
every cross-side connection die (a connection from j to i passes i's relay only, and i's relay cuts j). At `to_s` the
cut is lifted and the peers reconnect as hivemind does (the DHT's routing table still lists the other side). The
driver (`cluster.real.swarm_arm.SwarmArm`) sets the cuts at its first poll at or after `from_s` and lifts them at its
first poll at or after `to_s` (`SwarmArm.POLL_S`); a peer restarted meanwhile gets the cut once it is up, and the
others' cuts then name its new dial address.

What a partition does to hivemind.Optimizer on real peers, unlike the simulator (`cluster.swarm_churn`): each side
forms its own groups and state averages, and also sees only its own side's progress records in the DHT (the other
side's stay in its local store until they expire), so each side's epochs close on its own samples and at its own
pace; after the heal, a side an epoch or more behind the global epoch catches up by loading the state from the other
side (`load_state_from_peers`) rather than by averaging. The swarm's epoch count is no longer one across sides
while the cut lasts.

Left open: a client whose address is no worker's (a machine that joined with `farflung join`, or a dial from an
ephemeral port) is not cut; and a peer restarted during a cut joins through the live peers of its own side only,
but until the driver learns its new dial address (its first poll after the peer is up) the other side's relays do
not refuse it, so it may reach them in that window.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from cluster.faults import FaultsConfig
from cluster.real.accounting import Address


class RelayCuts:
    """Which clients each live peer's relay refuses now, and which relays need telling (`due`)."""

    def __init__(self, faults: FaultsConfig, n_workers: int):
        self.faults, self.n = faults, n_workers
        self.applied: dict[int, frozenset[Address]] = {}  # worker -> the cut its relay has (absent: none set)

    def sides(self, now_s: float) -> list[tuple[int, ...]] | None:
        return self.faults.sides(now_s, self.n)

    def side_of(self, worker: int, now_s: float) -> tuple[int, ...]:
        """The workers `worker` can reach at `now_s`: its side, or everyone when the network is whole."""
        sides = self.sides(now_s)
        return tuple(range(self.n)) if sides is None else next(s for s in sides if worker in s)

    def blocked(self, worker: int, now_s: float, dial_addresses: Sequence[Address],
                former: Mapping[Address, int]) -> frozenset[Address]:
        """The dial addresses (current and former) of the workers on another side than `worker` at `now_s`."""
        mine = set(self.side_of(worker, now_s))
        current = {tuple(a) for w, a in enumerate(dial_addresses) if w not in mine}
        return frozenset(current | {tuple(a) for a, w in former.items() if w not in mine})

    def due(self, now_s: float, live: Iterable[int], dial_addresses: Sequence[Address],
            former: Mapping[Address, int]) -> dict[int, frozenset[Address]]:
        """The cuts to hand to live peers now: those whose relay's cut differs from what it must be (a peer never
        told has none). Marks them applied."""
        changes = {}
        for w in live:
            want = self.blocked(w, now_s, dial_addresses, former)
            if self.applied.get(w, frozenset()) != want:
                changes[w] = self.applied[w] = want
        return changes

    def forget(self, worker: int) -> None:
        """The worker's peer is gone, and its relay with it: a new one starts with no cut."""
        self.applied.pop(worker, None)


def epoch_groups(records: Sequence, worker_of: Mapping[str, int], cuts: RelayCuts) -> list[list]:
    """One epoch's records (`cluster.real.swarm.EpochRecord`, one per peer that closed it) split by who averaged
    together: the group of each peer's last gradient round, as hivemind formed it (`group_peers`); a peer that ran
    none (local updates, or a round that found no group) by its side of the partition when it closed the epoch.
    In order of each group's lowest worker."""
    groups: dict[tuple[int, ...], list] = {}
    for r in records:
        key = tuple(sorted({worker_of.get(p, -1) for p in r.group_peers})) if r.group_peers else \
            cuts.side_of(r.worker, r.time_s)
        groups.setdefault(key, []).append(r)
    ordered = sorted(groups.values(), key=lambda rs: min(r.worker for r in rs))
    return [sorted(rs, key=lambda r: r.worker) for rs in ordered]
