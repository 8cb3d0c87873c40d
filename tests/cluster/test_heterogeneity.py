import numpy as np
import pytest

from cluster.heterogeneity import speed_factors


def test_a_list_is_returned_as_given():
    assert speed_factors([1, 0.5, 2.0], 3, seed=0) == (1.0, 0.5, 2.0)


def test_stragglers_are_the_last_workers_and_take_no_randomness():
    spec = {"distribution": "stragglers", "fraction": 0.25, "slowdown": 2.0}
    assert speed_factors(spec, 8, seed=0) == (1.0,) * 6 + (0.5, 0.5)
    assert speed_factors(spec, 8, seed=123) == speed_factors(spec, 8, seed=0)
    # A quarter of 2 workers rounds half up to one straggler; of 5 workers, 1.25 rounds to 1.
    assert speed_factors(spec, 2, seed=0) == (1.0, 0.5)
    assert speed_factors(spec, 5, seed=0) == (1.0, 1.0, 1.0, 1.0, 0.5)
    assert speed_factors({**spec, "fraction": 0, "slowdown": 4}, 3, seed=0) == (1.0, 1.0, 1.0)
    assert speed_factors({**spec, "fraction": 1, "slowdown": 4}, 2, seed=0) == (0.25, 0.25)


def test_lognormal_is_seeded_and_centred_on_the_median():
    spec = {"distribution": "lognormal", "sigma": 0.3}
    first = speed_factors(spec, 8, seed=1)
    assert len(first) == 8 and all(f > 0 for f in first)
    assert speed_factors(spec, 8, seed=1) == first
    assert speed_factors(spec, 8, seed=2) != first
    assert np.median(first) == pytest.approx(1.0, rel=1e-12)
    assert len(set(first)) == 8
    # Dividing by the median shifts log speed, it does not change its spread: sigma comes back from many workers.
    many = np.log(speed_factors(spec, 20_000, seed=3))
    assert np.std(many) == pytest.approx(0.3, rel=0.03)
    assert speed_factors({"distribution": "lognormal", "sigma": 0}, 4, seed=0) == (1.0,) * 4
    assert speed_factors(spec, 1, seed=9) == (1.0,)


def test_uniform_is_seeded_and_within_bounds():
    spec = {"distribution": "uniform", "low": 0.5, "high": 1.0}
    first = speed_factors(spec, 6, seed=4)
    assert all(0.5 <= f <= 1.0 for f in first)
    assert speed_factors(spec, 6, seed=4) == first and speed_factors(spec, 6, seed=5) != first
    assert np.mean(speed_factors(spec, 20_000, seed=6)) == pytest.approx(0.75, abs=0.005)
    assert speed_factors({**spec, "low": 0.8, "high": 0.8}, 2, seed=0) == (0.8, 0.8)


@pytest.mark.parametrize(
    "spec, prefix",
    [
        ([1.0, 1.0], "expected 3 speed factors (one per worker), got a list of 2"),
        ([1.0, 0, 1.0], "[1]: expected a speed factor above 0"),
        ([1.0, 1.0, True], "[2]: expected a speed factor above 0"),
        ("fast", "expected a list of 3 speed factors or a table"),
        ({"distribution": "normal", "sigma": 1}, "distribution: must be one of lognormal, stragglers, uniform"),
        ({"sigma": 0.3}, "distribution: must be one of"),
        ({"distribution": "lognormal"}, "sigma: required for distribution 'lognormal'"),
        ({"distribution": "lognormal", "sigma": -0.1}, "sigma: expected a standard deviation of log speed >= 0"),
        ({"distribution": "lognormal", "sigma": 0.3, "mean": 1}, "mean: unknown key for distribution 'lognormal'"),
        ({"distribution": "stragglers", "fraction": 1.5, "slowdown": 2}, "fraction: expected the fraction"),
        ({"distribution": "stragglers", "fraction": 0.5, "slowdown": 0.5}, "slowdown: expected how many times slower"),
        ({"distribution": "stragglers", "slowdown": 2}, "fraction: required"),
        ({"distribution": "uniform", "low": 0, "high": 1}, "low: expected the slowest factor, above 0"),
        ({"distribution": "uniform", "low": 0.9, "high": 0.5}, "high: expected the fastest factor, at least low = 0.9"),
    ],
)
def test_errors_start_with_the_key_path(spec, prefix):
    with pytest.raises(ValueError) as error:
        speed_factors(spec, 3, seed=0)
    assert str(error.value).startswith(prefix), str(error.value)
