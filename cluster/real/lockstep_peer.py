"""A real lockstep peer (ddp, diloco) that a fault trace can kill and restart: its rounds are among the live peers
only, and a restarted one loads the state from a live peer with hivemind's `load_state_from_peers`.

Who averages with whom. hivemind's matchmaking (`averaging/matchmaking.py`) forms a group of the averagers declared
under one group key (`<prefix>.0b<group bits>`) and closes it at `target_group_size` members, or once
`min_group_size` have gathered when `min_matchmaking_time` runs out. `RealPeer` builds its averager with both sizes
equal to the arm's workers, so a round with a peer gone never forms. `MembershipAverager.set_membership` sets, in
the averager's process, both sizes to the live peers' number and the group bits to the membership's own key
(`membership_bits`: the membership's number in the run, then one bit per worker, live or not), and keeps that key
after each round (hivemind otherwise moves each member to a bucket of its own after a group forms,
`GroupKeyManager.update_key_on_group_assembled`, which would split the next round's peers over different keys). A
key per membership also keeps out what the DHT still holds from before: the declaration of a killed peer under the
old key, or a restarted one that has no state yet. Rebuilding the averagers at every change would do the same at
the cost of a new averager process and a DHT declaration per peer (seconds each); the key costs one pipe message.

The state. A donor serves `trainer.replica_state.export_state` (parameters, inner optimizer, strategy state: DiLoCo's
shared copy and outer momentum) with its step and how many batches its sampler has drawn (the joiner's sampler skips
to that count), `torch.save`d into one uint8 tensor, through the averager's
`get_current_state` (hivemind calls it in this process, on its own thread, while the driver holds every peer at a
step boundary); the joiner downloads it over the shaped links with `load_state_from_peers`, which streams it in
parts from the donor with the highest `state_sharing_priority` (the live peers raise theirs to the step at each
change of membership, so a killed peer's stale declaration comes last), and imports it. hivemind's own format
(tensors plus msgpack metadata) cannot carry an optimizer's `state_dict`, which is why it travels as one blob.

The lone-restart guard: a restarted peer (`holds_state=False`) starts its averager with sharing off, so it serves
nothing until it has loaded the state; the driver takes it into rounds only once it has.

Faults the peer plays itself (`cluster.real.exchange_faults.PeerFaults`, `set_faults`): an exchange fault armed by
the driver for the next round (`arm_exchange_fault`: the averager dies, with the whole peer, at the phase, or
cancels), after which a survivor keeps the partial average it received (`keep_round`); and straggling, a sleep of
`PeerFaults.slowdown_s` after each step's compute, at the speed of the step's start on the arm's clock.
"""

from __future__ import annotations

import io
import os
import time

import numpy as np
import torch
from hivemind.utils import MPFuture

from cluster.real.averager import ExactAverager
from cluster.real.exchange_faults import PeerFaults
from cluster.real.messages import ExchangeOutcome, MeasuredStep
from cluster.real.peer import RealPeer


def membership_bits(number: int, live: list[int], n_workers: int) -> str:
    """The group bits of a membership: its number in the run (binary), then one bit per worker (1: live)."""
    return format(number, "b") + "".join("1" if w in live else "0" for w in range(n_workers))


async def _keep_key(group_info) -> None:
    """A lockstep group's key is its membership's, round after round."""


class MembershipAverager(ExactAverager):
    """`ExactAverager` whose group (key and size) the driver sets per membership, and which serves `state_source()`."""

    state_source = None  # set in the host process: () -> (metadata, tensors), the state a joiner downloads

    def set_membership(self, bits: str, size: int) -> None:
        future = MPFuture()
        self._outer_pipe.send(("_set_membership", [], dict(bits=bits, size=size, future=future)))
        future.result()

    async def _set_membership(self, bits: str, size: int, future: MPFuture) -> None:
        matchmaking = self._matchmaking
        keys = matchmaking.group_key_manager
        keys.group_bits, keys.target_group_size = bits, size
        keys.update_key_on_group_assembled = _keep_key
        matchmaking.target_group_size = matchmaking.min_group_size = size
        matchmaking.potential_leaders.target_group_size = size
        future.set_result(None)

    def get_current_state(self):
        metadata, tensors = self.state_source()
        return metadata, tensors, None


