"""A collaborative arm on real peers recovers from a partial average by averaging its state, as hivemind does.

Two peers on loopback (unshaped); in epoch 1's gradient round worker 0, as a reducer, drops the rest of the other
peer's share after its first part (`RealOptions.drop_parts_at`): hivemind finishes that round with each peer
holding its own gradients for worker 0's share, and the peers step apart. With hivemind's default
`average_state_every = 1` the state average after that same epoch brings them back together; without it they stay
apart for good. About 40-70 s each on a 2-core machine.
"""

from __future__ import annotations

import pytest
from realtools import unshaped_arm

from cluster.real import RealOptions, run_real_arm
from cluster.swarm_timing import SwarmTiming
from trainer.strategies.collaborative import CollaborativeSettings

N, STEPS, FAULT_EPOCH = 2, 16, 1  # 16 lockstep steps of 2 peers x 4 sequences: up to 8 epochs of 16 samples


@pytest.mark.ray
@pytest.mark.hivemind
@pytest.mark.parametrize("average_state_every, repaired", [(1, True), (10**6, False)], ids=["state", "no-state"])
def test_the_state_average_repairs_a_partial_gradient_round(average_state_every, repaired):
    plan, specs = unshaped_arm("collab-partial", N, STEPS, seed=4, algorithm="collaborative",
                               settings=CollaborativeSettings(target_batch_size=16,
                                                              average_state_every=average_state_every),
                               swarm=SwarmTiming(matchmaking_time=1.0, averaging_timeout=20.0, target_group_size=N))
    records: list = []
    run_real_arm(plan, specs, records.append, options=RealOptions(shaping="none", drop_parts_at=(FAULT_EPOCH,)))
    epochs = sorted({r.step for r in records if r.kind == "comm"})
    assert epochs[-1] >= FAULT_EPOCH + 2, epochs  # at least two whole epochs after the fault
    # The records show it: worker 1 got back only its first part of worker 0's share, and each missed the other.
    faulty = next(r for r in records if r.kind == "comm" and r.step == FAULT_EPOCH)
    assert faulty.received_fraction[1] < 0.99 and faulty.missing_peers == [0, 1], faulty
    before = [r for r in records if r.kind == "comm" and r.step < FAULT_EPOCH]
    assert before and all(r.received_fraction == [1.0] * N and r.missing_peers == [] for r in before), before
    final = [r for r in records if r.kind == "eval"][-1]  # every peer's parameters at the end
    print(f"epochs {epochs}, final param_spread {final.param_spread:.3g}")
    if repaired:  # within the epoch of the fault (the state round follows its gradient round), and to the end
        assert final.param_spread < 1e-5, final
    else:
        assert final.param_spread > 1e-4, final
