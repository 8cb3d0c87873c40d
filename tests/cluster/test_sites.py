"""Workers placed at named sites: the latency matrix from the published round trips, the inter-site cap, the forms
of `sites`, the errors, and the resolved config's round trip."""

import tomllib
from pathlib import Path

import pytest
import tomli_w

from cluster import sites
from cluster.network import PRESETS, build_network
from experiments.fields import ConfigError
from experiments.resolved import resolved_config
from experiments.spec import load_spec, parse_spec

DEMO = Path(__file__).resolve().parents[2] / "experiments" / "demo.toml"


def test_the_table_has_every_pair_in_both_directions():
    assert len(sites.SITES) >= 12
    for a in sites.SITES:
        for b in sites.SITES:
            if a != b:
                forward, back = sites.published_rtt_ms(a, b), sites.published_rtt_ms(b, a)
                assert isinstance(forward, int) and 0 < forward < 400, (a, b, forward)
                assert abs(forward - back) <= 5, (a, b, forward, back)  # the docstring's claim


def test_published_figures_read_from_the_right_cells():
    # Spot checks against the page (row: source, column: destination).
    assert sites.published_rtt_ms("virginia", "amsterdam") == 89  # East US -> West Europe
    assert sites.published_rtt_ms("amsterdam", "virginia") == 90
    assert sites.published_rtt_ms("sydney", "sao-paulo") == 316  # Australia East -> Brazil South
    assert sites.published_rtt_ms("dubai", "pune") == 38  # UAE North -> Central India


def test_latency_matrix_is_half_the_mean_round_trip_and_same_site_is_a_datacenter():
    network = build_network({"sites": {"frankfurt": 2, "virginia": 1, "singapore": 1}}, 4)
    # frankfurt-virginia 96 and 96 ms; frankfurt-singapore 188 and 189; virginia-singapore 233 and 234.
    dc = 2 * PRESETS["datacenter"].one_way_latency_s
    expected = ((0.0, dc, 0.048, 0.09425),
                (dc, 0.0, 0.048, 0.09425),
                (0.048, 0.048, 0.0, 0.11675),
                (0.09425, 0.09425, 0.11675, 0.0))
    assert network.latency_matrix_s == expected
    assert [network.pair_latency_s(i, j) for i, j in ((0, 1), (1, 3), (3, 2))] == [dc, 0.09425, 0.11675]
    assert network.region_of == (0, 0, 1, 2)
    assert network.links == (PRESETS["datacenter"],) * 4
    assert sites.DATACENTER_ACCESS_S == PRESETS["datacenter"].one_way_latency_s
    assert network.pair_bandwidth_bps(0, 1) == 100e9  # same site: the datacenter link
    assert network.pair_bandwidth_bps(0, 2) == network.pair_bandwidth_bps(3, 1) == sites.SITE_BANDWIDTH_BPS == 5e9


def test_access_links_and_the_site_cap_apply_on_top():
    network = build_network({"sites": ["london", "tokyo", "tokyo"], "preset": "home-broadband",
                             "site_bandwidth": "1Gbit", "workers": {"2": {"latency": "5us"}}}, 3)
    home = PRESETS["home-broadband"]
    # London-Tokyo: 244 and 244 ms; each home end adds its excess over a datacenter host's 10 us.
    excess = home.one_way_latency_s - 10e-6
    assert network.pair_latency_s(0, 1) == 0.122 + excess + excess
    assert network.pair_latency_s(0, 2) == 0.122 + excess + 0.0  # a 5 us access link adds nothing
    assert network.pair_latency_s(1, 2) == home.one_way_latency_s + 5e-6  # same site: the two access links
    assert network.inter_region_bps == 1e9
    assert network.pair_bandwidth_bps(0, 1) == home.uplink_bps  # 50 Mbit/s up binds before the 1 Gbit/s cap
    assert build_network({"sites": ["london", "tokyo"], "bandwidth": "10Gbit"}, 2).pair_bandwidth_bps(0, 1) == 5e9


def test_list_table_and_string_forms_agree():
    as_list = build_network({"sites": ["paris", "paris", "seoul", "johannesburg"]}, 4)
    assert build_network({"sites": {"paris": 2, "seoul": 1, "johannesburg": 1}}, 4) == as_list
    assert build_network({"sites": "paris:2, seoul:1,johannesburg:1"}, 4) == as_list
    assert build_network({"sites": "Paris,paris,seoul,johannesburg"}, 4) == as_list


@pytest.mark.parametrize("network, message", [
    ({"sites": ["frankfurt", "atlantis"]}, "sites[1]: unknown site 'atlantis'; known: virginia, california"),
    ({"sites": ["frankfurt"]}, "sites: places 1 worker but the run has 2; give one site per worker, i.e. 2"),
    ({"sites": {"frankfurt": 3}}, "sites: places 3 workers but the run has 2; give counts that add up to 2 "
                                  "(e.g. { frankfurt = 1, virginia = 1 })"),
    ({"sites": {"frankfurt": 0, "tokyo": 2}}, "sites.frankfurt: expected a number of workers"),
    ({"sites": "frankfurt:1,tokyo"}, "sites: 'frankfurt:1,tokyo' mixes 'site:count' and bare sites"),
    ({"sites": ["frankfurt", "tokyo"], "regions": {"assignment": [0, 1], "inter_bandwidth": "1Gbit"}},
     "regions: conflicts with sites"),
    ({"sites": ["frankfurt", "tokyo"], "site_bandwidth": "fast"}, "site_bandwidth: expected a bandwidth"),
    ({"preset": "datacenter", "site_bandwidth": "1Gbit"}, "site_bandwidth: caps transfers between sites; set sites"),
])
def test_bad_sites_name_the_key(network, message):
    with pytest.raises(ValueError) as error:
        build_network(network, 2)
    assert str(error.value).startswith(message), str(error.value)


def test_an_experiment_names_the_arm_and_the_set_form_works():
    with pytest.raises(ConfigError, match=r"^arm\.ddp-home\.network\.sites: places 2 workers but the run has 4"):
        load_spec(DEMO, ["arm.ddp-home.network.sites=frankfurt:1,tokyo:1"])
    spec = load_spec(DEMO, ["arm.!ddp-datacenter.network.sites=frankfurt:2,virginia:1,singapore:1"])
    arm = next(a for a in spec.arms if a.name == "diloco-home")
    # The arm's preset (home-broadband) stays its access link, and its label.
    assert arm.network == build_network({"sites": ["frankfurt", "frankfurt", "virginia", "singapore"],
                                         "preset": "home-broadband"}, 4)
    assert arm.network_label == "home-broadband"


def test_the_resolved_config_rebuilds_the_same_network():
    spec = load_spec(DEMO, ['arm.*.network={ sites = { frankfurt = 2, virginia = 1, singapore = 1 }, '
                            'latency = "2ms", site_bandwidth = "2Gbit" }'])
    written = tomli_w.dumps(resolved_config(spec))
    again = parse_spec(tomllib.loads(written))
    assert [a.network for a in again.arms] == [a.network for a in spec.arms]
    assert again.arms[0].network.inter_region_bps == 2e9
    assert "sites" not in tomllib.loads(written)["arm"][0]["network"]  # written as explicit figures
