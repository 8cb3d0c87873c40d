"""Exchange faults and stragglers on a real swarm arm's peers (`faults.exchange`, `faults.stragglers`).

**Which all-reduce a round number names.** The simulator's collaborative driver (`cluster.swarm_churn`,
`arm_exchange_faults`) numbers every all-reduce of the swarm with one counter that gradient and state rounds share:
epoch e's gradient round, then, when the state is averaged at the end of e (`(e + 1) % average_state_every == 0`),
its state round. Without faults before it, epoch e's gradient round is therefore round `e + e // k` (k =
`average_state_every`) and its state round the one after. A real peer counts the same way from hivemind's epoch
(`round_of`): round r is the gradient round of epoch e if r = e + e // k, else the state (parameter) round of that
epoch. A local-updates arm averages only its state, once per hivemind epoch (of `average_state_every` local steps):
round r is epoch r's, as the simulator's r-th parameter average. Rounds are counted by the swarm's epoch, so a round
some peers missed still has its number, as in the simulator, where the counter moves on whoever is there.

**Where a peer fails**, as in hivemind 1.1.12's fault-tolerance tests (`tests/test_allreduce_fault_tolerance.py`:
`FaultyAllReduceRunner` with `Fault.FAIL_BEFORE`, `FAIL_SENDING`, `FAIL_REDUCING`, `CANCEL`), but a peer that fails
really dies: its averager process SIGKILLs its whole peer (`die`: the actor's process and everything it started, the
DHT with its p2pd and the averagers, this process last), as `RealPeer.crash` does, nobody told. In the peer's
all-reduce of that round (`cluster.real.averager.ExactAllReduceRunner` with `fault=`):
- `before`: once the group has formed and the parts are assigned, before it sends anything;
- `sending`: once it has handed half of the parts it sends to the other reducers (at least one) to the wire, so
  that some reducers have its contribution and the others never get it;
- `reducing`: once it has sent all its parts (its contribution is in the others' parts) and has begun reducing its
  own part, before it returns any average of it: its part is lost for everyone;
- `cancel`: the peer stays; it sends nothing, answers the senders CANCELLED (its part is lost at once), and its step
  ends in an error, so hivemind.Optimizer goes on with its own gradients (or, in a state round, its own parameters).
The survivors carry on as hivemind does: a lost part keeps each one's own values, a missing sender is banned after
hivemind's sender timeout (`cluster.real.averager`, the partial round's report).

A peer arms a round's fault at the first microbatch of that epoch, for the next round its averager runs; one that
did not run (the peer found itself alone) is disarmed at the epoch's end (`take_fired`). An arm that averages its
state in the background (`delay_state_averaging`) could start the round armed for epoch e while e - 1's is still
forming, so exchange faults are refused there.

**Stragglers** (`faults.stragglers`): over `[from_s, to_s)` of the arm's clock (wall seconds from its start, as the
real mode's `leave_s`), a peer with `speed` s < 1 sleeps `(1 / s - 1)` x the forward/backward it just measured after
each microbatch, so that the microbatch takes `1 / s` times as long, as the simulator divides its FLOP/s by s
(`FaultsConfig.speed`; overlapping intervals multiply). The sleep is part of the microbatch's compute: it shows in the
step records' `compute_s` as the simulator's straggling does, and `EpochRecord.straggled_s` keeps it apart. A real
peer cannot be sped up, so a speed above 1 is refused (`cluster.real.options.check_real_faults`).
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

from cluster.faults import FaultsConfig, Straggler

KILLING = ("before", "sending", "reducing")  # the phases at which a peer dies; "cancel" keeps it
GRADIENTS, PARAMETERS = "gradients", "parameters"  # which averager a round is on


def round_of(round_: int, use_local_updates: bool, average_state_every: int) -> tuple[int, str]:
    """(epoch, averager) of the swarm's `round_`-th all-reduce, counted as the simulator counts (module docstring)."""
    assert round_ >= 0 and average_state_every >= 1
    if use_local_updates:
        return round_, PARAMETERS
    k = average_state_every
    epoch = 0
    while (epoch + 1) + (epoch + 1) // k <= round_:  # the last epoch whose gradient round is at or before round_
        epoch += 1
    return (epoch, GRADIENTS) if round_ == epoch + epoch // k else (epoch, PARAMETERS)


@dataclass(frozen=True)
class ArmedRound:
    """One exchange fault as a peer arms it: in `averager`'s round of `epoch`, which is the swarm's `round`."""

    epoch: int
    averager: str  # GRADIENTS or PARAMETERS
    phase: str
    round: int
    down_s: float | None  # how long the peer stays gone (None: for good); cancel keeps it


