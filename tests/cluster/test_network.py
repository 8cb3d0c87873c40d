import math

import pytest

from cluster.devices import DEVICES, get_device
from cluster.collectives import ring_allreduce
from cluster.network import PRESETS, Link, Network, build_network, parse_bandwidth, parse_duration, regions_table


@pytest.mark.parametrize(
    "text, bps",
    [
        ("100Mbit", 100e6),
        ("1Gbit", 1e9),
        ("50 Mbit/s", 50e6),
        ("10kbit", 10e3),
        ("10Kbit", 10e3),
        ("1.5Gbps", 1.5e9),
        ("400Gbit", 400e9),
        ("100mbit", 100e6),  # tc's spelling
        ("25MB/s", 200e6),  # bytes per second: x8
        ("900GB/s", 7.2e12),
        ("3MBps", 24e6),
        ("1e9", 1e9),
        (2_000_000, 2e6),
        (2.5e6, 2.5e6),
    ],
)
def test_parse_bandwidth(text, bps):
    assert parse_bandwidth(text) == pytest.approx(bps, rel=1e-12)


@pytest.mark.parametrize("bad", ["fast", "0Mbit", "-5Mbit", "25MB", "10 Mibit", "", 0, -1, True, None, math.inf])
def test_parse_bandwidth_rejects(bad):
    with pytest.raises(ValueError, match=r"^expected a bandwidth such as '100Mbit'.*got "):
        parse_bandwidth(bad)


@pytest.mark.parametrize(
    "text, seconds",
    [("40ms", 0.04), ("2us", 2e-6), ("2µs", 2e-6), ("1.5s", 1.5), ("500ns", 5e-7), ("0", 0.0), (0, 0.0), (0.25, 0.25)],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds, rel=1e-12)


@pytest.mark.parametrize("bad", ["soon", "-1ms", "40 minutes", "", -0.5, False, math.nan])
def test_parse_duration_rejects(bad):
    with pytest.raises(ValueError, match=r"^expected a duration such as '40ms'.*got "):
        parse_duration(bad)


def test_every_preset_has_positive_figures():
    expected = {"nvlink", "infiniband", "datacenter", "cross-region", "home-broadband", "mobile", "satellite"}
    assert expected <= set(PRESETS)
    for name, link in PRESETS.items():
        assert link.uplink_bps > 0 and link.downlink_bps > 0, name
        assert link.one_way_latency_s > 0 and link.jitter_s >= 0, name
        assert 0 <= link.loss <= 1, name
    # Spot-check the figures the docstring quotes.
    assert PRESETS["nvlink"].uplink_bps == 450e9 * 8
    assert PRESETS["home-broadband"].uplink_bps == 50e6 and PRESETS["home-broadband"].downlink_bps == 250e6
    assert 2 * PRESETS["cross-region"].one_way_latency_s == pytest.approx(0.035)


def test_preset_name_gives_that_link_to_every_worker():
    network = build_network("home-broadband", 3)
    assert network.n_workers == 3
    assert network.links == (PRESETS["home-broadband"],) * 3
    # Two access links of 15 ms each make a 30 ms pair; jitters add too.
    assert network.pair_latency_s(0, 2) == pytest.approx(0.030)
    assert network.pair_jitter_s(0, 2) == pytest.approx(0.002)
    assert network.pair_latency_s(1, 1) == 0.0


def test_explicit_figures_without_preset_downlink_defaults_to_uplink():
    network = build_network({"uplink": "20Mbit", "latency": "40ms", "jitter": "2ms", "loss": 0.01}, 2)
    assert network.links[0] == Link(uplink_bps=20e6, downlink_bps=20e6, one_way_latency_s=0.04, jitter_s=0.002,
                                    loss=0.01)


def test_preset_with_top_level_and_per_worker_overrides():
    spec = {
        "preset": "home-broadband",
        "latency": "30ms",
        "workers": {
            "1": {"uplink": "5Mbit"},
            "3": {"preset": "satellite", "downlink": "50Mbit"},
            "2": {"bandwidth": "1Gbit", "latency": "1ms"},
        },
    }
    links = build_network(spec, 4).links
    home = PRESETS["home-broadband"]
    assert links[0] == Link(home.uplink_bps, home.downlink_bps, 0.030, home.jitter_s)
    # A worker key replaces only itself; the rest comes from the network's link.
    assert links[1] == Link(5e6, home.downlink_bps, 0.030, home.jitter_s)
    assert links[2] == Link(1e9, 1e9, 0.001, home.jitter_s)
    # A worker preset replaces the base link before that worker's other keys apply.
    sat = PRESETS["satellite"]
    assert links[3] == Link(sat.uplink_bps, 50e6, sat.one_way_latency_s, sat.jitter_s)