class LockstepPeer(RealPeer):
    """`RealPeer` for a lockstep arm with a fault trace. `holds_state=False`: a restarted peer, which has fresh
    weights and step 0 until it loads the state (`load_state`)."""

    def __init__(self, *args, holds_state: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.holds_state = holds_state
        self.faults = PeerFaults()
        self._step_started_s = 0.0

    def set_faults(self, faults: PeerFaults) -> None:
        """The straggling this peer plays (its exchange faults are armed round by round by the driver)."""
        self.faults = faults

    def advance(self, until_step: int, reply: None = None, finish: bool = False) -> list:
        """`RealPeer.advance`, one step at most (the churn driver's), and a straggler's sleep after the step's
        compute, so that the step takes 1 / speed times as long (`cluster.real.exchange_faults`)."""
        if self._pending is None:  # a step begins (else it goes on after its exchange)
            self._step_started_s = self.clock_s()
        events = super().advance(until_step, reply, finish)
        for i, e in enumerate(events):
            if not isinstance(e, MeasuredStep):
                continue
            slowdown_s = self.faults.slowdown_s(self._step_started_s, e.compute_s)
            if slowdown_s > 0:
                paused = self._paused_at is not None
                self._resume_clock()  # the sleep is the step's compute, on the arm's clock
                slept_from = time.perf_counter()
                time.sleep(slowdown_s)
                slept_s = time.perf_counter() - slept_from
                if paused:
                    self._paused_at = time.perf_counter()
                events[i] = MeasuredStep(e.step, e.loss, e.flops, e.compute_s + slept_s, self.clock_s(),
                                         straggled_s=slept_s)
        return events

    def arm_exchange_fault(self, phase: str) -> None:
        """Fail this peer's next round at `phase` (a killing phase SIGKILLs this actor's process tree)."""
        self.averager.fail_next_round(phase, os.getpid())

    def keep_round(self) -> None:
        """Step on what the last round left in the averager: the partial average of a round a member failed in
        (hivemind's outcome: each lost part holds this peer's own values), or, for the peer that cancelled, its own
        tensor. Disarms a fault that did not fire."""
        self.averager.take_fired()
        with self.averager.get_tensors() as tensors:
            self._reply = tensors[0].numpy().copy()

    def _averager_class(self) -> type:
        return MembershipAverager

    def start_averaging(self, timeouts, bandwidth_mbps: float | None) -> int:
        size = super().start_averaging(timeouts, bandwidth_mbps)
        self.averager.state_source = self._state
        self.averager.allow_state_sharing = self.holds_state
        return size

    def set_members(self, members: list[int], number: int, step: int) -> None:
        """Average with `members` from the next round on; as a donor, rank at `step`."""
        self.group_size = len(members)
        self.averager.set_membership(membership_bits(number, members, self.spec.n_workers), len(members))
        if self.holds_state:
            self.averager.state_sharing_priority = float(step)

    def remeet_done(self, timeout_s: float) -> int:
        """Wait for the pings `remeet` started (`cluster.real.partition.Remeet`); how many peers answered. A lockstep
        round needs every peer in the DHT's matchmaking, so the driver waits for them at a heal."""
        return int(self._remeeting.result(timeout=timeout_s))

    def _state(self):
        buffer = io.BytesIO()
        torch.save({"state": self.replica.export_state(), "step": self._next_step,
                    "batches_drawn": self.replica.sampler.batches_drawn}, buffer)
        blob = torch.from_numpy(np.frombuffer(buffer.getvalue(), dtype=np.uint8).copy())
        return {"donor": self.spec.worker, "step": self._next_step}, [blob]

    def load_state(self, timeout_s: float) -> dict | None:
        """Download the state from a live peer and take it (parameters, optimizer, strategy, step); None if no peer
        served one. Then this peer serves it too."""
        started = time.perf_counter()
        got = self.averager.load_state_from_peers(timeout=timeout_s)
        if got is None or not got[1]:
            return None
        metadata, tensors = got
        blob = tensors[0].numpy().tobytes()
        # Tensors and plain values only: a donor cannot make the joiner run code by what it serves.
        served = torch.load(io.BytesIO(blob), weights_only=True)
        assert served["step"] == metadata["step"], "a donor served a state of another step than it said"
        self.replica.import_state(served["state"])
        # The replica's step counter drives its schedule (warmup, cosine): the donor's, as the rest of its state.
        self.replica._progress.step = self._next_step = served["step"]
        # Its data goes on from where every live peer's is, as the simulator's replica that was down drew on meanwhile
        # (every lockstep replica draws as many batches per step): it does not read its shard's first batches again.
        self.replica.sampler.skip_to(served["batches_drawn"])
        self.holds_state = True
        self.averager.allow_state_sharing = True
        # Wall seconds: the driver holds the live peers (and so the arm's clock) at the boundary meanwhile.
        return {"donor": int(metadata["donor"]), "step": served["step"], "state_bytes": len(blob),
                "download_s": time.perf_counter() - started}

    def exchange_alone(self) -> ExchangeOutcome:
        """The only live peer's round: the average of one is its own tensor, and nothing moves."""
        request = self._pending
        assert request is not None, "exchange called with no pending exchange"
        now_s = self.clock_s()
        self._reply = np.array(request.tensor, dtype=np.float32, copy=True)
        return ExchangeOutcome(True, "", 1, 0.0, now_s - self._arrived_s, now_s, received_fraction=1.0)
