"""Faults and churn in the simulator's collaborative arms: epochs closed by the peers that are there, joins that pay
for the state, the lone-restart guard, replay."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cluster.collectives import butterfly_allreduce, butterfly_parts
from cluster.devices import get_device
from cluster.driver import ArmPlan
from cluster.faults import FaultTrace, parse_faults
from cluster.network import Link, Network
from cluster.records import CommRecord, EvalRecord, FaultRecord, StepRecord
from cluster.runtime import LocalRuntime
from cluster.swarm_churn import CollaborativeChurnDriver
from cluster.swarm_timing import SwarmTiming
from simtools import SEED, TINY, TINY_DATA, TINY_OPTIM
from trainer.model import training_flops_per_token
from trainer.replica import ReplicaSpec
from trainer.strategies.collaborative import CollaborativeSettings

BATCH = 2
SPEED = 0.0003  # a microbatch of the tiny model takes ~0.47 s: longer than noticing an epoch's end
LATENCY_S = 5e-3  # one way, every link
# What the driver charges a microbatch: the replica's FLOPs over the device's effective FLOP/s (`seconds_at`).
D = training_flops_per_token(TINY, TINY.block_size) * BATCH * TINY.block_size / (
    get_device("laptop-cpu").effective_flops * SPEED)
NO_STATE_ROUNDS = 10**6


def links(n: int, joiner_downlink_bps: float = 10e6) -> Network:
    """10 Mbit/s both ways, except the last peer's downlink: a download to it is bound by its source's uplink."""
    return Network(tuple(Link(10e6, joiner_downlink_bps if w == n - 1 else 10e6, LATENCY_S) for w in range(n)))


def swarm_run(n: int, steps: int, faults: dict, *, target: int = 12, seed: int = SEED, network=None,
              matchmaking_time: float = 0.0, average_state_every: int = NO_STATE_ROUNDS, eval_every: int | None = None):
    settings = CollaborativeSettings(target_batch_size=target, average_state_every=average_state_every)
    # A group of every peer starts at once; one with a peer missing waits out matchmaking_time (0 unless given).
    timing = SwarmTiming(matchmaking_time=matchmaking_time, target_group_size=n, progress_refresh_s=0.0)
    specs = [ReplicaSpec(w, n, seed, TINY, TINY_DATA, TINY_OPTIM, BATCH, steps, "collaborative", settings,
                         eval_batches=2) for w in range(n)]
    plan = ArmPlan(name="arm", n_workers=n, network=network or links(n), devices=(get_device("laptop-cpu"),) * n,
                   speed_factors=(SPEED,) * n, codec="none", total_steps=steps,
                   tokens_per_step=n * BATCH * TINY.block_size, eval_every_steps=eval_every or steps, seed=seed, swarm=timing)
    runtime = LocalRuntime(specs)
    records: list = []
    driver = CollaborativeChurnDriver(runtime, plan, parse_faults("faults", faults, n), records.append)
    driver.run()
    return runtime, records, driver


def of(records, cls, **fields):
    return [r for r in records if isinstance(r, cls) and all(getattr(r, k) == v for k, v in fields.items())]


def after(t: float, k: int) -> float:
    """k microbatches from t, as the clock adds them."""
    for _ in range(k):
        t += D
    return t


def test_a_gone_peers_samples_stop_counting_and_a_returning_peer_pays_for_the_state():
    # Three peers of 2 sequences, target 12. Peer 2 fails at 0.2 s: the epoch closes when peers 0 and 1 have made
    # 3 microbatches each, at 3D (with all three, 2 each would have closed it at 2D).
    runtime, records, driver = swarm_run(3, 6, {"events": [{"worker": 2, "leave_s": 0.2, "return_s": 1.55}]},
                                         network=links(3, joiner_downlink_bps=250e6))
    (leave,) = of(records, FaultRecord, event="leave")
    assert (leave.worker, leave.time_s, leave.step, leave.lost_s) == (2, 0.2, 0, 0.2)  # its compute from 0 is lost
    first, second = of(records, CommRecord)[:2]
    pair = 2 * LATENCY_S
    notice = (0.0 + 3 * 2 * pair) + 2 * pair  # refresh 0, ceil(log2 3) + 1 DHT hops, one round trip to the leader
    assert first.participants == [0, 1] and first.absent == [2] and first.samples == [6, 6]
    assert first.epoch_closed_s == after(0.0, 3)
    # Matchmaking 0: the group of two (not the full three) starts once the peers are ready.
    assert first.ready_s == first.round_start_s == after(0.0, 3) + notice
    assert first.time_s == first.round_start_s + first.comm_s
    assert not of(records, StepRecord, worker=2, step=0)

    # Back at 1.55 s, after the others noticed the epoch's end (1.50 s), during round 0: it downloads from peer 0
    # (the lowest index of equal links) once the round is over and peer 0 holds the new state, bound by peer 0's
    # 10 Mbit/s uplink (its own downlink is 250 Mbit/s), plus one latency.
    assert first.ready_s < 1.55 < first.time_s
    ret, join = of(records, FaultRecord, event="return")[0], of(records, FaultRecord, event="join")[0]
    assert (ret.worker, ret.time_s) == (2, 1.55)
    assert join.worker == 2 and join.sources == [0] and join.step == 1
    params = runtime.replicas[0].num_params()
    n_tensors = len(list(runtime.replicas[0].model.parameters()))
    # parameters, AdamW's two moments, the gradient accumulator (4 bytes each), and AdamW's step per tensor
    assert join.state_bytes == 16 * params + 4 * n_tensors
    assert join.download_s == 8 * join.state_bytes / 10e6 + pair
    assert join.wait_s == first.time_s - 1.55
    assert join.time_s == first.time_s + join.download_s

    # Epoch 1: peers 0 and 1 start at 4D (their late microbatch), carrying 2 samples each; peer 2 computes from its
    # download's end. Counted: 4, then 2 + 2 at 5D, 2 at the joiner's first, 2 at 6D: the target, at 6D.
    assert join.time_s + D < after(0.0, 6)
    assert second.participants == [0, 1, 2] and second.absent is None
    assert second.epoch_closed_s == after(after(0.0, 4), 2) and second.samples == [6, 6, 2]
    (step,) = of(records, StepRecord, worker=2, step=1)
    assert step.samples == 2 and step.staleness == 0
    # It holds the swarm's state: after the same averaged step every peer has the same parameters, bit for bit.
    p = runtime.call("params")
    assert np.array_equal(p[0], p[2]) and np.array_equal(p[1], p[2])


def test_a_peer_back_before_the_epochs_end_is_noticed_tags_along_in_its_round():
    # Back at 1.0 s, before the others notice epoch 0's end (3D + notice = 1.50 s): it downloads at once (no
    # optimizer state yet: parameters and gradient accumulator, 4 bytes each) and is in round 0 with the samples it
    # made by then, none: hivemind's joiner tags along with weight 0, and steps with the others.
    runtime, records, _ = swarm_run(3, 3, {"events": [{"worker": 2, "leave_s": 0.2, "return_s": 1.0}]},
                                    network=links(3, joiner_downlink_bps=250e6))
    (join,) = of(records, FaultRecord, event="join")
    assert join.state_bytes == 8 * runtime.replicas[0].num_params() and join.wait_s == 0.0
    assert join.time_s == 1.0 + (8 * join.state_bytes / 10e6 + 2 * LATENCY_S) and join.step == 0
    first = of(records, CommRecord)[0]
    assert first.participants == [0, 1, 2] and first.samples == [6, 6, 0] and first.absent is None
    assert join.time_s < first.ready_s < join.time_s + D  # no microbatch of its own by then
    p = runtime.call("params")
    assert np.array_equal(p[0], p[2]) and np.array_equal(p[1], p[2])


def test_a_straggler_counts_fewer_samples_and_the_sides_of_a_partition_average_apart():
    # Peer 2 at half speed over the first 10 s: completions at D (peers 0, 1), 2D (0, 1, 2), 3D (0, 1): the 12th
    # sample at 3D, when peer 2 has made one microbatch and is half-way through its second (carried over).
    _, records, _ = swarm_run(3, 3, {"stragglers": [{"worker": 2, "from_s": 0, "to_s": 10, "speed": 0.5}]})
    comm = of(records, CommRecord)[0]
    half = training_flops_per_token(TINY, TINY.block_size) * BATCH * TINY.block_size / (
        get_device("laptop-cpu").effective_flops * SPEED * 0.5)
    assert comm.epoch_closed_s == after(0.0, 3) and comm.samples == [6, 6, 2] and comm.absent is None
    assert [(r.worker, r.late_samples, r.compute_s) for r in of(records, StepRecord, step=0)] == [
        (0, 2, after(0.0, 4)), (1, 2, after(0.0, 4)), (2, 2, 0.0 + half + half)]

    # Cut into [0, 1] and [2] for the whole run: one round, two groups that average apart, one absent from each.
    runtime, records, _ = swarm_run(3, 3, {"partition": [{"groups": [[0, 1], [2]], "from_s": 0, "to_s": 100}]})
    first, second = of(records, CommRecord)[:2]
    assert first.round == second.round == 0 and (first.group, second.group) == (0, 1)
    assert (first.participants, first.absent, second.participants, second.absent) == ([0, 1], [2], [2], [0, 1])
    p = runtime.call("params")
    assert np.array_equal(p[0], p[1]) and not np.array_equal(p[0], p[2])


def test_a_seeded_trace_replays_bit_for_bit():
    faults = {"mtbf": "4s", "mttr": "1s"}
    _, first, _ = swarm_run(3, 8, faults)
    _, again, _ = swarm_run(3, 8, faults)
    assert [json.dumps(r.to_json()) for r in first] == [json.dumps(r.to_json()) for r in again]
    leaves = of(first, FaultRecord, event="leave")
    assert of(first, FaultRecord, event="join") and leaves
    trace = FaultTrace(parse_faults("faults", faults, 3), 3, SEED)
    for w in range(3):
        times = [r.time_s for r in leaves if r.worker == w]
        # Each failure is the trace's: at the drawn time, or at the end of the round it fell in.
        assert all(t >= trace.outage(w, i).leave for i, t in enumerate(times))


def test_a_peer_that_restarts_alone_waits_and_never_replaces_the_swarm():
    # Peer 2 leaves at epoch 0 and is back at epoch 1, cut off from peers 0 and 1 until 4 s: it has no one to
    # download from, so it waits with no state and takes no part; once the cut heals it downloads from them.
    faults = {"events": [{"worker": 2, "leave_step": 0, "return_step": 1}],
              "partition": [{"groups": [[0, 1], [2]], "from_s": 0, "to_s": 4.0}]}
    runtime, records, _ = swarm_run(3, 8, faults, average_state_every=1)
    (ret,) = of(records, FaultRecord, event="return")
    (join,) = of(records, FaultRecord, event="join")
    assert ret.step == 1 and join.worker == 2 and join.sources == [0]
    assert join.time_s - join.download_s >= 4.0 and join.wait_s > 0
    assert all(r.participants == [0, 1] for r in of(records, CommRecord) if r.time_s < join.time_s)
    assert not [r for r in of(records, FaultRecord, event="join") if 2 in r.sources]
    p = runtime.call("params")
    assert np.array_equal(p[0], p[2]) and np.array_equal(p[1], p[2])

    # Everyone gone, one back alone: the swarm's state went with the last peer, so the arm ends there; the one that
    # comes back never starts the swarm again from its own weights, and the last consensus stands.
    _, records, driver = swarm_run(2, 8, {"events": [{"worker": 0, "leave_s": 1.5, "return_s": 2.0},
                                                     {"worker": 1, "leave_s": 1.8}]}, eval_every=1)
    assert not of(records, FaultRecord, event="join") and not of(records, FaultRecord, event="return")
    assert max(r.step for r in of(records, StepRecord)) == 0  # epoch 0 only
    assert of(records, EvalRecord)[-1].step == 1 and isinstance(records[-1], FaultRecord)  # nothing after
    assert driver.exchanges.status == ["down", "down"]


@pytest.mark.parametrize("phase", ["sending", "cancel"])
def test_a_peer_failing_in_a_round_loses_its_part_after_hivemind_optimizers_timeouts(phase):
    # matchmaking_time 0.4 s: hivemind.Optimizer's sender timeout (its next_chunk_timeout) is 0.4 s and its reducer
    # timeout 0.8 s. Peer 1 fails while sending in round 0: peers 0 and 2 wait 0.8 s for its part, which they keep
    # at their own values, and step on that partial average; it leaves when the round ends, for good. One that
    # cancels stays, its part lost at once.
    runtime, records, driver = swarm_run(3, 6, {"exchange": [{"worker": 1, "round": 0, "phase": phase}]},
                                         matchmaking_time=0.4)
    assert (driver.faults.sender_timeout_s, driver.faults.reducer_timeout_s) == (0.4, 0.8)
    comm = of(records, CommRecord)[0]
    size = runtime.replicas[0].num_params()
    parts = butterfly_parts(size, [10.0] * 3)  # equal links
    fraction = 1 - parts[1] / size
    assert comm.missing_peers == [1] and comm.received_fraction == [fraction, 0.0, fraction]
    alone = butterfly_allreduce(links(3), [0, 1, 2], comm.message_bytes, vector_size=size).time_s
    if phase == "sending":
        assert comm.comm_s == 0.8 > alone
        (leave,) = of(records, FaultRecord, event="leave")
        assert (leave.worker, leave.phase, leave.round, leave.time_s) == (1, "sending", 0, comm.time_s)
        assert leave.timeout_s == (0.8 - alone) * 2  # worker-seconds the two survivors waited beyond the round
        assert of(records, CommRecord)[1].absent == [1] and not of(records, StepRecord, worker=1, step=0)
    else:
        (cancel,) = of(records, FaultRecord, event="cancel")
        assert cancel.worker == 1 and comm.comm_s == alone and of(records, StepRecord, worker=1, step=0)
        assert not of(records, FaultRecord, event="leave")
