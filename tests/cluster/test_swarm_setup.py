"""What the real mode asks of a strategy: its declared real mode, its hivemind.Optimizer mapping, one codec table.

No peer starts here: these are the figures a peer would be built from.
"""

import pytest
import torch
from hivemind import compression as hc

from cluster.network import Link, Network
from cluster.real.options import check_real_arm, real_algorithms
from cluster.real.swarm_setup import UNTIMED, SwarmSetup
from cluster.swarm_timing import SwarmTiming
from trainer.compression import CODECS, hivemind_compression, transmit
from trainer.strategies import STRATEGIES
from trainer.strategies.collaborative import CollaborativeSettings
from trainer.strategies.local_updates import LocalUpdatesSettings

NET = Network(links=(Link(50e6, 50e6, 0.01),) * 3)


def test_collaborative_maps_its_target_batch_and_the_arms_timing():
    timing = SwarmTiming(matchmaking_time=4.0, averaging_timeout=20.0, target_group_size=3, progress_refresh_s=0.1)
    setup = SwarmSetup.of(STRATEGIES["collaborative"], CollaborativeSettings(target_batch_size=64), timing,
                          n_workers=3, batch_size=4, codec="fp16")
    assert (setup.target_batch_size, setup.batch_size, setup.use_local_updates) == (64, 4, False)
    assert (setup.matchmaking_time_s, setup.averaging_timeout_s, setup.target_group_size) == (4.0, 20.0, 3)
    assert setup.progress_refresh_s == 0.1 and setup.codec == "fp16"
    # The state is averaged every epoch, hivemind's default; 64 samples an epoch are 64 / (3 x 4) lockstep steps.
    assert setup.average_state_every == 1 and not setup.delay_state_averaging
    every = SwarmSetup.of(STRATEGIES["collaborative"], CollaborativeSettings(target_batch_size=64,
                          average_state_every=4), timing, n_workers=3, batch_size=4, codec="fp16")
    assert every.average_state_every == 4
    assert setup.lockstep_steps_per_epoch == pytest.approx(64 / 12)


def test_local_updates_maps_an_epoch_to_its_averaging_period_with_hiveminds_timing():
    setup = SwarmSetup.of(STRATEGIES["local-updates"], LocalUpdatesSettings(average_state_every=5,
                          delay_state_averaging=True), None, n_workers=3, batch_size=4, codec="uint8")
    assert (setup.target_batch_size, setup.use_local_updates, setup.delay_state_averaging) == (60, True, True)
    assert (setup.average_state_every, setup.lockstep_steps_per_epoch) == (1, 5.0)
    assert (setup.matchmaking_time_s, setup.averaging_timeout_s, setup.progress_refresh_s) == (5.0, 60.0, 0.5)
    assert UNTIMED.target_group_size == 0


def test_the_real_mode_reads_each_strategys_declaration():
    assert real_algorithms() == ["ddp", "diloco", "collaborative", "local-updates"]
    assert real_algorithms("lockstep") == ["ddp", "diloco"]
    with pytest.raises(ValueError) as error:
        check_real_arm("sparta", "none", NET)
    assert str(error.value) == ("algorithm: 'sparta' does not run in the real mode yet; use one of ddp, diloco, "
                                "collaborative, local-updates, or mode = 'sim'")
    with pytest.raises(ValueError, match=r"^allreduce: 'gloo' averages lockstep arms \(ddp, diloco\); "
                                         r"'local-updates' runs hivemind.Optimizer"):
        check_real_arm("local-updates", "none", NET, shaping="none", allreduce="gloo")
    with pytest.raises(NotImplementedError):
        STRATEGIES["ddp"].swarm_mapping(STRATEGIES["ddp"].Settings(), 3, 4)


def test_one_codec_table_serves_the_simulator_and_the_peers():
    assert list(CODECS) == ["none", "fp16", "scaled-fp16", "uint8", "quantile8", "blockwise8"]
    expected = {"none": hc.NoCompression, "fp16": hc.Float16Compression, "scaled-fp16": hc.ScaledFloat16Compression,
                "uint8": hc.Uniform8BitQuantization, "quantile8": hc.Quantile8BitQuantization,
                "blockwise8": hc.BlockwiseQuantization}
    for name, cls in expected.items():
        assert type(hivemind_compression(name)) is cls
        assert CODECS[name].compression_type == cls.compression_type
    # The simulator's fp16 rounds as hivemind's Float16Compression does: 1 + 2**-12 is below half precision.
    assert transmit(torch.tensor([1.0 + 2**-12, 3.0]), "fp16").tensor.tolist() == [1.0, 3.0]
    with pytest.raises(ValueError, match=r"^codec: 'topk:0.1' cannot run in the real mode .*use one of none, fp16, "
                                         r"scaled-fp16, uint8, quantile8, blockwise8, or mode = 'sim'"):
        check_real_arm("diloco", "topk:0.1", NET)
