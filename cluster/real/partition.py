"""Network partitions on real peers (`faults.partition`): cuts in the shaping relays, set and lifted by the driver
(swarm arms here; lockstep arms, ddp and diloco, cut and remeet the same way, see `cluster.real.lockstep_churn`).

Every connection to peer i passes i's relay (`cluster.real.peer`), and the relay knows each client by its address: a
peer dials from its p2pd's listening port, its `dial_address` (`cluster.real.accounting`). While a partition is in
force (`FaultsConfig.sides` at the arm's clock: wall seconds since training started, as the real mode's `leave_s`),
the relay of each live peer is given the dial addresses of every worker on another side, current and former ones
(`ShapingRelay.set_cut`): it drops the connections it has with them and refuses new ones, so both directions of
every cross-side connection die (a connection from j to i passes i's relay only, and i's relay cuts j). At `to_s` the
cut is lifted and every peer whose relay refused someone pings those peers again (`Remeet`, below). The driver (`cluster.real.swarm_arm.SwarmArm`) sets the cuts at its first poll at or after `from_s` and lifts them at its
first poll at or after `to_s` (`SwarmArm.POLL_S`); a peer restarted meanwhile gets the cut once it is up, and the
others' cuts then name its new dial address.

What a partition does to hivemind.Optimizer on real peers, unlike the simulator (`cluster.swarm_churn`): each side
forms its own groups and state averages, and also sees only its own side's progress records in the DHT (the other
side's stay in its local store until they expire), so each side's epochs close on its own samples and at its own
pace; after the heal, a side an epoch or more behind the global epoch catches up by loading the state from the other
side (`load_state_from_peers`) rather than by averaging. The swarm's epoch count is no longer one across sides
while the cut lasts.

Why the heal needs the pings: hivemind's Kademlia DHT (`hivemind.dht.protocol.DHTProtocol.update_routing_table`)
deletes a node from its routing table at the first request it sends that gets no reply, and adds nodes only when they
answer or send it a request. During a cut every cross-side request fails, so each side forgets the other within
seconds, and after the heal nobody sends a cross-side request again: the sides stay two swarms for good (measured on
loopback with 4 DHTs behind relays: routing tables [[1], [0], [3], [2]] 33 s after the heal, and each side's
matchmaking and progress records apart). A peer learns of nodes only through the DHT, and `initial_peers` are pinged
only when the node starts (`DHTNode.create`). So a real swarm heals after a partition only because some peer dials
the other side again: a peer restarted with its initial peers, or an operator's watchdog that re-bootstraps a node
from known addresses. The driver plays that watchdog at the heal, and only there: each peer whose cut is lifted
connects to and pings the live peers it was cut from, by their announced multiaddrs, retrying as a re-bootstrap
would. It first drops whatever connection its p2pd still lists to that peer: after a cut the daemons go on listing
cross-side connections that carry nothing (measured on 4 real swarm peers: every ping over them timed out, 5 tries
in 19 s; with the connection dropped and dialled anew, all answered within 0.1-0.3 s; why libp2p keeps them is not
established here). A ping that is answered puts both ends in each other's routing tables, and Kademlia's lookups
spread the rest (measured with 4 bare DHTs: routing tables whole and every store seen across sides about 5 s after
the pings). The swarm is one again once hivemind's matchmaking puts both sides in a group, which needs their epochs
to end within the matchmaking window of each other: after a cut the sides close theirs out of phase, so a window
short against an epoch may keep them averaging apart for many epochs after they can reach each other.

Left open: a client whose address is no worker's (a machine that joined with `farflung join`, or a dial from an
ephemeral port) is not cut; and a peer restarted during a cut joins through the live peers of its own side only,
but until the driver learns its new dial address (its first poll after the peer is up) the other side's relays do
not refuse it, so it may reach them in that window.
"""

from __future__ import annotations

import asyncio
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


def lifted(before: Mapping[int, frozenset[Address]], after: Mapping[int, frozenset[Address]],
           dial_addresses: Sequence[Address]) -> dict[int, list[int]]:
    """For each peer whose cut changed (`after`, from `RelayCuts.due`; `before`, the cuts its relay had), the current
    workers it refused and may reach now: those whose current dial address left its cut. Only those it must remeet."""
    out = {}
    for w, cut in after.items():
        freed = before.get(w, frozenset()) - cut
        workers = [v for v, a in enumerate(dial_addresses) if v != w and tuple(a) in freed]
        if workers:
            out[w] = workers
    return out


class Remeet:
    """`DHT.run_coroutine(Remeet(maddrs))`: connect to and ping each peer (its announced multiaddrs, with `/p2p/<id>`),
    up to `attempts` times `delay_s` apart until it answers, all at once; returns how many answered. An answered ping
    adds both ends to each other's routing table (`DHTProtocol.call_ping`)."""

    def __init__(self, peers: Sequence[Sequence[str]], attempts: int = 5, delay_s: float = 1.0):
        self.peers, self.attempts, self.delay_s = [list(m) for m in peers if m], attempts, delay_s

    async def __call__(self, dht, node) -> int:
        answered = await asyncio.gather(*(self._one(node, maddrs) for maddrs in self.peers))
        return sum(answered)

    async def _one(self, node, maddrs: list[str]) -> bool:
        from hivemind.p2p import PeerID
        from hivemind.utils.multiaddr import Multiaddr

        peer_id = PeerID.from_base58(Multiaddr(maddrs[0])["p2p"])
        suffix = Multiaddr(f"/p2p/{peer_id.to_base58()}")
        for attempt in range(self.attempts):
            if attempt:
                await asyncio.sleep(self.delay_s)
            # hivemind has no public dial: its daemon client's, as hivemind's own identity check uses. The daemon may
            # still list a connection to the peer from before the cut that carries nothing: drop it and dial anew.
            try:
                await node.p2p._client.disconnect(peer_id)
                await node.p2p._client.connect(peer_id, [Multiaddr(m).decapsulate(suffix) for m in maddrs])
            except Exception:  # refused, reset, or backed off: try again
                continue
            if await node.protocol.call_ping(peer_id) is not None:
                return True
        return False


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
