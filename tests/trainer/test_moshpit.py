"""Moshpit SGD: grid and random groups, the Moshpit property, and what the simulator records for it."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from simtools import SEED, TINY, simulate

from cluster.collectives import butterfly_allreduce
from trainer.compression import transmit
from trainer.model import GPT
from trainer.strategies.diloco import DiLoCoSettings
from trainer.strategies.moshpit import Moshpit, MoshpitSettings, moshpit_groups, random_groups

# Uneven uplinks and no jitter, so butterfly parts differ between peers and costs are the closed formula.
UNEVEN = {"uplink": "50Mbit", "downlink": "250Mbit", "latency": "15ms",
          "workers": {"1": {"uplink": "20Mbit"}, "2": {"uplink": "100Mbit"}}}


def average_in_groups(vectors: np.ndarray, groups: list[tuple[int, ...]]) -> np.ndarray:
    out = vectors.copy()
    for g in groups:
        out[list(g)] = vectors[list(g)].mean(axis=0)
    return out


def test_grid_of_four_has_the_papers_groups():
    assert moshpit_groups(4, 2, 0) == [(0, 1), (2, 3)]
    assert moshpit_groups(4, 2, 1) == [(0, 2), (1, 3)]
    assert moshpit_groups(4, 2, 2) == moshpit_groups(4, 2, 0)  # round r uses coordinate r mod d


@pytest.mark.parametrize("n, m, d", [(4, 2, 2), (8, 2, 3), (9, 3, 2)])
def test_d_grid_rounds_reach_the_exact_global_average_and_fewer_do_not(n, m, d):
    vectors = np.random.default_rng(0).normal(size=(n, 1000))
    mean = vectors.mean(axis=0)
    for r in range(d):
        groups = moshpit_groups(n, m, r)
        assert all(len(g) == m for g in groups)
        assert sorted(w for g in groups for w in g) == list(range(n))
        vectors = average_in_groups(vectors, groups)
        if r < d - 1:  # every worker still holds a different mixture
            assert not any(np.allclose(v, mean, atol=1e-3) for v in vectors)
    for v in vectors:
        np.testing.assert_allclose(v, mean, rtol=1e-12, atol=1e-12)


def test_random_groups_are_seeded_cover_every_worker_once_and_change_each_round():
    n, m = 7, 2
    rounds = [random_groups(n, m, r, SEED) for r in range(10)]
    assert rounds == [random_groups(n, m, r, SEED) for r in range(10)]  # the same on every worker
    for groups in rounds:
        assert sorted(w for g in groups for w in g) == list(range(n))
        assert sorted(len(g) for g in groups) == [2, 2, 3]  # the last group takes the remainder
    assert len({tuple(g) for g in rounds}) >= 5
    assert rounds != [random_groups(n, m, r, SEED + 1) for r in range(10)]
    assert random_groups(3, 4, 0, SEED) == [(0, 1, 2)]  # fewer workers than the target: one group


@pytest.mark.parametrize(
    "settings, field",
    [
        (MoshpitSettings(average_every=0), "average_every"),
        (MoshpitSettings(rounds_per_average=0), "rounds_per_average"),
        (MoshpitSettings(target_group_size=1), "target_group_size"),
        (MoshpitSettings(grouping="ring"), "grouping"),
        (MoshpitSettings(final_sync=1), "final_sync"),
    ],
)
def test_settings_name_the_bad_field(settings, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        settings.check()


def test_a_grid_that_the_workers_do_not_fill_names_the_fix():
    replica = SimpleNamespace(spec=SimpleNamespace(worker=0, n_workers=6, seed=SEED))
    with pytest.raises(ValueError, match=r"^target_group_size: .*run\.workers = 6.*grouping = \"random\""):
        Moshpit(MoshpitSettings(target_group_size=2), replica)
    Moshpit(MoshpitSettings(target_group_size=6), replica)  # a 6^1 grid: one group of everyone
    Moshpit(MoshpitSettings(grouping="random"), replica)


@pytest.fixture(scope="module")
def grid_run():
    # Averaging after steps 1, 3, 5, 7 (rounds 0..3), evaluated right after each.
    return simulate(4, 2, 8, "moshpit", MoshpitSettings(average_every=2), network=UNEVEN, eval_every=2)


def test_simulated_grid_rounds_alternate_the_coordinate_and_replicas_stay_apart(grid_run):
    comm = grid_run.of("comm")
    by_step: dict[int, list] = {}
    for r in comm:
        by_step.setdefault(r.step, []).append(r.participants)
    assert by_step == {1: [[0, 1], [2, 3]], 3: [[0, 2], [1, 3]], 5: [[0, 1], [2, 3]], 7: [[0, 2], [1, 3]]}
    assert {r.payload for r in comm} == {"parameters"} and {r.collective for r in comm} == {"butterfly"}
    evals = grid_run.of("eval")
    assert [e.step for e in evals] == [0, 2, 4, 6, 8]
    assert evals[0].param_spread == 0.0  # one initialisation
    # Local steps between single rounds keep the replicas apart, and there is no final sync.
    assert all(e.param_spread > 1e-3 for e in evals[1:])
    params = grid_run.runtime.call("params")
    assert np.array_equal(params[0], params[2]) and np.array_equal(params[1], params[3])  # last round: (0,2), (1,3)
    assert not np.array_equal(params[0], params[1])


def test_group_bytes_and_time_follow_the_butterfly_formula(grid_run):
    network = grid_run.plan.network
    n_params = GPT(TINY).num_params()
    message = transmit(torch.zeros(n_params), "none").nbytes
    comm = grid_run.of("comm")
    for r in comm:
        cost = butterfly_allreduce(network, r.participants, r.message_bytes)
        assert r.message_bytes == message
        assert r.bytes_sent == list(cost.bytes_sent) == [message, message]  # (S - P_i) + (2-1) P_i = S
        assert r.bytes_received == list(cost.bytes_received)
        assert r.comm_s == pytest.approx(cost.time_s, rel=1e-12)
    # Uneven uplinks split the parts unevenly, so the group of (0, 1) is bound by worker 1's 20 Mbit/s.
    slow, fast = (butterfly_allreduce(network, g, message).time_s for g in ([0, 1], [2, 3]))
    assert slow > fast
    # One round in pairs moves 4S in all; one butterfly over all four peers would move 4S + 2S.
    per_round = sum(sum(r.bytes_sent) for r in comm if r.step == 1)
    assert per_round == 4 * message
    assert sum(butterfly_allreduce(network, [0, 1, 2, 3], message).bytes_sent) == 6 * message


def test_two_rounds_per_average_on_a_two_by_two_grid_are_exact_global_averaging():
    """End to end: each averaging step's two pair rounds leave every replica on the global mean."""
    n, b, steps = 4, 2, 8
    moshpit = simulate(n, b, steps, "moshpit", MoshpitSettings(average_every=2, rounds_per_average=2), eval_every=2)
    # DiLoCo with an outer SGD of lr 1 and no momentum sets every replica to the exact mean.
    averaging = simulate(n, b, steps, "diloco", DiLoCoSettings(inner_steps=2, outer_lr=1.0, outer_momentum=0.0))
    # The second pair round averages identical pairs in the same order, so replicas agree to the bit.
    assert all(e.param_spread == 0.0 for e in moshpit.of("eval"))
    assert [len(r.participants) for r in moshpit.of("comm")] == [2] * (2 * 2 * steps // 2)
    reference = averaging.runtime.call("params")[0]
    for params in moshpit.runtime.call("params"):
        np.testing.assert_allclose(params, reference, rtol=1e-4, atol=1e-5)


def test_random_grouping_runs_the_seeded_groups_and_final_sync_joins_everyone():
    n = 5
    settings = MoshpitSettings(average_every=3, grouping="random", final_sync=True)
    run = simulate(n, 2, 6, "moshpit", settings, eval_every=3)
    comm = run.of("comm")
    rounds = [[tuple(r.participants) for r in comm if r.step == step] for step in (2, 5)]
    assert rounds == [random_groups(n, 2, 0, SEED), random_groups(n, 2, 1, SEED)]
    assert comm[-1].participants == list(range(n)) and comm[-1].step == 6
    spreads = [e.param_spread for e in run.of("eval")]
    assert spreads[1] > 1e-3 and spreads[-1] == 0.0


def test_loss_falls_on_the_tiny_model_with_four_workers():
    run = simulate(4, 4, 40, "moshpit", MoshpitSettings(), network="home-broadband", eval_every=20)
    evals = run.of("eval")
    assert [e.step for e in evals] == [0, 20, 40]
    losses = [e.loss for e in evals]
    assert losses[-1] < losses[0] - 0.5, losses
    assert evals[-1].param_spread > 0  # no final sync: the consensus mean was measured, not a shared model
