"""Small real-mode arms for tests: tiny model, synthetic data, unshaped loopback links."""

from __future__ import annotations

import numpy as np

from cluster.devices import get_device
from cluster.network import Link, Network
from cluster.swarm_timing import SwarmTiming
from cluster.driver import ArmPlan
from trainer.data import DataConfig
from trainer.model import PRESETS
from trainer.replica import OptimConfig, ReplicaSpec

BATCH = 4
SECRET = b"0123456789abcdef-run"  # the run secret of the swarm peers built here


def unshaped_arm(name: str, n: int, steps: int, seed: int, algorithm: str, settings,
                 swarm: SwarmTiming | None = None) -> tuple[ArmPlan, list]:
    """An arm of `n` tiny replicas over unshaped links, evaluated at the start and the end: (plan, replica specs)."""
    link = Link(uplink_bps=1e9, downlink_bps=1e9, one_way_latency_s=0.0)
    plan = ArmPlan(name=name, n_workers=n, network=Network(links=(link,) * n),
                   devices=(get_device("laptop-cpu"),) * n, speed_factors=(1.0,) * n, codec="none",
                   total_steps=steps, tokens_per_step=n * BATCH * PRESETS["tiny"].block_size, eval_every_steps=steps,
                   seed=seed, swarm=swarm)
    specs = [ReplicaSpec(worker=w, n_workers=n, seed=seed, model=PRESETS["tiny"],
                         data=DataConfig(corpus="synthetic", synthetic_bytes=200_000),
                         optim=OptimConfig(lr=3e-3, warmup_steps=2), batch_size=BATCH, total_steps=steps,
                         algorithm=algorithm, settings=settings, eval_batches=2, torch_threads=1) for w in range(n)]
    return plan, specs


def swarm_peer(spec, run_id: str, **kwargs):
    """A swarm peer in this process, unshaped, with the run secret `SECRET`."""
    from cluster.real.options import UNSHAPED, RealOptions
    from cluster.real.swarm import SwarmPeer

    return SwarmPeer(spec, UNSHAPED, RealOptions(shaping="none", secret=SECRET), run_id, **kwargs)


def donors(dht, run_id: str) -> dict[str, float | None]:
    """The state donors declared in the DHT: base58 peer id -> priority (None: declared as not sharing)."""
    from hivemind.p2p import PeerID

    found = dht.get(f"{run_id}_state_averager.all_averagers", latest=True)
    if found is None:
        return {}
    return {PeerID(k).to_base58(): v.value for k, v in found.value.items()}


def driver_plan(name: str, n: int) -> ArmPlan:
    """An endless arm of `n` workers over unlimited links, for a driver tested with `FakeSwarmPeers`."""
    from cluster.real.options import UNSHAPED

    return ArmPlan(name=name, n_workers=n, network=Network(links=(UNSHAPED,) * n),
                   devices=(get_device("laptop-cpu"),) * n, speed_factors=(1.0,) * n, codec="none",
                   total_steps=10**6, tokens_per_step=n * 2 * 4, eval_every_steps=10**6, seed=5)


class FakeSwarmPeers:
    """What `cluster.real.swarm_arm.SwarmArm` calls on its peers and every fake answers alike; a subclass adds `call`,
    `kill` and `_progress` (how its epochs go). Worker w is peer `p{w}`, dialling from port 1000 + w."""

    def _params(self, w):
        return np.zeros(4, dtype=np.float32)

    def _sync_progress(self, w, n, timeout_s):
        return n

    def _describe(self, w):
        return {"peer_id": f"p{w}", "worker": w, "maddrs": [f"/p2p/p{w}"], "dial_address": ("127.0.0.1", 1000 + w)}

    def _stop_after(self, w, epoch):
        self.stopped[w] = True

    def _stop(self, w):
        self.stopped[w] = True

    def _snapshot(self, w):
        return self.epoch[w], 0.0, self._params(w)

    def _evaluate(self, w, model):
        return 1.0

    def __getattr__(self, name):  # relay_counters, start_clock, start_training, finish_training: nothing to do
        if name.startswith("_") and not name.startswith("__"):
            return lambda *a: {}
        raise AttributeError(name)
