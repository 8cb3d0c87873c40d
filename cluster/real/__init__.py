"""The real mode: each worker a Ray actor hosting a real hivemind peer (DHT + averager) behind a shaping relay.

- `peer.RealPeer`: one worker's replica plus its hivemind DHT, averager and relay; answers its strategy's exchanges
  with real all-reduces.
- `runtime.run_real_arm`: starts the peers, waits until the swarm is whole, drives them in lockstep and emits the
  simulator's record kinds with measured times and bytes.
- `accounting`: which bytes the relays count and how they are credited to the peers.
- `options`: shaping on/off, where peers listen, and hivemind's timeouts derived from the arm's links.

What runs here so far: lockstep strategies whose exchanges are blocking, dense and among all workers (ddp, diloco).
"""

from cluster.real.options import (REAL_ALGORITHMS, SHAPING, AveragingTimeouts, RealOptions, averaging_timeouts,
                                  check_real_arm, describe_shaping)
from cluster.real.runtime import RealArmResult, RealExchangeError, SwarmInfo, run_real_arm

__all__ = ["REAL_ALGORITHMS", "SHAPING", "AveragingTimeouts", "RealArmResult", "RealExchangeError", "RealOptions",
           "SwarmInfo", "averaging_timeouts", "check_real_arm", "describe_shaping", "run_real_arm"]
