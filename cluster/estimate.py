"""Estimate mode's cost model: an arm's time per step, exchange and utilisation without training it.

The estimate is the simulator's own cost model applied to the schedule a lockstep strategy follows, for a model of
any size: compute time is FLOPs / the device profile's effective FLOP/s (`cluster.devices`, as
`ModelledExchanges.compute_seconds`), an exchange costs `cluster.collectives.ring_allreduce` over the arm's `Network`
(`allgather` for a top-k codec's sparse messages),
and a message's bytes are the size hivemind's serializer gives (`message_nbytes`, checked against
`trainer.compression.transmit` in the tests). The timeline (`_period`) books compute, blocking exchanges, background
exchanges and awaits by the rules `cluster.sim.ModelledExchanges` applies, so for homogeneous workers without jitter the
estimate equals the simulator's time per step and per exchange (tests/experiments/test_estimate.py checks it).

A worker may be a node of several devices: the node's FLOP/s are the sum of its devices', every step reduces the
gradients inside the node over the intra-node link (a ring all-reduce of bf16 gradients; not overlapped with the
backward pass, a conservative choice), and only the exchange between workers crosses the arm's network. Jitter is
left out (the estimate is the no-jitter closed form) and so is what the simulator adds at the end of a run (a
strategy's closing synchronisation): `wall_s` is the steady state's time per step times the steps.

Pure Python and numpy: no torch, so it answers for 10^11 parameters or 10^4 workers in milliseconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

from cluster.collectives import allgather, ring_allreduce
from cluster.devices import DeviceProfile
from cluster.network import PRESETS, Link, Network
from trainer.settings import setting

# Training state per parameter in mixed precision with Adam, after ZeRO (Rajbhandari et al. 2020, "ZeRO: Memory
# Optimizations Toward Training Trillion Parameter Models", section 3.1): fp16/bf16 parameters (2 bytes) and
# gradients (2) plus the fp32 master copy, momentum and variance (K = 12): 16 bytes. DiLoCo keeps, in addition, the
# shared parameters of the last synchronisation and the outer Nesterov momentum, both fp32: 8 bytes more.
# Activations are not counted: they depend on the micro-batch and on activation checkpointing.
ADAM_MIXED_PRECISION_BYTES = 16
OUTER_STATE_BYTES = 8
# Gradients are reduced inside a node in bf16 (the usual NCCL mixed-precision reduce).
INTRA_NODE_GRADIENT_BYTES = 2
MEMORY_LAYOUTS = ("sharded", "replicated")

ALGORITHMS = ("ddp", "diloco", "streaming-diloco")

# hivemind's serialized message (runtime_pb2.Tensor): the buffer a codec writes, and the dtype the message names.
# Buffers: float32 4n; fp16 2n; scaled-fp16 2n + one fp32 mean and std; the 8-bit codecs an int64 codebook length,
# 256 fp32 codebook entries and n bytes.
_BUFFER: dict[str, tuple[int, int]] = {  # codec -> (bytes an element, fixed bytes)
    "none": (4, 0), "fp16": (2, 0), "scaled-fp16": (2, 8), "uint8": (1, 8 + 256 * 4), "quantile8": (1, 8 + 256 * 4),
}
_COMPRESSED = {"none": False, "fp16": True, "scaled-fp16": True, "uint8": True, "quantile8": True}


def _varint_bytes(value: int) -> int:
    return max(1, math.ceil(value.bit_length() / 7))


def _tensor_message_bytes(buffer_bytes: int, n_elements: int, dtype: str, compressed: bool) -> int:
    """Protobuf size of a 1-D runtime_pb2.Tensor: buffer (1), packed size (2), dtype (4), compression (5) if not 0."""
    size_field = 2 + _varint_bytes(n_elements)  # tag, length, one varint (a flat tensor has one dimension)
    return (1 + _varint_bytes(buffer_bytes) + buffer_bytes) + size_field + (2 + len(dtype)) + (2 if compressed else 0)


def message_nbytes(n_elements: int, codec: str) -> int:
    """Bytes on the wire of one worker's message of `n_elements` float32 values through `codec`, as
    `trainer.compression.transmit` (dense codecs) or `transmit_topk` ("topk:FRACTION") measure it."""
    if codec.startswith("topk:"):
        k = max(1, int(round(float(codec.split(":", 1)[1]) * n_elements)))
        return (_tensor_message_bytes(4 * k, k, "int32", False) + _tensor_message_bytes(4 * k, k, "float32", False))
    if codec not in _BUFFER:
        raise ValueError(f"codec {codec!r}: the estimate knows the message size of {', '.join(_BUFFER)} and "
                         "topk:FRACTION")
    per_element, fixed = _BUFFER[codec]
    return _tensor_message_bytes(per_element * n_elements + fixed, n_elements, "float32", _COMPRESSED[codec])


@dataclass(frozen=True)
class EstimateConfig:
    """An experiment file's [estimate] table: what a worker is, beyond what the simulator models."""

    devices_per_worker: int = setting(1, "devices in one worker (a node), e.g. 8 H100s", low=1, high=4096)
    intra_node: str = setting("nvlink", "the link between a node's devices (a network preset)",
                              choices=tuple(PRESETS))
    memory: str = setting("sharded", "training state sharded over a node's devices (FSDP, ZeRO-3) or on each",
                          choices=MEMORY_LAYOUTS)
    params: float | None = setting(None, "parameters, replacing the [model]'s count (FLOPs: 6 per parameter and token)",
                                   low=1.0)


