import numpy as np
import pytest
from hivemind.averaging.load_balancing import load_balance_peers

from cluster.collectives import (
    ButterflyCost,
    CollectiveCost,
    butterfly_allreduce,
    butterfly_average,
    butterfly_parts,
    ring_allreduce,
)
from cluster.network import build_network

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def three_peers():
    # Workers 0 and 1: 100 Mbit/s both ways; worker 2: 80 Mbit/s up, 1 Gbit/s down. 10 ms access latency each.
    return {"bandwidth": "100Mbit", "latency": "10ms", "workers": {"2": {"uplink": "80Mbit", "downlink": "1Gbit"}}}


def test_parts_are_hivemind_load_balancing():
    bandwidths = [100e6, 50e6, 25e6, None]
    parts = butterfly_parts(1_000_000, bandwidths)
    assert parts == list(load_balance_peers(1_000_000, bandwidths, min_size=0))
    assert sum(parts) == 1_000_000
    # A bandwidth of 0 is a client: it reduces nothing.
    assert butterfly_parts(1_000, [5.0, 0.0])[1] == 0
    assert butterfly_parts(0, [5.0, 1.0]) == [0, 0]


def test_three_peer_parts_bytes_and_time_by_hand():
    network = build_network(three_peers(), 3)
    cost = butterfly_allreduce(network, [0, 1, 2], 28_000_000)
    assert isinstance(cost, ButterflyCost) and isinstance(cost, CollectiveCost)
    # hivemind minimises max_i (1 + (N-2) f_i) / b_i. With b = 100, 100, 80 Mbit/s and N = 3 the optimum equalises
    # (1 + f_i) / b_i = t with sum f_i = 1: t = 4 / 280, f = 3/7, 3/7, 1/7 of 7_000_000 float32 elements.
    assert cost.part_sizes == (3_000_000, 3_000_000, 1_000_000)
    assert cost.part_bytes == (12_000_000, 12_000_000, 4_000_000)
    # sent_i = (S - P_i) + (N-1) P_i: 16M + 24M = 40M for peers 0 and 1, 24M + 8M = 32M for peer 2; received alike.
    assert cost.bytes_sent == (40_000_000, 40_000_000, 32_000_000)
    assert cost.bytes_received == cost.bytes_sent
    # 40M * 8 / 100 Mbit/s = 3.2 s; peer 2: 32M * 8 / 80 Mbit/s = 3.2 s up (0.256 s down). Two phases of 20 ms.
    assert cost.time_s == pytest.approx(3.24, rel=1e-12)
    # The ring is bound by the 80 Mbit/s uplink on every step: 4/3 * 224e6 / 80e6 + 4 * 20 ms = 3.8133 s.
    assert ring_allreduce(network, [0, 1, 2], 28_000_000).time_s == pytest.approx(4 / 3 * 2.8 + 0.08, rel=1e-12)


def test_client_mode_peer_reduces_nothing_by_hand():
    spec = three_peers()
    spec["workers"]["3"] = {"bandwidth": "1Gbit", "latency": "100ms"}
    network = build_network(spec, 4)
    cost = butterfly_allreduce(network, [0, 1, 2, 3], 112_000_000, client_mode=[False, False, False, True])
    # N = 4, client has bandwidth 0: (1 + 2 f_i) / b_i = t over the reducers, t = 5 / 280: f = 11/28, 11/28, 6/28.
    assert cost.part_sizes == (11_000_000, 11_000_000, 6_000_000, 0)
    assert cost.part_bytes == (44_000_000, 44_000_000, 24_000_000, 0)
    # (112M - 44M) + 3 * 44M = 200M; (112M - 24M) + 3 * 24M = 160M; the client sends its slices and gets results.
    assert cost.bytes_sent == (200_000_000, 200_000_000, 160_000_000, 112_000_000)
    # 200M * 8 / 100 Mbit/s = 16 s = 160M * 8 / 80 Mbit/s. Both phases talk to the client: 100 ms + 10 ms each.
    assert cost.time_s == pytest.approx(16.22, rel=1e-12)


