import numpy as np
import pytest

from cluster.collectives import allgather, broadcast, butterfly_allreduce, ring_allreduce
from cluster.network import Link, Network, build_network

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # scipy, via hivemind's load balancer

NBYTES = 4_000_003  # not divisible by 4: chunks are 1_000_001, 1_000_001, 1_000_001, 1_000_000


def reference_ring_bytes(n, nbytes):
    """The ring schedule played step by step, to check the closed form in ring_allreduce."""
    chunks = [nbytes // n + (1 if i < nbytes % n else 0) for i in range(n)]
    sent, received = [0] * n, [0] * n
    for t in range(n - 1):
        for k in range(n):
            for chunk in ((k - t) % n, (k + 1 - t) % n):  # reduce-scatter step t, all-gather step t
                sent[k] += chunks[chunk]
                received[(k + 1) % n] += chunks[chunk]
    return tuple(sent), tuple(received)


def test_ring_equal_links_by_hand():
    network = build_network({"uplink": "100Mbit", "downlink": "200Mbit", "latency": "10ms"}, 4)
    cost = ring_allreduce(network, [0, 1, 2, 3], NBYTES)
    # B = min(up, down) = 100 Mbit/s; alpha = 10 ms + 10 ms.
    # 2(N-1)/N * 8S / B = 1.5 * 32_000_024 / 1e8 = 0.48000036 s; 2(N-1) * alpha = 6 * 0.02 = 0.12 s.
    assert cost.time_s == pytest.approx(0.60000036, rel=1e-12)
    # Chunks c = [1_000_001, 1_000_001, 1_000_001, 1_000_000].
    # Worker 0 sends chunks 0, 3, 2 in reduce-scatter (all but 1) and 1, 0, 3 in all-gather (all but 2):
    #   2 * 4_000_003 - c1 - c2 = 6_000_004. Worker 1 skips c2, c3: 6_000_005. Worker 2 skips c3, c0: 6_000_005.
    #   Worker 3 skips c0, c1: 6_000_004. Each receives what its predecessor sent.
    assert cost.bytes_sent == (6_000_004, 6_000_005, 6_000_005, 6_000_004)
    assert cost.bytes_received == (6_000_004, 6_000_004, 6_000_005, 6_000_005)
    assert sum(cost.bytes_sent) == sum(cost.bytes_received)


@pytest.mark.parametrize("n, nbytes", [(2, 7), (3, 10), (4, NBYTES), (5, 3), (7, 1000), (8, 0)])
def test_ring_bytes_follow_the_schedule(n, nbytes):
    network = build_network("datacenter", n)
    cost = ring_allreduce(network, list(range(n)), nbytes)
    assert (cost.bytes_sent, cost.bytes_received) == reference_ring_bytes(n, nbytes)
    assert sum(cost.bytes_sent) == sum(cost.bytes_received) == 2 * (n - 1) * nbytes


def test_ring_bytes_are_in_participant_order():
    network = build_network("datacenter", 6)
    cost = ring_allreduce(network, [5, 2, 0, 4], NBYTES)
    # Position in the ring, not worker index, decides the chunks: same figures as workers 0..3 in order.
    assert cost.bytes_sent == (6_000_004, 6_000_005, 6_000_005, 6_000_004)


def test_ring_slowest_link_bounds_bandwidth_and_slowest_hop_sets_alpha():
    spec = {"bandwidth": "1Gbit", "latency": "5ms", "workers": {"2": {"uplink": "10Mbit"}, "3": {"latency": "100ms"}}}
    network = build_network(spec, 4)
    cost = ring_allreduce(network, [0, 1, 2, 3], NBYTES)
    # B = worker 2's 10 Mbit/s uplink: 1.5 * 32_000_024 / 1e7 = 4.8000036 s.
    # alpha = hop 2->3 or 3->0: 5 ms + 100 ms = 0.105 s; 6 * 0.105 = 0.63 s.
    assert cost.time_s == pytest.approx(4.8000036 + 0.63, rel=1e-12)
    # A slow downlink bounds it just as well.
    slow_down = build_network({"bandwidth": "1Gbit", "latency": "5ms", "workers": {"1": {"downlink": "20Mbit"}}}, 4)
    assert ring_allreduce(slow_down, [0, 1, 2, 3], NBYTES).time_s == pytest.approx(
        1.5 * 32_000_024 / 20e6 + 6 * 0.010, rel=1e-12
    )
    # Leaving the slow worker out leaves a fast ring of N = 3: 2(N-1)/N = 4/3 of 32_000_024 bits over 1 Gbit/s,
    # plus 2(N-1) = 4 latency terms of 10 ms.
    assert ring_allreduce(slow_down, [0, 2, 3], NBYTES).time_s == pytest.approx(
        4 / 3 * 32_000_024 / 1e9 + 0.04, rel=1e-12
    )


def test_ring_alpha_follows_the_direction_of_the_ring():
    ms = 1e-3
    # Only the route 1 -> 2 is slow (80 ms); everything else is 10 ms.
    matrix = [[0, 10, 10, 10], [10, 0, 80, 10], [10, 10, 0, 10], [10, 10, 10, 0]]
    network = build_network({"bandwidth": "1Gbit", "latency": "1ms",
                             "latency_matrix": [[f"{x}ms" for x in row] for row in matrix]}, 4)
    bandwidth_s = 1.5 * 32_000_024 / 1e9
    # Ring 0 -> 1 -> 2 -> 3 uses the slow route.
    assert ring_allreduce(network, [0, 1, 2, 3], NBYTES).time_s == pytest.approx(bandwidth_s + 6 * 80 * ms, rel=1e-12)
    # Ring 3 -> 2 -> 1 -> 0 crosses 2 -> 1, which is fast.
    assert ring_allreduce(network, [3, 2, 1, 0], NBYTES).time_s == pytest.approx(bandwidth_s + 6 * 10 * ms, rel=1e-12)


def test_ring_single_participant_is_free():
    cost = ring_allreduce(build_network("satellite", 3), [1], NBYTES, rng=np.random.default_rng(0))
    assert cost.time_s == 0.0 and cost.bytes_sent == (0,) and cost.bytes_received == (0,)


def test_ring_without_jitter_ignores_rng_and_keeps_the_formula():
    network = build_network({"bandwidth": "1Gbit", "latency": "5ms"}, 4)
    rng = np.random.default_rng(7)
    state = rng.bit_generator.state
    assert ring_allreduce(network, [0, 1, 2, 3], NBYTES, rng=rng) == ring_allreduce(network, [0, 1, 2, 3], NBYTES)
    assert rng.bit_generator.state == state


def test_ring_jitter_draws_each_latency_term():
    links = (Link(1e9, 1e9, 0.005), Link(1e9, 1e9, 0.005, jitter_s=0.004), Link(1e9, 1e9, 0.005))
    network = Network(links=links)
    cost = ring_allreduce(network, [0, 1, 2], 3_000_000, rng=np.random.default_rng(3))
    # Hops 0->1, 1->2, 2->0: latency 10 ms each; jitter 4, 4, 0 ms. Four latency terms (2(N-1)), one draw per hop each.
    draws = np.random.default_rng(3)
    latency_s = sum(
        float(np.max(np.array([0.01, 0.01, 0.01]) + np.abs(draws.normal(0.0, np.array([0.004, 0.004, 0.0])))))
        for _ in range(4)
    )
    bandwidth_s = 4 / 3 * 24_000_000 / 1e9
    assert cost.time_s == pytest.approx(bandwidth_s + latency_s, rel=1e-12)
    assert cost.time_s > bandwidth_s + 4 * 0.01
    assert ring_allreduce(network, [0, 1, 2], 3_000_000, rng=np.random.default_rng(3)) == cost


def test_broadcast_root_uplink_bound_by_hand():
    network = build_network("home-broadband", 4)
    cost = broadcast(network, [0, 1, 2, 3], root=0, nbytes=1_000_000)
    # Root uplink carries 3 copies: 3 * 8e6 / 50e6 = 0.48 s; each downlink 8e6 / 250e6 = 0.032 s.
    # Latency: 15 ms + 15 ms = 0.03 s.
    assert cost.time_s == pytest.approx(0.51, rel=1e-12)
    assert cost.bytes_sent == (3_000_000, 0, 0, 0)
    assert cost.bytes_received == (0, 1_000_000, 1_000_000, 1_000_000)
    assert sum(cost.bytes_sent) == sum(cost.bytes_received)


def test_broadcast_slow_receiver_and_far_receiver_by_hand():
    spec = {"preset": "home-broadband", "workers": {"2": {"downlink": "1Mbit"}, "3": {"latency": "200ms"}}}
    network = build_network(spec, 5)
    cost = broadcast(network, [4, 2, 3], root=3, nbytes=1_000_000)
    # Root is worker 3 (position 2): 2 copies over 50 Mbit/s = 0.32 s; worker 2's 1 Mbit/s downlink takes 8 s.
    # Latency: root's 200 ms + a receiver's 15 ms = 0.215 s.
    assert cost.time_s == pytest.approx(8.215, rel=1e-12)
    assert cost.bytes_sent == (0, 0, 2_000_000)
    assert cost.bytes_received == (1_000_000, 1_000_000, 0)


def test_broadcast_jitter_and_single_participant():
    network = build_network({"bandwidth": "100Mbit", "latency": "10ms", "jitter": "3ms"}, 3)
    cost = broadcast(network, [0, 1, 2], root=1, nbytes=500_000, rng=np.random.default_rng(11))
    draws = np.random.default_rng(11).normal(0.0, np.array([0.006, 0.006]))
    # 2 * 4e6 / 1e8 = 0.08 s on the root's uplink, then the slower of the two jittered 20 ms routes.
    assert cost.time_s == pytest.approx(0.08 + float(np.max(0.02 + np.abs(draws))), rel=1e-12)
    assert broadcast(network, [0, 1, 2], root=1, nbytes=500_000).time_s == pytest.approx(0.10, rel=1e-12)
    alone = broadcast(network, [2], root=2, nbytes=500_000)
    assert alone.time_s == 0.0 and alone.bytes_sent == (0,) and alone.bytes_received == (0,)


def reference_allgather(network, participants, messages):
    """The ring all-gather played step by step: in step t participant k forwards message (k - t) mod N to k+1."""
    n = len(participants)
    sent, received, transfer_s = [0] * n, [0] * n, 0.0
    for t in range(n - 1):
        step_s = 0.0
        for k in range(n):
            m = messages[(k - t) % n]
            sent[k] += m
            received[(k + 1) % n] += m
            step_s = max(step_s, m * 8 / network.pair_bandwidth_bps(participants[k], participants[(k + 1) % n]))
        transfer_s += step_s
    return tuple(sent), tuple(received), transfer_s


def test_allgather_by_hand():
    network = build_network({"bandwidth": "100Mbit", "latency": "10ms", "workers": {"1": {"downlink": "50Mbit"}}}, 3)
    cost = allgather(network, [0, 1, 2], [1_000_000, 3_000_000, 500_000])
    # Hops 0->1 at 50 Mbit/s (1's downlink), 1->2 and 2->0 at 100 Mbit/s.
    # Step 0 (own messages): 8e6/5e7 = 0.16, 24e6/1e8 = 0.24, 4e6/1e8 = 0.04 -> 0.24 s.
    # Step 1 (predecessor's): 0->1 carries 2's 4e6 bits: 0.08; 1->2 carries 0's: 0.08; 2->0 carries 1's: 0.24 -> 0.24 s.
    # Two latency terms of 20 ms.
    assert cost.time_s == pytest.approx(0.52, rel=1e-12)
    # Sent: all but the successor's message; received: all but one's own. Total 4.5 MB.
    assert cost.bytes_sent == (1_500_000, 4_000_000, 3_500_000)
    assert cost.bytes_received == (3_500_000, 1_500_000, 4_000_000)


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_allgather_follows_the_schedule(n):
    slow = {"1": {"uplink": "30Mbit"}, str(n - 1): {"downlink": "70Mbit"}}
    spec = {"bandwidth": "1Gbit", "latency": "2ms", "workers": slow}
    network = build_network(spec, n)
    messages = [int(x) for x in np.random.default_rng(n).integers(0, 5_000_000, size=n)]
    participants = list(range(n))[::-1]
    cost = allgather(network, participants, messages)
    sent, received, transfer_s = reference_allgather(network, participants, messages)
    assert (cost.bytes_sent, cost.bytes_received) == (sent, received)
    assert cost.time_s == pytest.approx(transfer_s + (n - 1) * 0.004, rel=1e-12)
    alone = allgather(network, [1], [123])
    assert alone.time_s == 0.0 and alone.bytes_sent == (0,) and alone.bytes_received == (0,)


def eight_workers(regions=None):
    spec = {"bandwidth": "1Gbit", "latency": "5ms",
            "workers": {"6": {"uplink": "100Mbit", "latency": "20ms"}, "1": {"downlink": "200Mbit"},
                        "3": {"bandwidth": "1Mbit", "latency": "900ms"}}}
    if regions:
        spec["regions"] = regions
    return build_network(spec, 8)


def test_every_collective_prices_a_two_worker_group_out_of_eight():
    network = eight_workers()
    group, nbytes = [6, 1], 10_000_000
    # Route 6 -> 1: min(6's 100 Mbit/s up, 1's 200 Mbit/s down) = 100 Mbit/s; 1 -> 6: 1 Gbit/s. Pair latency 25 ms.
    # Worker 3's 1 Mbit/s, 900 ms link is outside the group and must not matter.
    ring = ring_allreduce(network, group, nbytes)
    assert ring.time_s == pytest.approx(8e7 / 1e8 + 2 * 0.025, rel=1e-12)  # 2(N-1)/N = 1
    assert ring.bytes_sent == ring.bytes_received == (nbytes, nbytes)
    # Butterfly with two peers: each sends S whatever the split, so worker 6's uplink bounds it just as the ring's.
    butterfly = butterfly_allreduce(network, group, nbytes)
    assert butterfly.time_s == pytest.approx(0.85, rel=1e-12)
    assert butterfly.bytes_sent == (nbytes, nbytes) and sum(butterfly.part_sizes) == nbytes // 4
    star = broadcast(network, group, root=6, nbytes=nbytes)
    assert star.time_s == pytest.approx(0.8 + 0.025, rel=1e-12)
    assert star.bytes_sent == (nbytes, 0) and star.bytes_received == (0, nbytes)
    gathered = allgather(network, group, [4_000_000, 2_000_000])
    # 6 -> 1 carries 32e6 bits at 100 Mbit/s (0.32 s) while 1 -> 6 carries 16e6 at 1 Gbit/s; one latency term.
    assert gathered.time_s == pytest.approx(0.32 + 0.025, rel=1e-12)
    assert gathered.bytes_sent == (4_000_000, 2_000_000) and gathered.bytes_received == (2_000_000, 4_000_000)


def test_a_two_worker_group_across_regions_is_bound_by_the_inter_region_link():
    network = eight_workers({"assignment": [0, 0, 0, 0, 1, 1, 1, 1], "inter_latency": "40ms",
                             "inter_bandwidth": "50Mbit"})
    group, nbytes = [6, 1], 10_000_000
    # Pair latency 25 ms + 40 ms; every transfer between the two capped at 50 Mbit/s: 8e7 bits take 1.6 s.
    assert ring_allreduce(network, group, nbytes).time_s == pytest.approx(1.6 + 2 * 0.065, rel=1e-12)
    # Butterfly: route 6 -> 1 carries both parts (6's slice of 1's part, then 6's reduced part): S in all.
    assert butterfly_allreduce(network, group, nbytes).time_s == pytest.approx(1.6 + 2 * 0.065, rel=1e-12)
    assert broadcast(network, group, root=6, nbytes=nbytes).time_s == pytest.approx(1.6 + 0.065, rel=1e-12)
    assert allgather(network, group, [4_000_000, 2_000_000]).time_s == pytest.approx(0.64 + 0.065, rel=1e-12)
    # A group inside region 0 is untouched by the regions: 0 -> 2 -> 0 at 1 Gbit/s, 10 ms.
    assert ring_allreduce(network, [0, 2], nbytes).time_s == pytest.approx(0.08 + 0.02, rel=1e-12)
