"""How a real arm is set up: shaping on or off, where peers listen, and hivemind's timeouts derived from the links.

hivemind's averager has to be told how long to wait for its group and for each transfer; guessing
(`matchmaking_time = 5`?) is how real runs hang or give up early. Here every timeout is computed from the arm's
`Network` (latency for request/response round trips, bandwidth for the all-reduce itself, through the same butterfly
cost model the simulator uses) with generous floors for a busy host.
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster.collectives import butterfly_allreduce
from cluster.network import Link, Network

SHAPING = ("relay", "none")
# A link this fast is "unshaped": the Python relay moves a few hundred MB/s at most, far below it.
UNSHAPED_BPS = 1e15
# What the userspace relay itself can be relied on to move on a busy 2-core host, bit/s; bounds the all-reduce time
# when the configured links are faster than the relay.
RELAY_FLOOR_BPS = 100e6


@dataclass(frozen=True)
class RealOptions:
    """`shaping`: "relay" shapes each peer's access link with a userspace relay; "none" still puts a relay in front of
    every peer (it is what counts bytes) but at an unlimited rate and no added delay.
    `host`: the address peers listen on and announce (loopback by default: every peer on this machine).
    `max_attempts`: averaging rounds tried (all peers together) before the run stops with an error.
    `startup_timeout_s`: for building a peer (replica, relay, DHT, averager) and for the swarm's readiness barrier."""

    shaping: str = "relay"
    host: str = "127.0.0.1"
    max_attempts: int = 3
    startup_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.shaping not in SHAPING:
            raise ValueError(f"shaping: must be one of {', '.join(SHAPING)}, got {self.shaping!r}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts: must be at least 1, got {self.max_attempts}")

    def link_of(self, network: Network, worker: int) -> Link:
        """The link a peer's relay is shaped to: its access link, or an unlimited one when shaping is off."""
        if self.shaping == "none":
            return Link(uplink_bps=UNSHAPED_BPS, downlink_bps=UNSHAPED_BPS, one_way_latency_s=0.0)
        return network.links[worker]


@dataclass(frozen=True)
class AveragingTimeouts:
    """`request_timeout_s`: one matchmaking RPC; `min_matchmaking_time_s`: how long a leader gathers its group (a full
    group starts at once; hivemind needs it above the request timeout); `matchmaking_deadline_s`: `step(timeout=)`, the
    time to find a group, with hivemind's retries inside it; `allreduce_timeout_s`: the transfer itself once the group
    has formed; `call_timeout_s`: the driver's bound on one averaging call, everything included."""

    request_timeout_s: float
    min_matchmaking_time_s: float
    matchmaking_deadline_s: float
    allreduce_timeout_s: float
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
    return AveragingTimeouts(
        request_timeout_s=request_s,
        min_matchmaking_time_s=min_matchmaking_s,
        matchmaking_deadline_s=3 * min_matchmaking_s,
        allreduce_timeout_s=60.0 + 5 * (predicted_s + relay_s),
        predicted_allreduce_s=predicted_s,
    )
