"""The estimate's cost model against closed forms worked by hand, its message sizes against hivemind's serializer."""

from __future__ import annotations

import pytest
import torch

from cluster import estimate as cost
from cluster.devices import get_device
from cluster.network import PRESETS, build_network
from trainer.compression import CODECS, transmit, transmit_topk

H100 = get_device("h100")


@pytest.mark.parametrize("codec", [c for c in CODECS if c != "blockwise8"])  # blockwise8 needs bitsandbytes
@pytest.mark.parametrize("n", [1, 5, 127, 128, 1000, 16_385, 300_000])
def test_message_bytes_equal_hivemind_serializer(codec, n):
    tensor = torch.randn(n, generator=torch.Generator().manual_seed(n))
    assert cost.message_nbytes(n, codec) == transmit(tensor, codec).nbytes


@pytest.mark.parametrize("fraction", [0.001, 0.01, 0.5, 1.0])
def test_topk_message_bytes_equal_transmit_topk(fraction):
    tensor = torch.randn(70_000, generator=torch.Generator().manual_seed(1))
    assert cost.message_nbytes(70_000, f"topk:{fraction}") == transmit_topk(tensor, fraction).nbytes


def _ddp(n_params):
    return cost.Schedule("ddp", 1, (n_params,), (0,), 0)


