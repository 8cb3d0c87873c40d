"""How a swarm's peers find each other and wait for a round: hivemind.Optimizer's matchmaking and timeouts.

These belong to the cluster, not to the algorithm: the collaborative strategy only accumulates samples and averages
gradients; when an epoch's end is noticed, how long a leader gathers its group and how long a peer waits for the round
are decided by the simulator's collaborative driver (`cluster.collaborative`) from these figures, and passed to
`hivemind.Optimizer` by the real mode (`cluster.real.swarm`). An experiment file still sets them per arm, in the
collaborative arm's `algorithm` table.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.settings import setting


@dataclass(frozen=True)
class SwarmTiming:
    """`matchmaking_time` binds: with hivemind's default `target_group_size` (None, here 0) a leader gathers its group
    for `matchmaking_time` from when it began looking, and hivemind.Optimizer begins looking once the epoch is due
    within `matchmaking_time`. An epoch shorter than that lasts its first microbatch, then `matchmaking_time`, then
    the all-reduce. A `target_group_size` the whole swarm fits lets the leader start as soon as every peer has
    joined."""

    # hivemind.Optimizer's defaults: how long a leader gathers its group (the averagers' min_matchmaking_time),
    # and how long a peer waits for the round once it has noticed the epoch's end.
    matchmaking_time: float = setting(15.0, "seconds a leader gathers its group (the averagers' min_matchmaking_time)",
                                      low=0.0, high=3600.0)
    averaging_timeout: float = setting(60.0, "seconds a peer waits for the round, matchmaking included, once it has "
                                       "noticed the epoch's end", low=0.0, high=86400.0, low_open=True)
    # The averager's target_group_size: a leader starts as soon as its group has this many peers. 0 stands for
    # hivemind's default None (no target: the leader gathers for matchmaking_time); else at least run.workers.
    target_group_size: int = setting(0, "a leader starts once its group has this many peers; at least run.workers",
                                     low=0, note="0: hivemind's default None")
    # How often peers refresh the swarm's progress from the DHT (hivemind's ProgressTracker
    # min_refresh_period): the epoch is noticed up to this late, plus one DHT lookup.
    progress_refresh_s: float = setting(0.5, "seconds between refreshes of the swarm's progress from the DHT "
                                        "(hivemind's min_refresh_period)", low=0.0, high=3600.0)

    def check_arm(self, n_workers: int) -> None:
        """Raise ValueError('field: ...') if this timing cannot run with this many peers."""
        if 0 < self.target_group_size < n_workers:
            raise ValueError(
                f"target_group_size: {self.target_group_size} would split the {n_workers} peers into several "
                "groups, each averaging on its own, and the simulator forms one group per epoch; set it to "
                f"{n_workers} or more (the leader starts once everyone has joined) or leave it at 0 (hivemind's "
                "default: the leader gathers for matchmaking_time)"
            )
