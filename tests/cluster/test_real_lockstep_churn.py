"""Faults on 3 real ddp peers on Ray: one SIGKILLed and restarted, loading the state, then dying in an exchange
(the driver without peers: `test_real_lockstep_churn_driver.py`).
"""

from __future__ import annotations

import numpy as np
import pytest

from cluster.faults import parse_faults
from cluster.records import CommRecord, FaultRecord, StepRecord
from trainer.strategies.ddp import DDPSettings


# --- real peers on Ray ---------------------------------------------------------------------------------------------
@pytest.mark.ray
@pytest.mark.hivemind
def test_a_real_ddp_peer_killed_and_restarted_loads_the_state_then_dies_reducing(fresh_ray):
    """3 real ddp peers; worker 2 is SIGKILLed before step 2 and returns at step 4: rounds 2-4 are among workers 0
    and 1, the new actor loads the state from one of them at the end of round 4 and averages from step 5 on. It dies
    while reducing its part in round 6, for good: the survivors step on the partial average and finish apart by that
    part only. Worker 1 straggles at half speed over the arm's first second."""
    from dataclasses import replace

    from cluster.real import RealOptions, run_real_arm
    from realtools import unshaped_arm
    from trainer.model import count_params

    n, steps, slow, to_s = 3, 8, 1, 1.0
    plan, specs = unshaped_arm("ddp-churn", n, steps, seed=5, algorithm="ddp", settings=DDPSettings())
    # Without clipping AdamW is coordinate-wise, so survivors that step on different values in one part of the
    # gradient and the same values elsewhere differ in that part only.
    specs = [replace(s, optim=replace(s.optim, grad_clip=0.0)) for s in specs]
    faults = parse_faults("faults", {"events": [{"worker": 2, "leave_step": 2, "return_step": 4}],
                                     "exchange": [{"worker": 2, "round": 6, "phase": "reducing"}],
                                     "stragglers": [{"worker": slow, "from_s": 0, "to_s": to_s, "speed": 0.5}]}, n)
    records: list = []
    result = run_real_arm(plan, specs, records.append, options=RealOptions(shaping="none"), faults=faults)
    comms = [r for r in records if isinstance(r, CommRecord)]
    shown = [(c.step, c.participants, c.absent, c.missing_peers, c.received_fraction) for c in comms]
    assert [(c.step, c.participants, c.absent) for c in comms] == (
        [(s, [0, 1, 2], None) for s in (0, 1)] + [(s, [0, 1], [2]) for s in (2, 3, 4)]
        + [(s, [0, 1, 2], None) for s in (5, 6)] + [(7, [0, 1], [2])]), shown
    # Every round but round 6 averaged all of its members' vectors: one whose first attempt was partial (a sender or
    # reducer timeout on a loaded host) was repeated (its record keeps the least fraction of its attempts). Round 6:
    # the survivors miss worker 2's part, and only that.
    faulted = comms[6]
    assert all((c.received_fraction == [1.0] * len(c.participants) and c.missing_peers == []) or c.attempts > 1
               for c in comms if c is not faulted), [(c.step, c.attempts, c.received_fraction) for c in comms]
    assert faulted.missing_peers == [2] and faulted.received_fraction[2] == 0.0, shown
    lost_fraction = 1.0 - faulted.received_fraction[0]
    assert faulted.received_fraction[0] == faulted.received_fraction[1] and 0.0 < lost_fraction < 1.0, shown
    events = [(f.worker, f.event, f.step, f.cause, f.phase, f.round, f.back_s) for f in records
              if isinstance(f, FaultRecord)]
    assert events == [(2, "leave", 2, "event", None, None, None), (2, "return", 4, None, None, None, None),
                      (2, "join", 4, None, None, None, None), (2, "leave", 6, "exchange", "reducing", 6, None)]
    join = next(f for f in records if isinstance(f, FaultRecord) and f.event == "join")
    # The state: parameters and AdamW's two moments (3 x float32 of the model), torch.save's framing on top.
    nparams = count_params(specs[0].model)
    assert join.sources in ([0], [1]) and 12 * nparams < join.state_bytes < 12 * nparams + 200_000, join
    assert join.wait_s > 0 and join.download_s > 0
    booked = sorted(r.step for r in records if isinstance(r, StepRecord) and r.worker == 2)
    assert booked == [0, 1, 5]  # it died in step 6's round, before the step was done
    # The two survivors: the same bits outside worker 2's part (one contiguous run of the vector, as hivemind
    # cuts it), and their own gradients in it at step 6 (different batches), so different parameters there.
    final = result.final_params
    assert len(final) == 2
    differ = np.flatnonzero(final[0] != final[1])
    lost = round(lost_fraction * nparams)
    print(f"lost part: {lost} of {nparams} elements; survivors differ at {differ.size}, over "
          f"[{differ.min() if differ.size else '-'}, {differ.max() if differ.size else '-'}]")
    assert differ.size > 0 and differ.max() - differ.min() < lost
    evals = [r for r in records if r.kind == "eval"]
    assert evals[0].param_spread == 0.0 and evals[-1].param_spread > 0.0 and evals[-1].loss < evals[0].loss - 0.1
    # The straggler sleeps once more its forward/backward in a step wholly inside its interval (it began at 0 s or
    # later and ended by to_s), and not at all in one begun after to_s (its previous step ended later); no one else.
    steps_of = [r for r in records if isinstance(r, StepRecord)]
    assert all(r.straggled_s is None for r in steps_of if r.worker != slow)
    mine = [r for r in steps_of if r.worker == slow]
    inside = [r for r in mine if r.time_s <= to_s]
    ratios = [r.straggled_s / (r.compute_s - r.straggled_s) for r in inside]
    print("straggler: slept / forward-backward per step inside its interval:", [round(x, 3) for x in ratios],
          "; step end times:", [round(r.time_s, 2) for r in mine])
    assert inside and min(ratios) >= (1 / 0.5 - 1) * (1 - 1e-9), ratios
    after = [r for prev, r in zip(mine, mine[1:]) if prev.time_s >= to_s]
    assert all(r.straggled_s is None for r in after), after