def test_ddp_step_is_compute_plus_ring_allreduce():
    n, params, bps, one_way = 4, 1_000_000, 1e9, 5e-3
    network = build_network({"bandwidth": bps, "latency": one_way}, n)
    flops = 3e12
    e = cost.estimate(_ddp(params), cost.Workload(params, flops, 4096, 100), cost.Node(H100), network, "none")
    c = flops / (989e12 * 0.40)
    # float32 buffer; protobuf framing: buffer tag + 4-byte length, size tag + length + 3-byte varint, dtype "float32"
    nbytes = 4 * params + (1 + 4) + (2 + 3) + (2 + 7)
    assert cost.message_nbytes(params, "none") == nbytes
    exchange = 2 * 3 / 4 * nbytes * 8 / bps + 2 * 3 * (2 * one_way)
    assert e.step_compute_s == pytest.approx(c, rel=1e-12)
    assert e.exchange_s == pytest.approx(exchange, rel=1e-12)
    assert e.exposed_comm_s == pytest.approx(exchange, rel=1e-12)
    assert e.compute_utilisation == pytest.approx(c / (c + exchange), rel=1e-12)
    assert e.tokens_per_s == pytest.approx(4096 / (c + exchange), rel=1e-12)
    assert e.wall_s == pytest.approx(100 * (c + exchange), rel=1e-12)
    # Ring all-reduce: every worker sends 2S minus two of its N chunks.
    assert e.bytes_sent_per_sync == 2 * nbytes - 2 * (nbytes // 4) - (1 if nbytes % 4 > 1 else 0)


def test_diloco_amortises_the_exchange_over_inner_steps():
    n, params = 8, 2_000_000
    network = build_network("cross-region", n)  # the estimate leaves its jitter out
    schedule = cost.Schedule("diloco", 50, (params,), (0,), 0)
    e = cost.estimate(schedule, cost.Workload(params, 1e14, 1e6, 1000), cost.Node(H100), network, "uint8")
    c = 1e14 / (989e12 * 0.40)
    nbytes = cost.message_nbytes(params, "uint8")
    exchange = 2 * 7 / 8 * nbytes * 8 / 10e9 + 2 * 7 * 35e-3
    assert e.exchange_s == pytest.approx(exchange, rel=1e-12)
    assert e.step_time_s == pytest.approx((50 * c + exchange) / 50, rel=1e-12)
    assert e.compute_utilisation == pytest.approx(50 * c / (50 * c + exchange), rel=1e-12)
    assert e.bytes_sent_total == pytest.approx(1000 / 50 * e.bytes_sent_per_sync)


def test_streaming_overlap_hides_an_exchange_shorter_than_its_overlap_and_exposes_the_rest():
    params, n = 4_000_000, 4
    schedule = cost.Schedule("streaming-diloco", 8, (1_000_000,) * 4, (0, 2, 4, 6), 1)
    workload = cost.Workload(params, 1e14, 1e6, 800)
    c = 1e14 / (989e12 * 0.40)
    fast_net = build_network({"bandwidth": "10Gbit", "latency": "1ms"}, n)
    fast = cost.estimate(schedule, workload, cost.Node(H100), fast_net, "none")
    assert fast.exchange_s < c and fast.exposed_comm_s == 0.0
    assert fast.compute_utilisation == pytest.approx(1.0, rel=1e-12)
    slow_net = build_network({"bandwidth": "100Mbit", "latency": "1ms"}, n)
    slow = cost.estimate(schedule, workload, cost.Node(H100), slow_net, "none")
    # Each fragment's exchange starts after its step and is awaited one step later: c of it is hidden.
    assert c < slow.exchange_s < 2 * c  # longer than the overlap, shorter than the gap between two fragments
    assert slow.exposed_comm_s == pytest.approx(slow.exchange_s - c, rel=1e-12)
    assert slow.step_time_s == pytest.approx((8 * c + 4 * (slow.exchange_s - c)) / 8, rel=1e-12)


def test_node_sums_its_devices_and_reduces_gradients_over_nvlink():
    params, n, d = 1_000_000_000, 2, 8
    node = cost.Node(H100, d, PRESETS["nvlink"], "sharded")
    e = cost.estimate(_ddp(params), cost.Workload(params, 8e15, 1e6, 1), node,
                      build_network("datacenter", n), "none")
    assert e.step_compute_s == pytest.approx(8e15 / (8 * 989e12 * 0.40), rel=1e-12)
    intra = 2 * 7 / 8 * (2 * params) * 8 / 3.6e12 + 2 * 7 * 1e-6
    assert e.intra_node_s == pytest.approx(intra, rel=1e-12)
    assert e.step_time_s == pytest.approx(e.step_compute_s + intra + e.exchange_s, rel=1e-12)


def test_memory_follows_mixed_precision_adam_accounting():
    params = 10_000_000_000
    diloco = cost.Schedule("diloco", 100, (params,), (0,), 0)
    sharded = cost.memory(diloco, cost.Node(H100, 8, PRESETS["nvlink"], "sharded"), params)
    assert (sharded.bytes_per_param, sharded.needed_per_device, sharded.fits) == (24, 24 * params / 8, True)
    replicated = cost.memory(diloco, cost.Node(H100, 8, PRESETS["nvlink"], "replicated"), params)
    assert (replicated.needed_per_device, replicated.fits) == (24 * params, False)
    ddp = cost.memory(_ddp(params), cost.Node(get_device("rtx4090")), params)
    assert (ddp.bytes_per_param, ddp.needed_per_device, ddp.fits) == (16, 16 * params, False)


def _ddp_utilisation(n, nbytes, c, bps, one_way):
    return c / (c + 2 * (n - 1) / n * nbytes * 8 / bps + 2 * (n - 1) * 2 * one_way)


def test_solve_bandwidth_and_latency_match_the_closed_form_of_ddp():
    n, params, c, one_way, target = 4, 10_000_000, 0.5, 2e-3, 0.9
    nbytes = cost.message_nbytes(params, "none")
    network = build_network({"bandwidth": "1Gbit", "latency": one_way}, n)
    workload = cost.Workload(params, c * 989e12 * 0.40, 1e6, 1)

    def utilisation(net):
        return cost.estimate(_ddp(params), workload, cost.Node(H100), net, "none").compute_utilisation

    allowed = c * (1 - target) / target  # the exchange time the target leaves
    bps = 2 * (n - 1) / n * nbytes * 8 / (allowed - 2 * (n - 1) * 2 * one_way)
    solved = cost.solve_bandwidth(utilisation, network, target)
    assert solved.value == pytest.approx(bps, rel=1e-9)
    assert utilisation(cost.with_bandwidth(network, solved.value)) >= target  # the bisection ends on the ok side
    fast = build_network({"bandwidth": "100Gbit", "latency": one_way}, n)
    latency = cost.solve_latency(utilisation, fast, target)
    exact = (allowed - 2 * (n - 1) / n * nbytes * 8 / 100e9) / (2 * (n - 1) * 2)
    assert latency.value == pytest.approx(exact, rel=1e-9)
    # 100 ms a side: latency alone takes more than the 10 % the target leaves, at any bandwidth.
    far = cost.solve_bandwidth(utilisation, build_network({"bandwidth": "1Gbit", "latency": "100ms"}, n), target)
    assert far.value is None and "unreachable" in far.reason
    slow = cost.solve_latency(utilisation, build_network({"bandwidth": "10Mbit", "latency": "1ms"}, n), target)
    assert slow.value is None and "unreachable" in slow.reason
