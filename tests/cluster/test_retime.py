"""Train once, re-time many: a recorded lockstep trace, replayed under another network, equals a full run there."""

from dataclasses import replace

import pytest
from simtools import SEED, TINY, TINY_DATA, TINY_OPTIM

from cluster.devices import get_device
from cluster.driver import ArmPlan, LockstepDriver
from cluster.network import build_network
from cluster.retime import record, retime
from cluster.runtime import LocalRuntime
from cluster.sim import ModelledExchanges
from trainer.replica import ReplicaSpec
from trainer.strategies import STRATEGIES

N, BATCH, STEPS = 4, 2, 8

ARMS = {  # every lockstep exchange pattern: blocking, background with awaits, groups, sparse, butterfly, codecs
    "ddp": ({}, "none"),
    "ddp-fp16": ({}, "fp16"),
    "ddp-delayed": ({}, "none"),
    "ddp-topk": ({}, "topk:0.05"),
    "diloco": ({"inner_steps": 3}, "uint8"),
    "streaming-diloco": ({"inner_steps": 4, "fragments": 2, "overlap_steps": 1}, "none"),
    "local-updates": ({"average_state_every": 3, "delay_state_averaging": True}, "none"),
    "moshpit": ({"average_every": 2}, "none"),
    "sparta": ({"fraction": 0.05}, "none"),
    "demo": ({}, "none"),
}
NETWORKS = {
    "mobile": "mobile",  # 5 ms jitter on every link
    "uneven": {"preset": "home-broadband", "workers": {"2": {"preset": "satellite"}, "3": {"uplink": "2Mbit"}}},
    "regions": {"preset": "cross-region", "regions": {"assignment": [0, 0, 1, 1], "inter_latency": "80ms",
                                                      "inter_bandwidth": "200Mbit"}},
}


def _plan(network, device="laptop-cpu", speed=(1.0,) * N, codec="none") -> ArmPlan:
    return ArmPlan(name="arm", n_workers=N, network=build_network(network, N), devices=(get_device(device),) * N,
                   speed_factors=speed, codec=codec, total_steps=STEPS, tokens_per_step=N * BATCH * TINY.block_size,
                   eval_every_steps=3, seed=SEED)


def _runtime(algorithm: str, settings: dict, codec: str) -> LocalRuntime:
    cls = STRATEGIES[algorithm].Settings
    return LocalRuntime([ReplicaSpec(w, N, SEED, TINY, TINY_DATA, TINY_OPTIM, BATCH, STEPS, algorithm, cls(**settings),
                                     codec, eval_batches=2) for w in range(N)])


def _full(algorithm, settings, codec, plan) -> list:
    records = []
    LockstepDriver(_runtime(algorithm, settings, codec), plan, ModelledExchanges(plan), records.append).run()
    return records


@pytest.mark.parametrize("arm", list(ARMS))
def test_a_retimed_trace_equals_a_full_run_under_every_network(arm):
    algorithm = arm.split("-fp16")[0].split("-topk")[0]
    settings, codec = ARMS[arm]
    assert STRATEGIES[algorithm].retimable
    recorded: list = []
    trace = record(_runtime(algorithm, settings, codec), _plan("home-broadband", codec=codec), recorded.append)
    assert recorded == _full(algorithm, settings, codec, _plan("home-broadband", codec=codec))
    for name, network in NETWORKS.items():
        plan = _plan(network, codec=codec)
        retimed: list = []
        retime(trace, plan, retimed.append)
        full = _full(algorithm, settings, codec, plan)
        assert len(retimed) == len(full) and retimed == full, name
        # The network does change the clock (else this would test nothing).
        assert retimed[-1].time_s != recorded[-1].time_s


def test_devices_and_speed_factors_are_retimed_too():
    plan = _plan("home-broadband", device="h100", speed=(1.0, 0.5, 1.0, 2.0))
    trace = record(_runtime("diloco", {"inner_steps": 3}, "none"), _plan("datacenter"), lambda r: None)
    retimed: list = []
    retime(trace, plan, retimed.append)
    assert retimed == _full("diloco", {"inner_steps": 3}, "none", plan)


def test_a_trace_does_not_retime_another_training_configuration():
    trace = record(_runtime("ddp", {}, "none"), _plan("datacenter"), lambda r: None)
    with pytest.raises(AssertionError, match="total_steps"):
        retime(trace, replace(_plan("datacenter"), total_steps=STEPS + 1), lambda r: None)


def test_collaborative_declares_that_it_cannot_be_retimed():
    assert [name for name, s in STRATEGIES.items() if not s.retimable] == ["collaborative"]
