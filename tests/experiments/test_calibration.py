"""CALIBRATION.md's table is what the estimate computes from experiments/published/calibration.toml."""

from __future__ import annotations

import pytest

from experiments import calibration
from experiments.estimate import estimate_arm


def test_calibration_table_is_recomputed_from_its_inputs():
    assert calibration.document_table() == calibration.table()


def test_calibration_covers_four_published_runs_each_figure_with_a_source_and_its_assumptions():
    runs = calibration.load_runs()
    assert len({run["study"] for run in runs}) >= 4
    assert all(run["source"] and run["assumed"] for run in runs)


def test_intellect1_row_is_the_hand_computed_diloco_cost():
    (run,) = [r for r in calibration.load_runs() if r["name"] == "INTELLECT-1, three continents"]
    est = estimate_arm(calibration.arm_of(run))
    c = 6 * 10e9 * 14680064 / 14 / (8 * 989e12 * 0.40)  # a node's share of a step on 8 H100s at 40 % MFU
    i = 2 * 7 / 8 * (2 * 10e9) * 8 / 3.6e12 + 2 * 7 * 1e-6  # bf16 gradients over NVLink, every step
    nbytes = 10**10 + 8 + 1024 + 24  # uint8: a byte a parameter, the codebook, 24 bytes of protobuf framing
    e = 2 * 13 / 14 * nbytes * 8 / 1e9 + 2 * 13 * 0.1  # ring all-reduce over 14 nodes, 100 ms between two
    assert est.compute_utilisation == pytest.approx(100 * c / (100 * (c + i) + e), rel=1e-9)


def test_covenant_row_is_the_hand_computed_topk_allgather_cost():
    (run,) = [r for r in calibration.load_runs() if r["name"].startswith("Covenant-72B")]
    est = estimate_arm(calibration.arm_of(run))
    c = 6 * 72e9 * 7864320 / 20 / (8 * 2250e12 * 0.40)  # a peer's share of a step on 8 B200s at 40 % MFU
    i = 2 * 7 / 8 * (2 * 72e9) * 8 / 3.6e12 + 2 * 7 * 1e-6  # bf16 gradients over NVLink, every step
    k = 72e9 / 64  # top-k keeps 1/64 of the values
    nbytes = (4 * k + 20) + (4 * k + 22)  # int32 indices and float32 values, each with its protobuf framing
    e = 19 * nbytes * 8 / 10e9 + 19 * 0.1  # ring all-gather of 20 peers' messages, 100 ms between two
    assert est.exchange_s == pytest.approx(e, rel=1e-12)
    assert est.compute_utilisation == pytest.approx(30 * c / (30 * (c + i) + e), rel=1e-9)


def test_erben_row_is_the_hand_computed_two_peer_allreduce_over_the_measured_link():
    (run,) = [r for r in calibration.load_runs() if r["name"].startswith("Erben et al.")]
    est = estimate_arm(calibration.arm_of(run))
    nbytes = 2 * 560_100_000 + 24  # fp16: two bytes a parameter, 24 bytes of protobuf framing
    # Two peers: each sends half of its vector and gets the averaged half back, 2(N-1)/N = 1 message over 210 Mbit/s,
    # and 2(N-1) = 2 latencies of 51.6 ms (a pair: both access latencies).
    assert est.exchange_s == pytest.approx(nbytes * 8 / 210e6 + 2 * 0.0516, rel=1e-12)
    assert est.memory.needed_per_device == 16 * 560.1e6 and est.memory.fits  # 8.96 GB of a T4's 16 GB
    assert calibration.bandwidth_for_exchange(calibration.arm_of(run), est.exchange_s).value == pytest.approx(
        210e6, rel=1e-9)