def test_latency_matrix_overrides_access_latencies():
    matrix = [["x", "10ms", 0.05], ["12ms", 0, "70ms"], ["50ms", "70ms", "ignored"]]
    network = build_network({"preset": "datacenter", "latency_matrix": matrix}, 3)
    assert network.pair_latency_s(0, 1) == pytest.approx(0.010)
    assert network.pair_latency_s(1, 0) == pytest.approx(0.012)  # asymmetric routes are allowed
    assert network.pair_latency_s(0, 2) == pytest.approx(0.050)
    assert network.pair_latency_s(2, 1) == pytest.approx(0.070)
    assert network.pair_latency_s(2, 2) == 0.0


def test_network_without_matrix_sums_access_latencies():
    network = Network(links=(Link(1e6, 1e6, 0.010, 0.001), Link(1e6, 1e6, 0.025, 0.004)))
    assert network.pair_latency_s(0, 1) == pytest.approx(0.035)
    assert network.pair_jitter_s(1, 0) == pytest.approx(0.005)


@pytest.mark.parametrize(
    "spec, n_workers, prefix",
    [
        ({"preset": "dialup"}, 2, "preset: unknown network preset 'dialup'; known: cross-region, datacenter"),
        ("dialup", 2, "preset: unknown network preset 'dialup'"),
        ({"preset": "mobile", "uplink": "fast"}, 2, "uplink: expected a bandwidth such as '100Mbit'"),
        ({"preset": "mobile", "downlink": 0}, 2, "downlink: expected a bandwidth"),
        ({"preset": "mobile", "latency": "-3ms"}, 2, "latency: expected a duration such as '40ms'"),
        ({"preset": "mobile", "jitter": "lots"}, 2, "jitter: expected a duration"),
        ({"preset": "mobile", "loss": 1.5}, 2, "loss: expected a packet loss fraction between 0 and 1"),
        ({"preset": "mobile", "bogus": 1}, 2, "bogus: unknown key; allowed: bandwidth, downlink, jitter, latency"),
        ({"preset": "mobile", "bandwidth": "1Gbit", "uplink": "1Mbit"}, 2, "bandwidth: conflicts with uplink"),
        ({"latency": "10ms"}, 2, "uplink: required when no preset is given"),
        ({"uplink": "10Mbit"}, 2, "latency: required when no preset is given"),
        ({"preset": "mobile", "workers": {"7": {}}}, 4, "workers.7: worker index out of range 0..3"),
        ({"preset": "mobile", "workers": {"first": {}}}, 4, "workers.first: expected a worker index"),
        ({"preset": "mobile", "workers": {"1": {"uplink": "slow"}}}, 4, "workers.1.uplink: expected a bandwidth"),
        ({"preset": "mobile", "workers": {"1": {"preset": "dialup"}}}, 4, "workers.1.preset: unknown network preset"),
        ({"preset": "mobile", "workers": {"2": {"speed": 1}}}, 4, "workers.2.speed: unknown key; allowed: bandwidth"),
        ({"preset": "mobile", "workers": {"2": "fast"}}, 4, "workers.2: expected a table of link settings"),
        ({"preset": "mobile", "workers": {"1": {}, "01": {}}}, 4, "workers.01: worker 1 is already given"),
        ({"preset": "mobile", "latency_matrix": [[0, 1]]}, 2, "latency_matrix: expected 2 lists of 2"),
        ({"preset": "mobile", "latency_matrix": [[0, 1], [1]]}, 2, "latency_matrix[1]: expected 2 one-way latencies"),
        ({"preset": "mobile", "latency_matrix": [[0, "far"], [1, 0]]}, 2, "latency_matrix[0][1]: expected a duration"),
        ({"preset": "mobile", "regions": {"assignment": [0, 1], "inter_latency": "40ms"}}, 8,
         "regions.assignment: must list a region index for each of the 8 workers"),
        ({"preset": "mobile", "regions": {"inter_latency": "40ms"}}, 2, "regions.assignment: must list a region index"),
        ({"preset": "mobile", "regions": {"assignment": [0, -1], "inter_latency": 0.04}}, 2,
         "regions.assignment[1]: expected a region index (an integer >= 0)"),
        ({"preset": "mobile", "regions": {"assignment": [0, True], "inter_latency": 0.04}}, 2,
         "regions.assignment[1]: expected a region index"),
        ({"preset": "mobile", "regions": {"assignment": [0, 1], "inter_latency": "far"}}, 2,
         "regions.inter_latency: expected a duration"),
        ({"preset": "mobile", "regions": {"assignment": [0, 1], "inter_bandwidth": "thin"}}, 2,
         "regions.inter_bandwidth: expected a bandwidth"),
        ({"preset": "mobile", "regions": {"assignment": [0, 1]}}, 2, "regions: set inter_latency"),
        ({"preset": "mobile", "regions": {"assignment": [0, 1], "latency": "1ms"}}, 2,
         "regions.latency: unknown key; allowed: assignment, inter_bandwidth, inter_latency"),
        ({"preset": "mobile", "regions": [0, 1]}, 2, "regions: expected a table with assignment"),
        ({"preset": "mobile", "latency_matrix": [[0, 1], [1, 0]],
          "regions": {"assignment": [0, 1], "inter_latency": "40ms"}}, 2,
         "regions.inter_latency: conflicts with latency_matrix"),
    ],
)
def test_errors_start_with_the_key_path(spec, n_workers, prefix):
    with pytest.raises(ValueError) as error:
        build_network(spec, n_workers)
    message = str(error.value)
    assert message.startswith(prefix), message
    assert "\n" not in message


