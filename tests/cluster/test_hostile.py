"""Hostile peers: the poison each kind sends, the reducers' checks, and robust rules at the simulator's seam."""

import numpy as np
import pytest
from simtools import simulate

from cluster.collectives import butterfly_allreduce
from cluster.driver import ArmPlan, average
from cluster.devices import get_device
from cluster.hostile import HostileFault, HostileSenders, parse_hostile, screen
from cluster.network import build_network
from cluster.sim import ModelledExchanges
from trainer.replica import ExchangeRequest
from trainer.robust import Aggregation, aggregate
from trainer.settings import ConfigError
from trainer.strategies.ddp import DDPSettings

X = np.arange(1, 7, dtype=np.float32).reshape(2, 3)


def sender(seed=0, **fault) -> HostileSenders:
    return HostileSenders([HostileFault(**{"peers": (1,), "from_step": 2, **fault})], seed)


def test_sign_flip_and_scale_multiply_from_their_step_on():
    s = sender(kind="sign_flip", scale=-1000.0)
    assert s.sent(1, "gradients", X, step=1, round_=0) is X  # before from_step: honest
    assert (s.sent(1, "gradients", X, step=2, round_=1) == X * -1000).all()
    assert s.sent(0, "gradients", X, step=2, round_=1) is X  # an honest peer
    assert (sender(kind="scale").sent(1, "g", X, 5, 0) == X * 100).all()  # scale's default factor
    assert (sender(kind="sign_flip").sent(1, "g", X, 5, 0) == X * -1000).all()


def test_non_finite_noise_and_constant():
    assert np.isnan(sender(kind="non_finite").sent(1, "g", X, 2, 0)).all()
    big = np.random.default_rng(3).standard_normal(20_000).astype(np.float32)
    noise = sender(kind="noise", scale=10.0).sent(1, "g", big, 2, 7)
    # Drawn from the seed, the fault, the peer and the round: repeatable, new each round.
    assert (noise == sender(kind="noise", scale=10.0).sent(1, "g", big, 2, 7)).all()
    assert not (noise == sender(kind="noise", scale=10.0).sent(1, "g", big, 2, 8)).any()
    rms = float(np.sqrt(np.mean(big.astype(np.float64) ** 2)))
    assert float(np.std(noise)) == pytest.approx(10.0 * rms, rel=0.03)
    s = sender(kind="constant", scale=3.0)
    a, b = s.sent(1, "g", X, 2, 0), s.sent(1, "g", 2 * X, 3, 1)
    assert float(np.linalg.norm(a)) == pytest.approx(3.0 * float(np.linalg.norm(X)), rel=1e-6)
    np.testing.assert_allclose(b, 2 * a, rtol=1e-6)  # one direction, scaled by the honest update's norm


def test_stale_resends_what_it_sent_rounds_before():
    s = sender(kind="stale", stale_rounds=2)
    honest = [np.full(3, float(i), dtype=np.float32) for i in range(6)]
    sent = [s.sent(1, "g", t, step=i, round_=i) for i, t in enumerate(honest)]
    # Steps 0 and 1 are honest; from step 2, the tensor of two exchanges before.
    assert [float(t[0]) for t in sent] == [0, 1, 0, 1, 2, 3]


def test_the_reducers_refuse_non_finite_misshapen_and_mistyped_contributions():
    good = np.zeros(4, dtype=np.float32)
    bad = [good, good.copy(), np.array([0, np.inf, 0, 0], dtype=np.float32), np.zeros(5, dtype=np.float32),
           np.zeros(4, dtype=np.float64), good.copy()]
    assert screen(bad) == [2, 3, 4]


@pytest.mark.parametrize("table, message", [
    ([{"peers": [8], "kind": "scale"}], r"faults.hostile\[0\].peers: must be a non-empty list of worker indices in 0..7"),
    ([{"peers": [1], "kind": "sign_flip", "scale": 5.0}], r"faults.hostile\[0\].scale: a sign flip multiplies by a negative"),
    ([{"peers": [1], "kind": "non_finite", "scale": 5.0}], r"faults.hostile\[0\].scale: kind 'non_finite' takes no scale"),
    ([{"peers": [1], "kind": "noise", "stale_rounds": 3}], r"faults.hostile\[0\].stale_rounds: only kind \"stale\""),
    ([{"peers": [1], "kind": "flip"}], r"faults.hostile\[0\].kind: must be one of non_finite, scale"),
    ([{"peers": [1]}], r"faults.hostile\[0\].kind: required"),
    ([{"peers": [1], "kind": "scale", "start": 3}], r"faults.hostile\[0\].start: unknown key"),
    ([{"peers": [1], "kind": "scale", "from_step": -1}], r"faults.hostile\[0\].from_step: must be an integer >= 0"),
    ([{"peers": [1], "kind": "scale"}, {"peers": [1, 2], "kind": "noise"}],
     r"faults.hostile\[1\].from_step: peer 1 is already hostile from step 0 \(faults.hostile\[0\]\)"),
    ({"peers": [1]}, r"faults.hostile: must be a list of tables"),
])
def test_bad_faults_name_the_field(table, message):
    with pytest.raises(ConfigError, match=message):
        parse_hostile("faults.hostile", table, 8)