@dataclass(frozen=True)
class PeerFaults:
    """What one peer plays itself: its exchange faults and its straggling intervals."""

    rounds: tuple[ArmedRound, ...] = ()
    stragglers: tuple[Straggler, ...] = ()

    def at_epoch(self, epoch: int) -> list[ArmedRound]:
        return [r for r in self.rounds if r.epoch == epoch]

    def speed(self, time_s: float) -> float:
        """The straggling factor at `time_s` of the arm's clock (`FaultsConfig.speed`)."""
        factor = 1.0
        for s in self.stragglers:
            if s.from_s <= time_s < s.to_s:
                factor *= s.speed
        return factor

    def slowdown_s(self, time_s: float, compute_s: float) -> float:
        """How long a microbatch that began at `time_s` and computed for `compute_s` sleeps after it."""
        return (1.0 / self.speed(time_s) - 1.0) * compute_s

    def __bool__(self) -> bool:
        return bool(self.rounds or self.stragglers)


def peer_faults(faults: FaultsConfig, n_workers: int, setup) -> list[PeerFaults]:
    """Each worker's exchange faults (mapped to epochs by `round_of` with the arm's `SwarmSetup`) and stragglers."""
    out = []
    for w in range(n_workers):
        rounds = tuple(ArmedRound(*round_of(f.round, setup.use_local_updates, setup.average_state_every), f.phase,
                                  f.round, f.down_s) for f in faults.exchange if f.worker == w)
        out.append(PeerFaults(rounds, tuple(s for s in faults.stragglers if s.worker == w)))
    return out


def check_swarm_exchange(faults: FaultsConfig, delay_state_averaging: bool, path: str = "faults") -> None:
    """Raise ValueError for exchange faults a real swarm arm cannot place on their round."""
    if faults.exchange and delay_state_averaging:
        raise ValueError(f"{path}.exchange: with delay_state_averaging a real peer's state rounds run in the "
                         f"background, and a fault armed for one epoch could land in the round of the one before; "
                         f"set delay_state_averaging = false for this arm, remove exchange, or use mode = 'sim'")


def arm_rounds(opt, faults: PeerFaults, epoch: int, armed: list[ArmedRound]) -> list[ArmedRound]:
    """Arm a peer's exchange faults of `epoch` not yet `armed`, each on its averager of `opt` (hivemind.Optimizer)
    for that averager's next round; returns those armed now."""
    new = [r for r in faults.at_epoch(epoch) if r not in armed]
    for r in new:
        averager = opt.grad_averager if r.averager == GRADIENTS else opt.state_averager
        averager.fail_next_round(r.phase, os.getpid())  # a killing phase takes this process down with it
    return new


def cancelled_rounds(opt, armed: list[ArmedRound]) -> tuple[int, ...]:
    """At the end of the epoch: the rounds of `armed` the peer cancelled (the other phases would have killed it);
    what did not fire (no round ran) is disarmed."""
    cancelled = []
    for name in sorted({r.averager for r in armed}):
        fired = (opt.grad_averager if name == GRADIENTS else opt.state_averager).take_fired()
        cancelled += [r.round for r in armed if r.averager == name and r.phase == "cancel" and "cancel" in fired]
    return tuple(sorted(cancelled))


def die(peer_pid: int) -> None:
    """SIGKILL the peer whose actor process is `peer_pid`, from one of its averager processes: every process the
    actor started (the DHT and its p2pd, the averagers) but this one, the actor, then this process. Nothing is shut
    down and no one is told, as when the machine fails."""
    import psutil

    me = os.getpid()
    assert peer_pid != me, "an averager dies with its peer, it is not the peer"
    try:
        root = psutil.Process(peer_pid)
        tree = root.children(recursive=True)
    except psutil.NoSuchProcess:
        tree, root = [], None
    for process in tree:
        if process.pid != me:
            try:
                process.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
    if root is not None:
        try:
            root.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    os.kill(me, signal.SIGKILL)


def is_actor_death(error: BaseException) -> bool:
    """Whether a call failed because the actor's process died (as a peer killed in an exchange does)."""
    try:
        import ray
    except ImportError:  # no Ray, no actors
        return False
    return isinstance(error, ray.exceptions.RayActorError)


DEAD = object()  # what `WatchedPeers.call` answers for a peer that died in an exchange


class WatchedPeers:
    """The arm's peers (`cluster.runtime.RayRuntime`, or a stand-in) for a driver whose peers may die on their own in
    an exchange: a call that finds the actor of a worker `may_die(worker)` dead answers `DEAD` for it, and the
    worker goes on `dead` for the driver to bury; any other failure is raised as it is."""

    def __init__(self, peers, may_die):
        self._peers, self._may_die = peers, may_die
        self.dead: list[int] = []

    def __getattr__(self, name):
        return getattr(self._peers, name)

    def call(self, method: str, args=None, workers=None, timeout_s: float | None = None) -> list:
        try:
            return self._peers.call(method, args, workers, timeout_s=timeout_s)
        except Exception as error:
            if workers is None or not is_actor_death(error):
                raise
        args = args or [()] * len(workers)
        out = []
        for w, a in zip(workers, args):  # one at a time, to tell who died
            try:
                out.append(self._peers.call(method, [a], [w], timeout_s=timeout_s)[0])
            except Exception as error:
                if not (is_actor_death(error) and self._may_die(w)):
                    raise
                if w not in self.dead:
                    self.dead.append(w)
                out.append(DEAD)
        return out

    def take_dead(self) -> list[int]:
        dead, self.dead = self.dead, []
        return dead
