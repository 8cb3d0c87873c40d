"""hivemind-style collaborative large batch: epochs close on the swarm's samples, peers at their own speeds."""

import numpy as np
import pytest
import torch
from simtools import SEED, TINY, TINY_DATA, TINY_OPTIM, simulate

from cluster.devices import get_device
from cluster.network import Link, Network
from trainer.data import ShardSampler, load_corpus
from trainer.model import GPT, training_flops_per_token
from cluster.swarm_timing import SwarmTiming
from trainer.strategies.collaborative import CollaborativeSettings


NO_STATE_ROUNDS = 10**6  # epochs between state averages: none in these runs, whose timing is the gradient round's


def collaborative(target_batch_size: int, average_state_every: int = NO_STATE_ROUNDS,
                  **timing) -> tuple[CollaborativeSettings, SwarmTiming]:
    """The strategy's settings and the arm's swarm timing, both of which an arm's algorithm table sets."""
    return (CollaborativeSettings(target_batch_size=target_batch_size, average_state_every=average_state_every),
            SwarmTiming(**timing))


INSTANT, INSTANT_TIMING = collaborative(16, average_state_every=1, progress_refresh_s=0.0)  # hivemind's default


def no_latency(n):
    return Network(tuple(Link(1e9, 1e9, 0.0) for _ in range(n)))


def test_equal_peers_without_latency_reproduce_synchronous_large_batch_training():
    n, b, epochs = 2, 2, 6
    steps = epochs * INSTANT.target_batch_size // (n * b)  # token budget of six epochs
    run = simulate(n, b, steps, "collaborative", INSTANT, swarm=INSTANT_TIMING, network=no_latency(n))
    # Each epoch: the gradients, then (hivemind's default average_state_every = 1) the parameters.
    assert [r.payload for r in run.of("comm")] == ["gradients", "parameters"] * epochs
    assert all(r.samples == [8, 8] for r in run.of("comm") if r.payload == "gradients")
    # Reference: one replica; each step's batch is every peer's four microbatches of this epoch.
    train = load_corpus(TINY_DATA, SEED).train
    samplers = [ShardSampler(train, w, n, b, TINY.block_size, SEED) for w in range(n)]
    torch.manual_seed(SEED)
    model = GPT(TINY)
    optimizer = model.configure_optimizers(TINY_OPTIM.weight_decay, TINY_OPTIM.lr, (TINY_OPTIM.beta1, TINY_OPTIM.beta2))
    for epoch in range(epochs):
        optimizer.zero_grad()
        batches = [s.next_batch() for s in samplers for _ in range(4)]
        x, y = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
        model(x, y)[1].backward()
        for group in optimizer.param_groups:
            # The arm's schedule in tokens: epoch e starts after 4e steps' worth of samples.
            group["lr"] = TINY_OPTIM.lr_at(4 * epoch, steps)
        torch.nn.utils.clip_grad_norm_(model.parameters(), TINY_OPTIM.grad_clip)
        optimizer.step()
    expected = torch.nn.utils.parameters_to_vector(model.parameters()).detach().numpy()
    for params in run.runtime.call("params"):
        np.testing.assert_allclose(params, expected, rtol=1e-4, atol=1e-5)


def test_a_peer_twice_as_fast_contributes_two_thirds_of_each_epoch():
    settings, timing = collaborative(24, progress_refresh_s=0.0)
    run = simulate(2, 2, 24, "collaborative", settings, swarm=timing, network=no_latency(2), speed_factors=(2.0, 1.0))
    shares = [r.samples[0] / sum(r.samples) for r in run.of("comm")]
    assert shares == [pytest.approx(2 / 3)] * len(shares)
    assert {tuple(r.samples) for r in run.of("comm")} == {(16, 8)}


def test_latency_delays_the_round_and_late_microbatches_go_to_the_next_epoch():
    # The round starts a refresh plus DHT lookups after the target is reached, so peers overshoot
    # the target, and the slow peer is mid-microbatch when the round begins. Slow devices keep the
    # overshoot to a few microbatches (tiny's microbatch takes 7 ms and 14 ms here). The group is
    # full (target_group_size), so matchmaking adds no wait.
    settings, timing = collaborative(24, progress_refresh_s=0.002, target_group_size=2)
    network = {"bandwidth": "1Gbit", "latency": "0.5ms"}
    run = simulate(2, 2, 48, "collaborative", settings, swarm=timing, network=network, speed_factors=(0.02, 0.01))
    comm = run.of("comm")
    assert all(sum(r.samples) >= 24 for r in comm)
    # Refresh 2 ms, DHT lookup ceil(log2 2) + 1 = 2 round trips of 2 x 1 ms, one round trip to the leader.
    notice_s = 0.002 + 2 * 2 * 0.001 + 2 * 0.001
    assert [r.round_start_s - r.epoch_closed_s for r in comm] == [pytest.approx(notice_s)] * len(comm)
    fast_share = sum(r.samples[0] for r in comm) / sum(sum(r.samples) for r in comm)
    assert 0.6 < fast_share < 0.75
    steps = run.of("step")
    assert any(r.late_samples for r in steps) and any(r.staleness == 1 for r in steps)
    evals = [r.loss for r in run.of("eval")]
    assert evals[-1] < evals[0]