def _requests(tensors, collective="ring_allreduce"):
    return [ExchangeRequest("gradients", collective, None, t, 4 * t.size, 0.0) for t in tensors]


def _plan(**kw) -> ArmPlan:
    n = 4
    return ArmPlan(name="arm", n_workers=n, network=build_network("home-broadband", n),
                   devices=(get_device("laptop-cpu"),) * n, speed_factors=(1.0,) * n, codec="none", total_steps=4,
                   tokens_per_step=1, eval_every_steps=4, seed=3, **kw)


def test_a_robust_rule_runs_as_a_butterfly_and_combines_what_the_hostile_peer_sent():
    rng = np.random.default_rng(0)
    tensors = [rng.standard_normal(1000).astype(np.float32) for _ in range(4)]
    rule = Aggregation(aggregation="centered_clip", clip_tau=0.5, clip_iters=3)
    fault = HostileFault(kind="sign_flip", peers=(2,), from_step=0, scale=-1000.0)
    reduced = ModelledExchanges(_plan(aggregation=rule, hostile=(fault,))).reduce((0, 1, 2, 3), _requests(tensors), 0, 1)
    # A ring's running sum never holds every contribution: the robust rule is timed as hivemind's butterfly.
    assert reduced.collective == "butterfly"
    cost = butterfly_allreduce(_plan().network, [0, 1, 2, 3], 4000, rng=np.random.default_rng([3, 0x7177]),
                               vector_size=1000)
    assert reduced.cost == cost
    sent = [tensors[0], tensors[1], tensors[2] * np.float32(-1000), tensors[3]]
    assert (reduced.result == aggregate(sent, [1.0] * 4, rule, cost.part_sizes)).all()
    assert reduced.rejected == ()


def test_a_non_finite_contribution_is_refused_and_the_rest_averaged():
    tensors = [np.full(6, float(i), dtype=np.float32) for i in range(4)]
    fault = HostileFault(kind="non_finite", peers=(1,), from_step=2)
    exchanges = ModelledExchanges(_plan(hostile=(fault,)))
    early = exchanges.reduce((0, 1, 2, 3), _requests(tensors), 0, step=1)
    assert early.rejected == () and (early.result == average(tensors)).all()
    late = exchanges.reduce((0, 1, 2, 3), _requests(tensors), 0, step=2)
    assert late.rejected == (1,) and (late.result == np.float32((0 + 2 + 3) / 3)).all()
    assert late.collective == "ring_allreduce" and late.cost.bytes_sent == early.cost.bytes_sent  # the bytes still moved
    record = late.record("arm", 0, 2, idle_s=[0.0] * 4, time_s=1.0, staleness=0).to_json()
    assert record["rejected"] == [1] and "rejected" not in early.record(
        "arm", 0, 1, idle_s=[0.0] * 4, time_s=1.0, staleness=0).to_json()


def test_a_poisoned_run_replays_bit_for_bit():
    fault = HostileFault(kind="noise", peers=(3,), from_step=2, scale=1000.0)

    def run():
        return [r.to_json() for r in simulate(4, 2, 6, "ddp", DDPSettings(), network="datacenter", hostile=[fault]).records]

    assert run() == run()  # the noise is drawn from the seed, the fault, the peer and the round


def test_a_sign_flip_wrecks_the_mean_and_the_median_keeps_training():
    fault = HostileFault(kind="sign_flip", peers=(3,), from_step=2, scale=-1000.0)

    def evals(rule):
        sim = simulate(5, 4, 16, "ddp", DDPSettings(), network="datacenter", eval_every=16, hostile=[fault],
                       aggregation=rule)
        return [r.loss for r in sim.of("eval")]

    mean, median = evals(None), evals(Aggregation(aggregation="median"))
    assert mean[0] == median[0]  # the same initial model
    assert median[-1] < mean[0] < mean[-1]