@dataclass(frozen=True)
class Schedule:
    """When a lockstep strategy exchanges what (ddp: every step; diloco: every H; streaming-diloco: fragment p after
    step s when (s + 1 - offset_p) % H == 0, awaited `overlap_steps` later)."""

    algorithm: str
    inner_steps: int = 1  # H
    fragment_sizes: tuple[int, ...] = ()  # elements per exchanged fragment (one fragment: the whole vector)
    offsets: tuple[int, ...] = (0,)
    overlap_steps: int = 0  # tau; 0: blocking

    def __post_init__(self) -> None:
        assert self.algorithm in ALGORITHMS, self.algorithm
        assert len(self.fragment_sizes) == len(self.offsets) >= 1


@dataclass(frozen=True)
class Node:
    """What one worker is: `devices` devices of one profile joined by an intra-node link."""

    device: DeviceProfile
    devices: int = 1
    intra_node: Link | None = None  # needed when devices > 1
    memory: str = "sharded"  # training state sharded over the node's devices (FSDP / ZeRO-3), or replicated on each

    def __post_init__(self) -> None:
        assert self.devices >= 1 and (self.devices == 1 or self.intra_node is not None)
        assert self.memory in MEMORY_LAYOUTS, self.memory


@dataclass(frozen=True)
class Workload:
    n_params: int  # elements of the exchanged parameter vector
    flops_per_worker_step: float  # one worker's FLOPs per optimizer step (over its devices)
    tokens_per_step: float  # the global batch
    total_steps: int


@dataclass(frozen=True)
class Memory:
    bytes_per_param: int
    needed_per_device: float
    device_memory: float | None
    layout: str

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.needed_per_device <= self.device_memory


@dataclass(frozen=True)
class Estimate:
    """One arm, steady state. Seconds are the slowest worker's where workers differ in speed."""

    algorithm: str
    workers: int
    devices_per_worker: int
    step_compute_s: float  # one optimizer step's compute
    intra_node_s: float  # per step: the gradient reduce inside a node
    exchange_s: float  # one synchronisation between workers (streaming-diloco: one fragment)
    sync_every_steps: float  # steps per synchronisation
    exposed_comm_s: float  # per synchronisation: what overlap does not hide (with the intra-node reduces between two)
    step_time_s: float  # wall time per step
    compute_utilisation: float  # compute time / wall time, averaged over workers
    tokens_per_s: float
    wall_s: float  # for the workload's steps
    bytes_sent_per_sync: int  # by the worker that sends most, across workers
    bytes_sent_total: float  # over the run, per worker
    memory: Memory

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "memory"}
        m = self.memory
        return d | {"memory_bytes_per_param": m.bytes_per_param, "memory_needed_per_device": m.needed_per_device,
                    "device_memory": m.device_memory, "memory_layout": m.layout, "memory_fits": m.fits}


