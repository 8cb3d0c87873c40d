"""How a real arm is set up: shaping on or off, where peers listen, and hivemind's timeouts derived from the links.

hivemind's averager has to be told how long to wait for its group and for each transfer; guessing
(`matchmaking_time = 5`?) is how real runs hang or give up early. Here every timeout is computed from the arm's
`Network` (latency for request/response round trips, bandwidth for the all-reduce itself, through the same butterfly
cost model the simulator uses) with generous floors for a busy host.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from cluster.collectives import butterfly_allreduce
from cluster.network import Link, Network
from trainer.compression import CODECS
from trainer.strategies import STRATEGIES

SHAPING = ("relay", "kernel", "none")
ALLREDUCE = ("hivemind", "gloo")  # what averages a lockstep arm's exchanges
# A link this fast is "unshaped": the Python relay moves a few hundred MB/s at most, far below it.
UNSHAPED_BPS = 1e15
# What the userspace relay itself can be relied on to move on a busy 2-core host, bit/s; bounds the all-reduce time
# when the configured links are faster than the relay.
RELAY_FLOOR_BPS = 100e6
UNSHAPED = Link(uplink_bps=UNSHAPED_BPS, downlink_bps=UNSHAPED_BPS, one_way_latency_s=0.0)


@dataclass(frozen=True)
class RealOptions:
    """`shaping`: "relay" shapes each peer's access link with a userspace relay; "kernel" puts each peer in a network
    namespace behind a tc-shaped veth pair (`cluster.shaping.fabric`; root, every peer on this machine); "none" shapes
    nothing. Whatever the backend, a relay in front of every peer counts the bytes; with "kernel" and "none" it runs at
    an unlimited rate and adds no delay.
    `host`: the address peers listen on and announce: loopback by default (every peer on this machine); "auto" is
    the address of the Ray node each peer runs on (a Ray cluster at RAY_ADDRESS).
    `max_attempts`: averaging rounds tried (all peers together) before the run stops with an error.
    `startup_timeout_s`: for building a peer (replica, relay, DHT, averager) and for the swarm's readiness barrier.
    `swarm_timeout_s`: the longest a swarm arm (collaborative, local-updates) may train before it is stopped.
    `allreduce`: the arm's `allreduce`: "hivemind" (a DecentralizedAverager per peer) or "gloo"
    (torch.distributed, unshaped: the datacenter baseline) for lockstep arms (ddp, diloco).
    `drop_parts_at`: a fault to inject (tests): at these exchanges of a lockstep arm (0-based, in order; on the first
    attempt), or in the gradient round of these epochs of a collaborative arm, worker 0, as a reducer, drops every
    other sender's parts after the first, so that the round is a partial average (`cluster.real.averager`).
    `secret`: the run secret (`cluster.real.secret`): a peer without it is refused by the DHT and the averagers."""

    shaping: str = "relay"
    host: str = "127.0.0.1"
    max_attempts: int = 3
    startup_timeout_s: float = 120.0
    swarm_timeout_s: float = 3600.0
    allreduce: str = "hivemind"
    drop_parts_at: tuple[int, ...] = ()
    secret: bytes | None = field(default=None, repr=False)  # from the environment, never the experiment file

    def __post_init__(self) -> None:
        if self.shaping not in SHAPING:
            raise ValueError(f"shaping: must be one of {', '.join(SHAPING)}, got {self.shaping!r}")
        if self.allreduce not in ALLREDUCE:
            raise ValueError(f"allreduce: must be one of {', '.join(ALLREDUCE)}, got {self.allreduce!r}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts: must be at least 1, got {self.max_attempts}")

    def link_of(self, network: Network, worker: int) -> Link:
        """The link a peer is shaped to (by its relay or by the kernel): its access link, or an unlimited one when
        shaping is off."""
        if self.shaping == "none":
            return UNSHAPED
        return network.links[worker]

    def relay_link(self, link: Link) -> Link:
        """What a peer's counting relay itself shapes: the peer's link with the relay backend, nothing otherwise."""
        return link if self.shaping == "relay" else UNSHAPED


def check_real_arm(algorithm: str, codec: str, network: Network, client_mode: Sequence[int | bool] = (),
                   speed_factors: Sequence[float] = (), shaping: str = "relay", allreduce: str = "hivemind") -> None:
    """Raise ValueError('field: what is wrong and the fix') for an arm the real mode cannot run as configured.

    The experiment file's parser can call this for `mode = "real"` so that a bad arm fails before any peer starts;
    `run_real_arm` calls it again.
    """
    real_mode = STRATEGIES[algorithm].real_mode
    if real_mode is None:
        raise ValueError(f"algorithm: {algorithm!r} does not run in the real mode yet; use one of "
                         f"{', '.join(real_algorithms())}, or mode = 'sim'")
    if codec not in CODECS:
        raise ValueError(f"codec: {codec!r} cannot run in the real mode (hivemind's all-reduce takes dense codecs "
                         f"only); use one of {', '.join(CODECS)}, or mode = 'sim'")
    if any(client_mode):
        raise ValueError("client_mode: client-mode peers do not run in the real mode yet; remove client_mode or use "
                         "mode = 'sim'")
    if any(f != 1.0 for f in speed_factors):
        raise ValueError("speed_factors: the real mode runs at the speed of the machines it is on; remove "
                         "speed_factors or use mode = 'sim'")
    if shaping not in SHAPING:
        raise ValueError(f"shaping: must be one of {', '.join(SHAPING)}, got {shaping!r}")
    if allreduce not in ALLREDUCE:
        raise ValueError(f"allreduce: must be one of {', '.join(ALLREDUCE)}, got {allreduce!r}")
    if allreduce == "gloo":
        if real_mode != "lockstep":
            raise ValueError(f"allreduce: 'gloo' averages lockstep arms ({', '.join(real_algorithms('lockstep'))}); "
                             f"{algorithm!r} runs hivemind.Optimizer; remove allreduce or set it to 'hivemind'")
        if codec != "none":
            raise ValueError(f"codec: gloo's all-reduce sends float32; set codec = 'none' or allreduce = "
                             f"'hivemind' (got {codec!r})")
        if shaping != "none":
            raise ValueError("allreduce: gloo's sockets bypass the shaping relays; set run.shaping = 'none' (gloo is "
                             "the unshaped, datacenter baseline) or allreduce = 'hivemind'")
    if shaping == "none":
        return
    if network.latency_matrix_s is not None or network.region_of is not None:
        raise ValueError("network: the real mode's relays shape each worker's access link only, not a latency matrix "
                         "or regions; give per-worker links, set shaping = 'none', or use mode = 'sim'")
    if shaping == "kernel":
        _check_kernel(network)
    elif any(link.loss > 0 for link in network.links):
        raise ValueError("network.loss: the relay does not drop packets (TCP would turn loss into delay); set "
                         "loss = 0 for the real mode, or run.shaping = 'kernel' where the kernel has netem")


def check_real_faults(algorithm: str, faults, path: str = "faults", allreduce: str = "hivemind",
                      settings=None) -> None:
    """Raise ValueError('path.key: what is wrong and the fix') for a fault trace (`cluster.faults.FaultsConfig`) that
    real peers cannot play. Real peers play failures and returns (events, mtbf/mttr), exchange faults and stragglers
    that slow a peer down (`cluster.real.exchange_faults`) on swarm arms (`cluster.real.swarm_churn`; no exchange
    faults with `delay_state_averaging` in the arm's `settings`) and on lockstep arms averaging with hivemind
    (`cluster.real.lockstep_churn`); both also play partitions, cut in the shaping relays
    (`cluster.real.partition`)."""
    swarm = STRATEGIES[algorithm].real_mode == "swarm"
    if not swarm and allreduce != "hivemind":
        raise ValueError(f"{path}: a {allreduce} all-reduce has a fixed process group, so real peers cannot leave "
                         f"it; set allreduce = 'hivemind' for this arm, or give it mode = 'sim'")
    fast = next((i for i, s in enumerate(faults.stragglers) if s.speed > 1), None)
    if fast is not None:
        raise ValueError(f"{path}.stragglers[{fast}].speed: a real peer runs at its machine's speed at most; give a "
                         f"factor of at most 1 (got {faults.stragglers[fast].speed:g}) or use mode = 'sim'")
    if swarm:
        from cluster.real.exchange_faults import check_swarm_exchange

        check_swarm_exchange(faults, bool(getattr(settings, "delay_state_averaging", False)), path)
    if "sender_timeout" in faults.raw or "reducer_timeout" in faults.raw:
        key = "sender_timeout" if "sender_timeout" in faults.raw else "reducer_timeout"
        after = "after the arm's matchmaking_time" if swarm else "after the timeouts derived from the arm's network"
        raise ValueError(f"{path}.{key}: real peers time out as hivemind does ({after}); remove {key} or use "
                         f"mode = 'sim'")
    if faults.state_sources != 1:
        raise ValueError(f"{path}.state_sources: hivemind's load_state_from_peers downloads from one peer; set "
                         f"state_sources = 1 or use mode = 'sim'")


def _check_kernel(network: Network) -> None:
    """Whether this machine can build the arm's links with tc: root, iproute2, and netem for latency/jitter/loss."""
    from cluster.shaping.fabric import ShapingUnavailable, check_links

    try:
        check_links(network.links)
    except ShapingUnavailable as error:
        raise ValueError(f"shaping: {error}") from None


def real_algorithms(real_mode: str | None = None) -> list[str]:
    """The algorithms that run on real peers, lockstep ones first (or those of one real mode: "lockstep", "swarm")."""
    modes = ("lockstep", "swarm") if real_mode is None else (real_mode,)
    return [name for mode in modes for name, strategy in STRATEGIES.items() if strategy.real_mode == mode]


def describe_shaping(shaping: str) -> str:
    """One line for a run manifest's shaping backend."""
    if shaping == "none":
        return ("none: a userspace relay in front of each peer counts bytes but adds no rate limit or delay "
                "(loopback speed)")
    from cluster.shaping import describe

    if shaping == "kernel":
        return (describe("kernel") + "; all namespaces on one Linux bridge, so a byte from peer i to peer j crosses "
                "i's uplink then j's downlink; an unshaped relay inside each namespace counts the bytes")
    return (describe("relay") + "; one relay per peer, shaping connections accepted by that peer with its access "
            "link (downlink inbound, uplink outbound, its one-way latency once per direction)")


def part_size_bytes(nbytes: int, n_workers: int) -> int:
    """The averager's part size: at least 8 parts per peer, between 4 KiB and hivemind's default of 512 KiB.

    hivemind cuts the vector into parts of `part_size_bytes` and gives each peer whole parts; with its default a vector
    under 512 KiB is a single part, so one peer reduces all of it and the others talk only to that peer. The cost
    model (`cluster.collectives.butterfly_allreduce`) splits the vector finely in proportion to bandwidth; small parts
    make the real all-reduce do what the model assumes.
    """
    return int(min(2**19, max(4096, nbytes // (8 * max(1, n_workers)))))


@dataclass(frozen=True)
class AveragingTimeouts:
    """`request_timeout_s`: one matchmaking RPC; `min_matchmaking_time_s`: how long a leader gathers its group (a full
    group starts at once; hivemind needs it above the request timeout); `matchmaking_deadline_s`: `step(timeout=)`, the
    time to find a group, with hivemind's retries inside it; `allreduce_timeout_s`: the transfer itself once the group
    has formed; `next_chunk_timeout_s`: hivemind's sender timeout (a reducer gives up on a sender that sends no part for
    this long; reducers get twice as long), so that a peer that dropped out of a formed group costs seconds, not the
    whole all-reduce timeout; `call_timeout_s`: the driver's bound on one averaging call, everything included."""

    request_timeout_s: float
    min_matchmaking_time_s: float
    matchmaking_deadline_s: float
    allreduce_timeout_s: float
    next_chunk_timeout_s: float
    predicted_allreduce_s: float  # the cost model's figure for the shaped links, for the record

    @property
    def call_timeout_s(self) -> float:
        return self.matchmaking_deadline_s + self.allreduce_timeout_s + 30.0


def averaging_timeouts(network: Network, nbytes: int, options: RealOptions) -> AveragingTimeouts:
    """Timeouts for averaging `nbytes` (one peer's message) among every worker of `network`."""
    n = network.n_workers
    participants = list(range(n))
    if options.shaping == "none" or n < 2:
        rtt_s, predicted_s = 0.0, 0.0
    else:
        rtt_s = 2 * max(network.pair_latency_s(i, j) + network.pair_jitter_s(i, j)
                        for i in participants for j in participants if i != j)
        predicted_s = butterfly_allreduce(network, participants, nbytes).time_s
    # Each peer sends and receives about 2 messages' worth in a butterfly all-reduce; the relay's own ceiling applies.
    relay_s = 2 * nbytes * 8 / RELAY_FLOOR_BPS
    request_s = max(3.0, 20 * rtt_s)  # a matchmaking RPC is a few round trips; hivemind's default is 3 s
    min_matchmaking_s = max(5.0, 2 * request_s)
    # Between two parts from one sender a reducer may wait for every other sender's part on its downlink.
    slowest_bps = min(RELAY_FLOOR_BPS, *(min(l.uplink_bps, l.downlink_bps) for l in network.links)) \
        if options.shaping != "none" else RELAY_FLOOR_BPS
    part_s = n * part_size_bytes(nbytes, n) * 8 / slowest_bps
    return AveragingTimeouts(
        request_timeout_s=request_s,
        min_matchmaking_time_s=min_matchmaking_s,
        matchmaking_deadline_s=3 * min_matchmaking_s,
        allreduce_timeout_s=60.0 + 5 * (predicted_s + relay_s),
        next_chunk_timeout_s=max(10.0, 4 * part_s + 10 * rtt_s),
        predicted_allreduce_s=predicted_s,
    )