def test_the_token_budget_caps_an_epoch_that_latency_would_stretch():
    # On home links the tiny model's microbatch takes 0.14 ms while noticing the epoch takes ~0.2 s:
    # without the cap one epoch would train thousands of microbatches past the budget.
    settings, timing = collaborative(24, progress_refresh_s=0.05)
    run = simulate(2, 2, 12, "collaborative", settings, swarm=timing, network="home-broadband")
    (comm,) = run.of("comm")
    assert sum(comm.samples) == 12 * 2 * 2  # the budget: 12 steps of 2 workers x 2 sequences
    assert run.of("eval")[-1].tokens == 12 * 2 * 2 * TINY.block_size


def test_a_round_slower_than_averaging_timeout_fails_and_peers_step_alone():
    # 50 kbit/s links: averaging tiny's 136 kB gradient takes tens of seconds, beyond a 1 s timeout.
    # A full group (target_group_size) starts at once, so the timeout is all the all-reduce's.
    settings, timing = collaborative(8, progress_refresh_s=0.0, averaging_timeout=1.0,
                                     target_group_size=2)
    network = {"bandwidth": "50kbit", "latency": "1ms"}
    run = simulate(2, 2, 4, "collaborative", settings, swarm=timing, network=network)
    comm = run.of("comm")
    assert comm and all(r.failed for r in comm)
    assert all(r.round_start_s == r.ready_s for r in comm)
    assert all(r.time_s - r.round_start_s == pytest.approx(1.0) for r in comm)
    first, second = run.runtime.call("params")
    assert not np.allclose(first, second)  # each peer applied its own gradients


# Two equal peers of 2 sequences, target 16: each finishes 4 microbatches of d seconds, the epoch
# closes at its start + 4d and, without latency, the peers are ready then. 10 Mbit/s links: in the
# butterfly all-reduce each of 2 peers sends and receives the whole gradient message (hivemind's
# serialization: 4 bytes a parameter and a few bytes of framing), so it takes D = 8 * bytes / 1e7 s.
D_ = training_flops_per_token(TINY) * 2 * TINY.block_size / get_device("laptop-cpu").effective_flops
PARAMS = sum(p.numel() for p in GPT(TINY).parameters())
MESSAGE_BYTES = 4 * PARAMS + 18  # float32 values + the protobuf's framing
D_ALLREDUCE = 8 * MESSAGE_BYTES / 10e6


def ten_mbit(n):
    return Network(tuple(Link(10e6, 10e6, 0.0) for _ in range(n)))