def memory(schedule: Schedule, node: Node, n_params: int) -> Memory:
    per_param = ADAM_MIXED_PRECISION_BYTES + (OUTER_STATE_BYTES if schedule.algorithm != "ddp" else 0)
    needed = per_param * n_params / (node.devices if node.memory == "sharded" else 1)
    return Memory(per_param, needed, node.device.memory_bytes, node.memory)


def _period(step_s: float, syncs: list[float], schedule: Schedule, periods: int = 6) -> tuple[float, float]:
    """Wall time of one period of H steps in steady state, and how long the workers waited on exchanges in it, by
    `ModelledExchanges`' rules for equal workers.

    Each step adds its compute (`step_s`); then the fragments due are awaited (the clock waits for their end), then
    the fragments due are sent: a blocking one starts when its link is free and holds the clock to its end, a
    background one starts then and only occupies the link. Several periods are run so that the link's queue
    reaches its steady state; the last one is returned.
    """
    H, tau = schedule.inner_steps, schedule.overlap_steps
    now = link_free = 0.0
    ends: dict[int, float] = {}
    sent_at: dict[int, int] = {}
    marks, waits = [], []
    due: dict[int, list[int]] = {}  # step within the period -> fragments sent after it
    for p, offset in enumerate(schedule.offsets):
        due.setdefault((offset - 1) % H, []).append(p)
    for s in range(periods * H):
        if s % H == 0:
            marks.append(now)
            waits.append(0.0)
        now += step_s
        for p in sorted(p for p, sent in sent_at.items() if s - sent == tau):
            end = ends.pop(p)
            if end > now:
                waits[-1] += end - now
                now = end
            del sent_at[p]
        for p in due.get(s % H, ()):  # (s + 1 - offset_p) % H == 0
            start = max(now, link_free)
            link_free = start + syncs[p]
            if tau == 0:
                waits[-1] += link_free - now
                now = link_free
            else:
                ends[p], sent_at[p] = link_free, s
    marks.append(now)
    return marks[-1] - marks[-2], waits[-1]


def _exchange(network: Network, nbytes: int, codec: str):
    """As `ModelledExchanges.reduce`: sparse (top-k) messages cannot be summed on the way and travel by all-gather."""
    workers = range(network.n_workers)
    if codec.startswith("topk:"):
        return allgather(network, workers, [nbytes] * network.n_workers)
    return ring_allreduce(network, workers, nbytes)


def estimate(schedule: Schedule, workload: Workload, node: Node, network: Network, codec: str,
             speed_factors: tuple[float, ...] | None = None) -> Estimate:
    """The arm's steady state on `network` (one link per worker; its workers are `network.n_workers` nodes)."""
    n = network.n_workers
    speeds = speed_factors or (1.0,) * n
    assert len(speeds) == n
    node_flops = node.device.effective_flops * node.devices
    computes = [workload.flops_per_worker_step / (node_flops * f) for f in speeds]
    step_compute_s = max(computes)
    intra_s = 0.0
    if node.devices > 1:
        intra_net = Network(links=(node.intra_node,) * node.devices)
        intra_s = ring_allreduce(intra_net, range(node.devices), INTRA_NODE_GRADIENT_BYTES * workload.n_params).time_s
    by_size = {size: _exchange(network, message_nbytes(size, codec), codec) for size in set(schedule.fragment_sizes)}
    costs = [by_size[size] for size in schedule.fragment_sizes]  # fragments differ by one element at most
    syncs = [c.time_s for c in costs]
    H = schedule.inner_steps
    period_s, waited_s = _period(step_compute_s + intra_s, syncs, schedule)
    step_time_s = period_s / H
    n_syncs = len(schedule.fragment_sizes)
    exposed = (waited_s + H * intra_s) / n_syncs
    mean_compute = sum(computes) / n
    per_sync = max(max(c.bytes_sent) for c in costs)
    sent_per_period = sum(max(c.bytes_sent) for c in costs)
    return Estimate(
        algorithm=schedule.algorithm, workers=n, devices_per_worker=node.devices, step_compute_s=step_compute_s,
        intra_node_s=intra_s, exchange_s=max(syncs), sync_every_steps=H / n_syncs, exposed_comm_s=exposed,
        step_time_s=step_time_s, compute_utilisation=mean_compute / step_time_s,
        tokens_per_s=workload.tokens_per_step / step_time_s, wall_s=workload.total_steps * step_time_s,
        bytes_sent_per_sync=per_sync, bytes_sent_total=sent_per_period * workload.total_steps / H,
        memory=memory(schedule, node, workload.n_params),
    )


