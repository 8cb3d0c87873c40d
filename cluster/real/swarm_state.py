"""Who holds a swarm arm's state, and the lone-restart guard: a peer with fresh weights is never a donor and never
trains until it has loaded the state from a peer that holds it.

hivemind 1.1.12's `load_state_from_peers` (averaging/averager.py) reads every averager declared under
`<prefix>.all_averagers` in the DHT with its `state_sharing_priority` (hivemind.Optimizer sets it to the peer's
epoch) and downloads from the highest first, ties broken at random. An averager that allows state sharing (hivemind's
default outside client mode) declares itself from the moment it starts, at priority 0. So a peer that restarts with
fresh random weights while everyone else is gone or cut off is the only donor there is; hivemind.Optimizer then
trains it alone (its tracker sees no one, so its epochs close on its own estimate and its priority climbs with them),
and a peer that comes back behind it in epochs downloads those fresh weights (the highest priority) or averages with
them: the swarm's model is lost. A download that finds no donor also leaves hivemind.Optimizer catching up its epoch
number without the state (`Optimizer.load_state_from_peers`).

The guard (`SwarmPeer(holds_state=False)`: every peer the real mode restarts):
- its averagers start with `allow_state_sharing=False`: it declares nothing (a donor entry that is not a number is
  skipped) and answers a download with nothing;
- before its first optimizer step it loads the state with `SwarmStateAverager.load_state_from_peers`, which says
  whether a state was applied, and retries until one was (`load_from_holder`); meanwhile it computes, reports and
  averages nothing, so it takes part in no round;
- only then does it allow sharing, at the priority of the epoch it loaded (`hold_state`).
A donor is therefore a peer that started with the swarm or loaded from a donor: every state served is the swarm's.
The donor names itself in the state's metadata (`donor`), so that a join is recorded with its source.
"""

from __future__ import annotations

from dataclasses import dataclass

import hivemind
import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.optim.state_averager import TrainingStateAverager

from cluster.real.averager import PhaseFaults
from cluster.real.secret import SecretSchema


@dataclass(frozen=True)
class StateLoad:
    """A downloaded state this peer applied."""

    donor: str | None  # the donor's base58 peer id (None: a donor that did not name itself)
    epoch: int  # the state's epoch
    state_bytes: int  # parameters and optimizer statistics as received
    digest: str = ""  # `parameters_digest` of this peer's parameters once the state was applied


def parameters_digest(tensors) -> str:
    """SHA-256 of tensors' float32 bytes, in order: equal digests are bit-for-bit equal parameters."""
    import hashlib

    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().to(dtype=torch.float32, device="cpu").contiguous().numpy().tobytes())
    return h.hexdigest()


class _Downloads(DecentralizedAverager):
    """Keeps the last download (metadata, tensors), which `TrainingStateAverager.load_state_from_peers` drops."""

    _downloaded = None

    def load_state_from_peers(self, wait: bool = True, timeout: float | None = None):
        self._downloaded = super().load_state_from_peers(wait=wait, timeout=timeout)
        return self._downloaded


class SwarmStateAverager(SecretSchema, PhaseFaults, TrainingStateAverager, _Downloads):
    """hivemind.Optimizer's state averager that names itself as a donor, says whether a download was applied, binds
    its schema hash to the run secret (`run_secret=`) and plays exchange faults in its rounds (`PhaseFaults`)."""

    _applied = False
    SERVED_KEPT = 8

    def get_current_state(self):
        metadata, tensors, infos = super().get_current_state()
        # The parameters come first, in the optimizer's order; kept as digests so that a join can be checked.
        served = parameters_digest(tensors[:len(self.main_parameters)])
        self.served_digests = [*getattr(self, "served_digests", [])[-self.SERVED_KEPT + 1:], served]
        return dict(metadata, donor=self.peer_id.to_base58()), tensors, infos

    def _update_scheduler(self):
        # TrainingStateAverager calls this last, once a downloaded state is in (and after its own steps, which a
        # peer waiting for the state does not take).
        self._applied = True
        super()._update_scheduler()

    def load_state_from_peers(self, **kwargs) -> StateLoad | None:
        self._downloaded, self._applied = None, False
        try:
            super().load_state_from_peers(**kwargs)
            if not self._applied or self._downloaded is None:
                return None  # no donor answered, or hivemind refused what it got (older epoch, wrong tensors)
            metadata, tensors = self._downloaded
            return StateLoad(metadata.get("donor"), int(metadata["epoch"]),
                             sum(t.numel() * t.element_size() for t in tensors),
                             parameters_digest(self.main_parameters))
        finally:
            # The received tensors sit in shared memory that the averager's process manages: held until this
            # process exits, they outlive that manager and the process aborts as it frees them.
            self._downloaded = None


class SwarmOptimizer(hivemind.Optimizer):
    """hivemind.Optimizer with `SwarmStateAverager`: hivemind's `_make_state_averager`, with that class."""

    def _make_state_averager(self, **kwargs) -> SwarmStateAverager:
        return SwarmStateAverager(
            dht=self.dht, prefix=f"{self.run_id}_state_averager", min_matchmaking_time=self.matchmaking_time,
            allreduce_timeout=self.allreduce_timeout, shutdown_timeout=self.shutdown_timeout,
            offload_optimizer=self.offload_optimizer, custom_gradients=self.offload_optimizer,
            status_loglevel=self.status_loglevel, next_chunk_timeout=self.next_chunk_timeout,
            client_mode=self.client_mode, auxiliary=self.auxiliary, start=True, **kwargs,
        )


def load_from_holder(opt: SwarmOptimizer, timeout_s: float) -> StateLoad | None:
    """One attempt to load the swarm's state into a peer that does not hold it; None if no donor's state was applied.
    On success the peer reports its epoch and drops its accumulated gradients, as `Optimizer.load_state_from_peers`
    does, but its epoch moves only with a state that was applied."""
    load = opt.state_averager.load_state_from_peers(timeout=timeout_s)
    if load is None:
        return None
    with opt.tracker.pause_updates():
        opt.tracker.report_local_progress(local_epoch=opt.local_epoch, samples_accumulated=0)
    if opt.grad_averager is not None:
        opt.grad_averager.reset_accumulated_grads_()
    return load


def hold_state(opt: SwarmOptimizer) -> None:
    """The peer holds the swarm's state now: it becomes a donor, at the priority of its epoch."""
    if opt.client_mode:
        return  # a client-mode averager serves no downloads
    for averager in (opt.state_averager, opt.grad_averager):
        if averager is not None:
            averager.state_sharing_priority = opt.local_epoch
            averager.allow_state_sharing = True
