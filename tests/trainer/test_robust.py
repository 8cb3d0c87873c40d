"""Robust aggregation against hand computations and a reference implementation."""

import numpy as np
import pytest

from trainer.robust import Aggregation, aggregate, centered_clip, median, trimmed_mean


def test_median_by_hand():
    x = np.array([[1, 2], [3, 4], [100, -100]], dtype=np.float32)
    assert median(x).tolist() == [3.0, 2.0]
    # An even count takes the mean of the two middle values.
    assert median(np.array([[1], [2], [3], [10]], dtype=np.float32)).tolist() == [2.5]


def test_trimmed_mean_by_hand():
    x = np.array([[1, 10], [2, 20], [3, 30], [4, 40], [100, -100]], dtype=np.float32)
    # floor(0.2 x 5) = 1 value dropped at each end of every coordinate: (2+3+4)/3 and (10+20+30)/3.
    assert trimmed_mean(x, 0.2).tolist() == [3.0, 20.0]
    # floor(0.125 x 5) = 0: the plain mean.
    assert trimmed_mean(x, 0.125).tolist() == pytest.approx([22.0, 0.0])


def test_trimmed_mean_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    x = np.random.default_rng(0).standard_normal((8, 1000)).astype(np.float32)
    for fraction in (0.0, 0.125, 0.25, 0.4):
        np.testing.assert_allclose(trimmed_mean(x, fraction), stats.trim_mean(x, fraction, axis=0), rtol=1e-5,
                                   atol=1e-6)


def test_centered_clip_one_iteration_by_hand():
    x = np.array([[0, 0], [2, 0], [0, 2], [31, 41]], dtype=np.float32)
    # v0 = coordinate-wise median = (1, 1). Differences: (-1,-1), (1,-1), (-1,1) of norm sqrt 2 < tau = 2, kept;
    # (30, 40) of norm 50, scaled by 2/50 to (1.2, 1.6). v1 = (1, 1) + ((0.2, 0.6)) / 4 = (1.05, 1.15).
    np.testing.assert_allclose(centered_clip(x, [1, 1, 1, 1], tau=2.0, iters=1), [1.05, 1.15], rtol=1e-6)
    # Weights: (0.2 + 1.2, 0.6 + 1.6) = (1.4, 2.2) with the last peer counted twice, over 5 = (1.28, 1.44).
    np.testing.assert_allclose(centered_clip(x, [1, 1, 1, 2], tau=2.0, iters=1), [1.28, 1.44], rtol=1e-6)


def test_centered_clip_two_iterations_by_hand():
    x = np.array([[0.0], [1.0], [10.0]], dtype=np.float32)
    # v0 = 1. Diffs -1, 0, 9 with tau = 2: -1, 0, 2 -> v1 = 1 + 1/3 = 4/3.
    # Diffs -4/3, -1/3, 26/3: -4/3, -1/3, 2 -> v2 = 4/3 + (1/3)/3 = 13/9.
    np.testing.assert_allclose(centered_clip(x, [1, 1, 1], tau=2.0, iters=2), [13 / 9], rtol=1e-6)


def test_centered_clip_with_a_wide_radius_is_the_mean():
    x = np.random.default_rng(1).standard_normal((5, 7)).astype(np.float32)
    np.testing.assert_allclose(centered_clip(x, [1] * 5, tau=1e6, iters=1), x.mean(axis=0), rtol=1e-5, atol=1e-6)


def test_centered_clip_clips_each_butterfly_part_on_its_own():
    x = np.array([[0, 0], [0, 0], [3, 4]], dtype=np.float32)
    rule = Aggregation(aggregation="centered_clip", clip_tau=1.0, clip_iters=1)
    # One reducer: v0 = (0, 0), (3, 4) of norm 5 clipped to (0.6, 0.8), /3.
    np.testing.assert_allclose(aggregate(list(x), [1, 1, 1], rule), [0.2, 0.8 / 3], rtol=1e-6)
    # Two parts of one element: 3 -> 1 and 4 -> 1, each /3.
    np.testing.assert_allclose(aggregate(list(x), [1, 1, 1], rule, parts=[1, 1]), [1 / 3, 1 / 3], rtol=1e-6)


def test_aggregate_keeps_the_shape_and_one_bad_peer_moves_median_and_trim_little():
    honest = [np.full((2, 3), v, dtype=np.float32) for v in (1.0, 2.0, 3.0, 4.0)]
    poisoned = honest + [np.full((2, 3), -1000.0, dtype=np.float32)]
    med = aggregate(poisoned, [1] * 5, Aggregation(aggregation="median"), parts=[2, 0, 4])
    assert med.shape == (2, 3) and (med == 2.0).all()
    trim = aggregate(poisoned, [1] * 5, Aggregation(aggregation="trimmed_mean", trim_fraction=0.2))
    assert (trim == 2.0).all()  # -1000 and 4 dropped: (1 + 2 + 3) / 3