def with_bandwidth(network: Network, bps: float) -> Network:
    """Every worker's uplink and downlink set to `bps` (latencies, regions and their cap kept)."""
    return replace(network, links=tuple(replace(l, uplink_bps=bps, downlink_bps=bps) for l in network.links))


def with_latency(network: Network, one_way_s: float) -> Network:
    """Every worker's one-way access latency (a network table's `latency`) set to `one_way_s`."""
    assert network.latency_matrix_s is None, "a latency matrix gives every pair's latency; there is no one to solve"
    return replace(network, links=tuple(replace(l, one_way_latency_s=one_way_s) for l in network.links))


# Where the solver looks: 1 kbit/s to 1 Pbit/s, and 1 ns to 1000 s of one-way latency.
BANDWIDTH_RANGE_BPS = (1e3, 1e15)
LATENCY_RANGE_S = (1e-9, 1e3)


@dataclass(frozen=True)
class Solved:
    value: float | None  # None: not reachable in the range
    reason: str  # why not, or what bounds it


def _bisect_log(ok: Callable[[float], bool], low: float, high: float, increasing: bool, iterations: int = 80) -> float:
    """The boundary of `ok` on a log axis: the least value that is ok (increasing) or the largest (decreasing)."""
    a, b = math.log(low), math.log(high)
    for _ in range(iterations):
        mid = (a + b) / 2
        if ok(math.exp(mid)) == increasing:
            b = mid
        else:
            a = mid
    return math.exp(b if increasing else a)


def solve_bandwidth(utilisation_at: Callable[[Network], float], network: Network, target: float) -> Solved:
    """The least bandwidth (every worker's uplink and downlink) at which the utilisation reaches `target`."""
    low, high = BANDWIDTH_RANGE_BPS

    def ok(bps: float) -> bool:
        return utilisation_at(with_bandwidth(network, bps)) >= target

    if not ok(high):
        best = utilisation_at(with_bandwidth(network, high))
        return Solved(None, f"unreachable: even at {high:.0e} bit/s the utilisation is {best:.3f} (latency, the "
                            "intra-node reduce or the inter-region cap bounds it)")
    if ok(low):
        return Solved(low, f"reached at any bandwidth from {low:.0e} bit/s")
    return Solved(_bisect_log(ok, low, high, increasing=True), "")


def solve_latency(utilisation_at: Callable[[Network], float], network: Network, target: float) -> Solved:
    """The largest one-way access latency (every worker's) at which the utilisation still reaches `target`."""
    if network.latency_matrix_s is not None:
        return Solved(None, "not solved: the network's latency matrix fixes every pair's latency")
    low, high = LATENCY_RANGE_S

    def ok(seconds: float) -> bool:
        return utilisation_at(with_latency(network, seconds)) >= target

    if not ok(low):
        best = utilisation_at(with_latency(network, 0.0))
        return Solved(None, f"unreachable: even without latency the utilisation is {best:.3f} (bandwidth bounds it)")
    if ok(high):
        return Solved(high, f"reached at any latency up to {high:.0e} s")
    return Solved(_bisect_log(ok, low, high, increasing=False), "")