@pytest.mark.parametrize(
    # hivemind pre-schedules at its first step (after a microbatch) with the epoch due within
    # matchmaking_time; the leader begins matchmaking_time later. In units of d from the epoch's start:
    "matchmaking_time, target_group_size, match_d, start_d",
    [
        (0.5, 0, 1, None),  # M >> the epoch: looking from the first microbatch, the round at d + M
        (2.5 * D_, 0, 2, 4.5),  # due at 1.5d: looking from microbatch 2, the round at 2d + M = 4.5d
        (0.5 * D_, 0, 4, 4.5),  # due at 3.5d: looking from microbatch 4 (the close), the round at 4d + M
        (0.0, 0, 4, 4),  # M = 0: looking from the close, the round starts when the peers are ready
        (0.5, 2, 1, 4),  # the group of 2 is full: the leader starts when the peers are ready
    ],
)
def test_the_round_waits_for_the_leaders_matchmaking_window(matchmaking_time, target_group_size, match_d, start_d):
    settings, timing = collaborative(16, progress_refresh_s=0.0, matchmaking_time=matchmaking_time,
                                     target_group_size=target_group_size)
    epochs = 3
    run = simulate(2, 2, epochs * 16 // 4, "collaborative", settings, swarm=timing, network=ten_mbit(2))
    comm, steps = run.of("comm"), run.of("step")
    assert len(comm) == epochs and len(steps) == 2 * epochs
    t = 0.0  # every epoch starts when the previous round ends: no peer is mid-microbatch then
    for e, r in enumerate(comm):
        closed = t + 4 * D_
        round_start = t + (start_d * D_ if start_d is not None else D_ + matchmaking_time)
        end = round_start + D_ALLREDUCE
        assert r.samples == [8, 8] and not r.failed
        assert r.message_bytes == MESSAGE_BYTES
        assert r.comm_s == pytest.approx(D_ALLREDUCE, rel=1e-9)
        assert r.epoch_closed_s == pytest.approx(closed, rel=1e-9)
        assert r.ready_s == pytest.approx(closed, rel=1e-9)
        assert r.matchmaking_start_s == pytest.approx(t + match_d * D_, rel=1e-9)
        assert r.round_start_s == pytest.approx(round_start, rel=1e-9)
        assert r.time_s == pytest.approx(end, rel=1e-9)
        assert r.idle_s == [pytest.approx(end - closed, rel=1e-9)] * 2
        for step in steps[2 * e: 2 * e + 2]:
            assert step.time_s == pytest.approx(end, rel=1e-9)
            assert step.compute_s == pytest.approx(4 * D_, rel=1e-9)
        t = end


def test_the_matchmaking_wait_counts_against_averaging_timeout():
    # M = 0.5 s, timeout 0.3 s: the leader's window ends at the deadline, d + 0.3 s. Ready at 4d, the
    # peers would have the round at d + 0.3 + D, more than 0.3 s after 4d (D = 0.109 s > 3d), so
    # they give up at 4d + 0.3 and step on their own gradients.
    settings, timing = collaborative(16, progress_refresh_s=0.0, matchmaking_time=0.5,
                                     averaging_timeout=0.3)
    run = simulate(2, 2, 4, "collaborative", settings, swarm=timing, network=ten_mbit(2))
    (r,) = run.of("comm")
    assert r.failed
    assert r.round_start_s == pytest.approx(D_ + 0.3, rel=1e-9)
    assert r.time_s == pytest.approx(4 * D_ + 0.3, rel=1e-9)
    assert [s.time_s for s in run.of("step")] == [pytest.approx(4 * D_ + 0.3, rel=1e-9)] * 2
    first, second = run.runtime.call("params")
    assert not np.allclose(first, second)


def test_a_target_group_smaller_than_the_swarm_is_rejected_with_the_fix():
    with pytest.raises(ValueError, match=r"^target_group_size: 2 would split the 3 peers.*set it to 3 or more"):
        SwarmTiming(target_group_size=2).check_arm(3)
    SwarmTiming(target_group_size=3).check_arm(3)
    SwarmTiming().check_arm(3)  # 0: hivemind's default None


@pytest.mark.parametrize("matchmaking_time, target_group_size", [(0.5, 0), (0.5, 2)])
def test_the_state_average_follows_the_optimizer_step_with_its_own_matchmaking(matchmaking_time, target_group_size):
    # Three epochs as in the test above (group full: the gradient round starts at 4d), each followed by hivemind's
    # state averager: both peers enter it when their round ends; the first to enter leads and gathers for
    # matchmaking_time (or not at all, with a full group); then the parameters take D_ALLREDUCE like the gradients.
    settings, timing = collaborative(16, average_state_every=1, progress_refresh_s=0.0,
                                     matchmaking_time=matchmaking_time, target_group_size=target_group_size)
    epochs = 3
    run = simulate(2, 2, epochs * 16 // 4, "collaborative", settings, swarm=timing, network=ten_mbit(2))
    comm, steps = run.of("comm"), run.of("step")
    assert [r.payload for r in comm] == ["gradients", "parameters"] * epochs
    gather_s = 0.0 if target_group_size else matchmaking_time
    t = 0.0
    for e in range(epochs):
        grads, state = comm[2 * e], comm[2 * e + 1]
        if target_group_size:
            assert grads.round_start_s == pytest.approx(t + 4 * D_, rel=1e-9)
        assert state.matchmaking_start_s == grads.time_s and not state.failed
        assert state.round_start_s == pytest.approx(grads.time_s + gather_s, rel=1e-9)
        assert state.message_bytes == MESSAGE_BYTES and state.bytes_sent == grads.bytes_sent
        assert state.comm_s == pytest.approx(D_ALLREDUCE, rel=1e-9)
        end = grads.time_s + gather_s + D_ALLREDUCE
        assert state.time_s == pytest.approx(end, rel=1e-9) and state.idle_s == [pytest.approx(gather_s)] * 2
        assert [s.time_s for s in steps[2 * e: 2 * e + 2]] == [pytest.approx(end, rel=1e-9)] * 2
        t = end
    first, second = run.runtime.call("params")
    assert np.array_equal(first, second)


def test_average_state_every_counts_epochs_as_hivemind_does():
    # hivemind averages the state when the epoch it moves to is a multiple of average_state_every: after epochs 1
    # and 3 of 0..4 with every 2.
    settings, timing = collaborative(16, average_state_every=2, progress_refresh_s=0.0, target_group_size=2)
    run = simulate(2, 2, 5 * 16 // 4, "collaborative", settings, swarm=timing, network=ten_mbit(2))
    assert [(r.step, r.payload) for r in run.of("comm") if r.payload == "parameters"] == [(1, "parameters"),
                                                                                        (3, "parameters")]
    alone = simulate(1, 2, 2 * 16 // 2, "collaborative", CollaborativeSettings(target_batch_size=16), swarm=timing,
                     network=ten_mbit(1))
    assert [r.payload for r in alone.of("comm")] == ["gradients"] * 2  # nobody to average the state with