def test_two_clients_never_talk_to_each_other():
    ms = [[0, 10, 10], [10, 0, 500], [10, 500, 0]]
    network = build_network({"bandwidth": "1Gbit", "latency": "1ms",
                             "latency_matrix": [[f"{x}ms" for x in row] for row in ms]}, 3)
    cost = butterfly_allreduce(network, [0, 1, 2], 1_000_000, client_mode=[False, True, True])
    assert cost.part_sizes == (250_000, 0, 0)
    assert cost.bytes_sent == (2_000_000, 1_000_000, 1_000_000)
    # The reducer sends 2 MB: 16 ms; the 500 ms route between the two clients carries nothing.
    assert cost.time_s == pytest.approx(0.016 + 0.020, rel=1e-12)


def test_all_clients_is_an_error_and_one_peer_is_free():
    network = build_network("home-broadband", 3)
    with pytest.raises(ValueError, match=r"^client_mode: every participant is a client"):
        butterfly_allreduce(network, [0, 1], 1000, client_mode=[True, True])
    alone = butterfly_allreduce(network, [2], 4000, rng=np.random.default_rng(0))
    assert alone.time_s == 0.0 and alone.bytes_sent == (0,) and alone.part_sizes == (1000,)


def test_vector_size_for_compressed_payloads_and_odd_byte_counts():
    network = build_network("datacenter", 2)
    # 1000 fp16 elements: parts cut the real tensor, bytes are their share of the 2000-byte payload.
    cost = butterfly_allreduce(network, [0, 1], 2000, vector_size=1000)
    assert cost.part_sizes == (500, 500) and cost.part_bytes == (1000, 1000)
    odd = butterfly_allreduce(network, [0, 1], 4003)
    assert sum(odd.part_sizes) == 1000 and sum(odd.part_bytes) == 4003


def test_butterfly_jitter_draws_one_term_per_phase():
    network = build_network({"bandwidth": "100Mbit", "latency": "10ms", "jitter": "2ms"}, 2)
    rng = np.random.default_rng(5)
    cost = butterfly_allreduce(network, [0, 1], 1_000_000, rng=rng)
    draws = np.random.default_rng(5)
    # N = 2: each peer moves S both ways, 8e6 / 1e8 = 0.08 s. Both peers reduce a half, so in each phase both routes
    # (1 -> 0 and 0 -> 1, 20 ms, jitter 4 ms each) carry a message: each phase waits for the slower draw.
    latency = sum(0.02 + float(np.max(np.abs(draws.normal(0.0, np.array([0.004, 0.004]))))) for _ in range(2))
    assert cost.time_s == pytest.approx(0.08 + latency, rel=1e-12)
    assert butterfly_allreduce(network, [0, 1], 1_000_000).time_s == pytest.approx(0.12, rel=1e-12)


def weighted_average(tensors, weights):
    return sum(w * t.astype(np.float64) for t, w in zip(tensors, weights)) / sum(weights)


def test_butterfly_average_matches_the_weighted_average():
    rng = np.random.default_rng(0)
    tensors = [rng.normal(size=(4, 25)).astype(np.float32) for _ in range(4)]
    weights = [1.0, 2.5, 0.5, 3.0]
    out = butterfly_average(tensors, weights, [40, 35, 20, 5])
    assert out.shape == (4, 25) and out.dtype == np.float32
    assert np.allclose(out, weighted_average(tensors, weights), rtol=1e-6, atol=1e-6)
    # The cut does not change the answer; an unweighted call is the plain mean.
    assert np.allclose(out, butterfly_average(tensors, weights, [100, 0, 0, 0]), rtol=1e-6, atol=1e-6)
    assert np.allclose(butterfly_average(tensors, [1.0] * 4, [25] * 4), np.mean(tensors, axis=0), atol=1e-6)


def test_butterfly_average_with_a_client_uses_the_parts_of_the_cost():
    network = build_network(three_peers() | {"workers": {"3": {"bandwidth": "1Gbit"}}}, 4)
    cost = butterfly_allreduce(network, [0, 1, 2, 3], 4 * 1001, client_mode=[False, True, False, False])
    assert cost.part_sizes[1] == 0 and sum(cost.part_sizes) == 1001
    rng = np.random.default_rng(1)
    tensors = [rng.normal(size=1001).astype(np.float32) for _ in range(4)]
    weights = [0.2, 4.0, 1.0, 1.5]  # the client's tensor is averaged in like any other
    out = butterfly_average(tensors, weights, cost.part_sizes)
    assert np.allclose(out, weighted_average(tensors, weights), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"^weights: must be >= 0 with a positive sum"):
        butterfly_average(tensors, [0.0] * 4, cost.part_sizes)