def test_regions_add_latency_and_cap_bandwidth_across_regions():
    spec = {"bandwidth": "10Gbit", "latency": "5ms", "workers": {"1": {"uplink": "500Mbit"}},
            "regions": {"assignment": [0, 0, 1, 1], "inter_latency": "40ms", "inter_bandwidth": "1Gbit"}}
    network = build_network(spec, 4)
    assert network.region_of == (0, 0, 1, 1)
    assert network.pair_latency_s(0, 1) == pytest.approx(0.010)  # same region: two access latencies
    assert network.pair_latency_s(1, 2) == pytest.approx(0.050)  # across: + 40 ms
    assert network.pair_bandwidth_bps(0, 1) == 10e9
    assert network.pair_bandwidth_bps(1, 0) == 500e6  # 1's own uplink is below the cap
    assert network.pair_bandwidth_bps(0, 3) == 1e9  # the cap
    assert network.pair_bandwidth_bps(3, 1) == 1e9
    assert network.pair_jitter_s(0, 3) == 0.0
    # Rebuilding from the regions table gives the same network, for resolved configs.
    assert build_network({**spec, "regions": regions_table(network)}, 4) == network
    assert regions_table(build_network("datacenter", 2)) is None


def test_regions_with_only_a_bandwidth_cap_keep_a_latency_matrix():
    spec = {"bandwidth": "1Gbit", "latency": "1ms", "latency_matrix": [[0, "7ms"], ["9ms", 0]],
            "regions": {"assignment": [3, 5], "inter_bandwidth": "20Mbit"}}
    network = build_network(spec, 2)
    assert network.pair_latency_s(0, 1) == pytest.approx(0.007) and network.pair_latency_s(1, 0) == pytest.approx(0.009)
    assert network.pair_bandwidth_bps(0, 1) == 20e6


def test_ring_across_two_regions_is_bound_by_the_inter_region_bandwidth():
    nbytes = 8_000_000
    spec = {"bandwidth": "10Gbit", "latency": "5ms",
            "regions": {"assignment": [0, 0, 0, 0, 1, 1, 1, 1], "inter_latency": "40ms", "inter_bandwidth": "1Gbit"}}
    network = build_network(spec, 8)
    # Hops 3 -> 4 and 7 -> 0 cross at 1 Gbit/s: 2(N-1)/N * 8S / B = 1.75 * 64e6 / 1e9 = 0.112 s; alpha = 10 + 40 ms.
    assert ring_allreduce(network, list(range(8)), nbytes).time_s == pytest.approx(0.112 + 14 * 0.050, rel=1e-12)
    # A ring inside one region keeps 10 Gbit/s and 10 ms: 1.5 * 64e6 / 1e10 + 6 * 0.010.
    assert ring_allreduce(network, [4, 5, 6, 7], nbytes).time_s == pytest.approx(0.0096 + 0.06, rel=1e-12)
    # Without regions the same eight workers run at 10 Gbit/s: 0.0112 s + 14 * 10 ms.
    flat = build_network({"bandwidth": "10Gbit", "latency": "5ms"}, 8)
    assert ring_allreduce(flat, list(range(8)), nbytes).time_s == pytest.approx(0.0112 + 0.14, rel=1e-12)


def test_devices():
    assert get_device("h100").effective_flops == pytest.approx(989e12 * 0.40)
    assert get_device("laptop-cpu").effective_flops == pytest.approx(100e9)
    for name, device in DEVICES.items():
        assert device.name == name and device.peak_flops > 0 and 0 < device.mfu <= 1
    with pytest.raises(ValueError, match=r"^unknown device 'tpu'; known: a100, a100-40gb, apple-m2, b200, h100"):
        get_device("tpu")
