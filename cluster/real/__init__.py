"""The real mode: each worker a Ray actor hosting a real hivemind peer (DHT + averager) behind a shaping relay.

- `peer.RealPeer`: one worker's replica plus its hivemind DHT, averager and relay; answers its strategy's exchanges
  with real all-reduces.
- `runtime.run_real_arm`: starts the peers, waits until the swarm is whole, drives them (in lockstep, or polls a
  swarm arm) and emits the simulator's record kinds with measured times and bytes.
- `accounting`: which bytes the relays count and how they are credited to the peers.
- `options`: shaping on/off, where peers listen, and hivemind's timeouts derived from the arm's links.
- `swarm`, `swarm_arm`, `swarm_setup`: collaborative and local-updates arms on `hivemind.Optimizer`, each peer
  training at its own pace (the peer, the driver that polls and stops them, and the settings they map to);
  `swarm_churn`: the fault trace played on them (SIGKILL and restart); `swarm_state`: who holds the swarm's state,
  and the lone-restart guard.
- `join`, `doctor`: the volunteer's commands: join a running swarm arm from elsewhere; check this machine first
  (`doctor_checks`: what doctor measures; `network_file`: the measured links as an experiment's network).
- `probe`: the measurement protocol every real peer serves for `doctor` (and `doctor --serve`).

Lockstep arms (a strategy's `real_mode = "lockstep"`: ddp, diloco) have blocking, dense exchanges among all workers,
answered by a `DecentralizedAverager` (or gloo); swarm arms (`real_mode = "swarm"`) run as `hivemind.Optimizer`.
"""

from cluster.real.options import (SHAPING, AveragingTimeouts, RealOptions, averaging_timeouts, check_real_arm,
                                  describe_shaping, real_algorithms)

# What runs real peers imports hivemind (about a second): loaded when first used, so that reading and checking an
# experiment file, or a run in the simulator, does not pay for it.
_RUNTIME = ("RealArmResult", "RealExchangeError", "SwarmInfo", "run_real_arm")


def __getattr__(name: str):
    if name in _RUNTIME:
        from cluster.real import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["SHAPING", "AveragingTimeouts", "RealArmResult", "RealExchangeError", "RealOptions", "SwarmInfo",
           "averaging_timeouts", "check_real_arm", "describe_shaping", "real_algorithms", "run_real_arm"]
