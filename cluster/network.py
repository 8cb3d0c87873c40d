"""Links, presets and topologies: how fast and how far each worker is from the others.

A `Link` describes one worker's *access* link, the hop from the worker to the network core: its uplink and downlink
bandwidth (bit/s), its one-way latency, jitter and loss. The one-way latency between two workers is the sum of their two
access latencies (a packet crosses the sender's access link and then the receiver's), unless the network carries a
pairwise `latency_matrix_s`, which then gives the one-way latency from worker i to worker j directly and the access
latencies no longer enter any pair (measured city-to-city delays are not a sum of two halves). Jitter of a pair is likewise the sum of the
two access jitters, a deliberately pessimistic choice (it assumes the two links' delays vary together).

Regions (islands) put each worker in a region; a pair in different regions gets `inter_region_latency_s` on top of its
one-way latency, and any transfer between them is capped at `inter_region_bps` (a per-transfer cap, like a per-flow
limit on a long-haul path, not a trunk shared by all flows). The bandwidth of one transfer from worker i to worker j is
`pair_bandwidth_bps(i, j) = min(i's uplink, j's downlink, inter-region cap if the pair crosses regions)`.

Sites (`network = { sites = ["frankfurt", "virginia", "singapore"] }`, or `{ frankfurt = 4, virginia = 4 }`) place
workers in cities: `cluster.sites` holds round trips measured between cloud regions (Azure's published P50 table) and
builds the latency matrix (one-way = RTT/2 between sites; a same-site pair is two datacenter access links) and the
regions (one per site, transfers between them capped at 5 Gbit/s, a cloud VM's single-flow limit). The sources are
cited there.

Presets (figures per worker; "pair" is the resulting worker-to-worker one-way latency):

| preset         | uplink     | downlink   | access latency | pair latency | jitter | source                     |
|----------------|------------|------------|----------------|--------------|--------|----------------------------|
| nvlink         | 3.6 Tbit/s | 3.6 Tbit/s | 0.5 us         | 1 us         | 0      | NVLink 4, H100 SXM         |
| infiniband     | 400 Gbit/s | 400 Gbit/s | 1 us           | 2 us         | 0      | InfiniBand NDR port        |
| datacenter     | 100 Gbit/s | 100 Gbit/s | 10 us          | 20 us        | 0      | 100 GbE leaf-spine         |
| cross-region   | 10 Gbit/s  | 10 Gbit/s  | 17.5 ms        | 35 ms        | 0.5 ms | cloud VM, US coast-coast   |
| home-broadband | 50 Mbit/s  | 250 Mbit/s | 15 ms          | 30 ms        | 1 ms   | Ookla-style fixed medians  |
| mobile         | 15 Mbit/s  | 80 Mbit/s  | 25 ms          | 50 ms        | 5 ms   | Ookla-style 4G/5G medians  |
| satellite      | 15 Mbit/s  | 100 Mbit/s | 20 ms          | 40 ms        | 5 ms   | LEO, Starlink-class        |

NVLink's 3.6 Tbit/s is 450 GB/s each way (900 GB/s total bidirectional); the comment on each preset says more.

Loss is 0 in every preset: the collective cost model does not model retransmission, so a nonzero default would only
bite in the real (shaped) mode and make sim and real disagree for a reason nobody asked for. Set `loss` explicitly.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any

from cluster import sites

_PREFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_NUMBER = r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)"
# Prefix case is ignored because tc writes "mbit" for megabit and a millibit link means nothing; the b/B case is not,
# because it is the factor of 8 between bits and bytes.
_BANDWIDTH_RE = re.compile(
    rf"^{_NUMBER}\s*(?:([kKmMgGtT]?)(bits?(?:/s)?|b/s|bps|Bits?(?:/s)?)|([kKmMgGtT]?)(B/s|Bps|bytes?/s))?$"
)
_DURATION_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ns": 1e-9}
_DURATION_RE = re.compile(rf"^{_NUMBER}\s*(s|ms|us|µs|μs|ns)?$")

_BANDWIDTH_HELP = (
    "a bandwidth such as '100Mbit', '1Gbit' or '25MB/s' (above 0; a bare number is bit/s; k, M, G, T are decimal)"
)
_DURATION_HELP = "a duration such as '40ms', '2us' or '1.5s' (at least 0; a bare number is seconds)"


def _number(value: Any) -> float | None:
    # bool is an int subclass; `latency = true` is a typo, not one second.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def parse_bandwidth(value: Any) -> float:
    """Bandwidth in bit/s from a number (bit/s) or a string like '100Mbit', '1.5Gbps', '25MB/s' (bytes, x8)."""
    bps = _number(value)
    if bps is None and isinstance(value, str):
        match = _BANDWIDTH_RE.match(value.strip())
        if match:
            number, bit_prefix, bit_unit, byte_prefix, byte_unit = match.groups()
            prefix = (bit_prefix if bit_unit else byte_prefix or "").lower()
            bps = float(number) * _PREFIX[prefix] * (8.0 if byte_unit else 1.0)
    if bps is None or not math.isfinite(bps) or bps <= 0:
        raise ValueError(f"expected {_BANDWIDTH_HELP}, got {value!r}")
    return bps


def parse_duration(value: Any) -> float:
    """Duration in seconds from a number (seconds) or a string like '40ms', '2us', '500ns', '1.5s', '0'."""
    seconds = _number(value)
    if seconds is None and isinstance(value, str):
        match = _DURATION_RE.match(value.strip())
        if match:
            seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"expected {_DURATION_HELP}, got {value!r}")
    return seconds


def _parse_loss(value: Any) -> float:
    loss = _number(value)
    if loss is None or not 0.0 <= loss <= 1.0:
        raise ValueError(f"expected a packet loss fraction between 0 and 1 (0.01 is 1 %), got {value!r}")
    return loss


@dataclass(frozen=True)
class Link:
    """One worker's access link; see the module docstring for how two links make a pair."""

    uplink_bps: float
    downlink_bps: float
    one_way_latency_s: float
    jitter_s: float = 0.0
    loss: float = 0.0


PRESETS: dict[str, Link] = {
    # NVLink 4 on H100 SXM: 18 links, 900 GB/s total bidirectional, i.e. 450 GB/s = 3.6 Tbit/s each way per GPU.
    # Latency ~1 us GPU to GPU through an NVSwitch, so 0.5 us per side.
    "nvlink": Link(uplink_bps=3.6e12, downlink_bps=3.6e12, one_way_latency_s=0.5e-6),
    # InfiniBand NDR (ConnectX-7): 400 Gbit/s per port, one port per GPU in DGX H100-style nodes; end-to-end RDMA
    # latency ~1-2 us through one switch, so 1 us per side.
    "infiniband": Link(uplink_bps=400e9, downlink_bps=400e9, one_way_latency_s=1e-6),
    # 100 GbE with a TCP/RoCE stack through a leaf-spine fabric: tens of microseconds host to host, 10 us per side.
    "datacenter": Link(uplink_bps=100e9, downlink_bps=100e9, one_way_latency_s=10e-6),
    # Cloud VMs between regions: ~10 Gbit/s per VM of internet/inter-region egress on mid-size instances; US east to
    # west coast ~70 ms RTT, ~35 ms one way, so ~17.5 ms per side. Backbone jitter is small.
    "cross-region": Link(uplink_bps=10e9, downlink_bps=10e9, one_way_latency_s=17.5e-3, jitter_s=0.5e-3),
    # Home fixed broadband (cable/fibre mix): medians of the order of 250 Mbit/s down and 50 Mbit/s up in Ookla's
    # Speedtest Global Index for well-served countries; ~15 ms to the ISP core.
    "home-broadband": Link(uplink_bps=50e6, downlink_bps=250e6, one_way_latency_s=15e-3, jitter_s=1e-3),
    # Mobile 4G/5G: Ookla-style medians ~80 Mbit/s down, ~15 Mbit/s up; ~25 ms to the core, radio scheduling jitter.
    "mobile": Link(uplink_bps=15e6, downlink_bps=80e6, one_way_latency_s=25e-3, jitter_s=5e-3),
    # LEO satellite (Starlink-class): Ookla medians ~100 Mbit/s down, ~15 Mbit/s up, ~40-45 ms RTT to a nearby server,
    # so ~20 ms to the ground-station core; satellite handovers add jitter.
    "satellite": Link(uplink_bps=15e6, downlink_bps=100e6, one_way_latency_s=20e-3, jitter_s=5e-3),
}


@dataclass(frozen=True)
class Network:
    """One access link per worker, optionally a measured one-way latency matrix, optionally regions."""

    links: tuple[Link, ...]
    latency_matrix_s: tuple[tuple[float, ...], ...] | None = None
    region_of: tuple[int, ...] | None = None  # region index per worker; None: one region
    inter_region_latency_s: float = 0.0  # one-way, added to pairs in different regions
    inter_region_bps: float | None = None  # cap on any transfer between regions; None: no cap

    def __post_init__(self) -> None:
        assert len(self.links) >= 1, "a network needs at least one worker"
        n = len(self.links)
        if self.latency_matrix_s is not None:
            assert len(self.latency_matrix_s) == n and all(len(row) == n for row in self.latency_matrix_s)
        if self.region_of is not None:
            assert len(self.region_of) == n and all(r >= 0 for r in self.region_of), self.region_of
        assert self.inter_region_latency_s >= 0 and (self.inter_region_bps is None or self.inter_region_bps > 0)

    @property
    def n_workers(self) -> int:
        return len(self.links)

    def pair_latency_s(self, i: int, j: int) -> float:
        if i == j:
            return 0.0
        if self.latency_matrix_s is not None:
            base = self.latency_matrix_s[i][j]
        else:
            base = self.links[i].one_way_latency_s + self.links[j].one_way_latency_s
        return base + self.inter_region_latency_s if self.crosses_regions(i, j) else base

    def crosses_regions(self, i: int, j: int) -> bool:
        return self.region_of is not None and self.region_of[i] != self.region_of[j]

    def pair_bandwidth_bps(self, i: int, j: int) -> float:
        """Bandwidth of one transfer from worker i to worker j: i's uplink, j's downlink, the inter-region cap."""
        bps = min(self.links[i].uplink_bps, self.links[j].downlink_bps)
        if self.inter_region_bps is not None and self.crosses_regions(i, j):
            bps = min(bps, self.inter_region_bps)
        return bps

    def pair_jitter_s(self, i: int, j: int) -> float:
        return self.links[i].jitter_s + self.links[j].jitter_s


_LINK_KEYS = ("bandwidth", "downlink", "jitter", "latency", "loss", "preset", "uplink")
_NETWORK_KEYS = tuple(sorted(_LINK_KEYS + ("latency_matrix", "regions", "site_bandwidth", "sites", "workers")))
_REGION_KEYS = ("assignment", "inter_bandwidth", "inter_latency")


def _at(path: str, parse, value: Any):
    """Run a parser and put the key path in front of its message, as the spec parser expects."""
    try:
        return parse(value)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def _preset(name: Any) -> Link:
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"unknown network preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def _resolve_link(table: dict, base: Link | None, prefix: str, allowed: tuple[str, ...]) -> Link:
    """A link from a table of per-link keys, on top of `base` (the network's link for a worker override)."""
    for key in table:
        if key not in allowed:
            raise ValueError(f"{prefix}{key}: unknown key; allowed: {', '.join(allowed)}")
    if "bandwidth" in table:
        for other in ("uplink", "downlink"):
            if other in table:
                raise ValueError(f"{prefix}bandwidth: conflicts with {other}; give bandwidth (both directions) "
                                 "or uplink/downlink, not both")
    if "preset" in table:
        base = _at(f"{prefix}preset", _preset, table["preset"])
    fields: dict[str, float] = {}
    if "bandwidth" in table:
        fields["uplink_bps"] = fields["downlink_bps"] = _at(f"{prefix}bandwidth", parse_bandwidth, table["bandwidth"])
    if "uplink" in table:
        fields["uplink_bps"] = _at(f"{prefix}uplink", parse_bandwidth, table["uplink"])
    if "downlink" in table:
        fields["downlink_bps"] = _at(f"{prefix}downlink", parse_bandwidth, table["downlink"])
    if "latency" in table:
        fields["one_way_latency_s"] = _at(f"{prefix}latency", parse_duration, table["latency"])
    if "jitter" in table:
        fields["jitter_s"] = _at(f"{prefix}jitter", parse_duration, table["jitter"])
    if "loss" in table:
        fields["loss"] = _at(f"{prefix}loss", _parse_loss, table["loss"])
    if base is not None:
        return replace(base, **fields)
    # Without a preset the figures must all be given; a symmetric link is the common case, so downlink may be left out.
    if "uplink_bps" not in fields:
        raise ValueError(f"{prefix}uplink: required when no preset is given; set preset, bandwidth or uplink")
    if "one_way_latency_s" not in fields:
        raise ValueError(f"{prefix}latency: required when no preset is given; set preset or latency (e.g. '20ms')")
    fields.setdefault("downlink_bps", fields["uplink_bps"])
    return Link(**fields)


def _worker_index(key: Any, n_workers: int) -> int:
    if isinstance(key, bool) or not (isinstance(key, int) or (isinstance(key, str) and key.strip().isdigit())):
        raise ValueError(f"workers.{key}: expected a worker index such as '0' or '3'")
    index = int(key)
    if not 0 <= index < n_workers:
        raise ValueError(f"workers.{key}: worker index out of range 0..{n_workers - 1}")
    return index


def _latency_matrix(rows: Any, n_workers: int) -> tuple[tuple[float, ...], ...]:
    shape = f"{n_workers} lists of {n_workers} one-way latencies (row i, column j: worker i to worker j)"
    if not isinstance(rows, (list, tuple)) or len(rows) != n_workers:
        got = f"a list of {len(rows)}" if isinstance(rows, (list, tuple)) else repr(rows)
        raise ValueError(f"latency_matrix: expected {shape}, got {got}")
    matrix = []
    for i, row in enumerate(rows):
        if not isinstance(row, (list, tuple)) or len(row) != n_workers:
            got = f"a list of {len(row)}" if isinstance(row, (list, tuple)) else repr(row)
            raise ValueError(f"latency_matrix[{i}]: expected {n_workers} one-way latencies, got {got}")
        # The diagonal is ignored (a worker does not talk to itself), so people may write anything readable there.
        matrix.append(tuple(0.0 if i == j else _at(f"latency_matrix[{i}][{j}]", parse_duration, entry)
                            for j, entry in enumerate(row)))
    return tuple(matrix)


def _regions(table: Any, n_workers: int, has_matrix: bool) -> dict[str, Any]:
    """The region fields of `Network` from a `regions` table."""
    if not isinstance(table, dict):
        raise ValueError(f"regions: expected a table with assignment (a region index per worker), inter_latency "
                         f"and/or inter_bandwidth, got {table!r}")
    for key in table:
        if key not in _REGION_KEYS:
            raise ValueError(f"regions.{key}: unknown key; allowed: {', '.join(_REGION_KEYS)}")
    assignment = table.get("assignment")
    if not isinstance(assignment, (list, tuple)) or len(assignment) != n_workers:
        got = f"a list of {len(assignment)}" if isinstance(assignment, (list, tuple)) else repr(assignment)
        raise ValueError(f"regions.assignment: must list a region index for each of the {n_workers} workers "
                         f"(e.g. [0, 0, 1, 1]), got {got}")
    for i, region in enumerate(assignment):
        if isinstance(region, bool) or not isinstance(region, int) or region < 0:
            raise ValueError(f"regions.assignment[{i}]: expected a region index (an integer >= 0), got {region!r}")
    if "inter_latency" not in table and "inter_bandwidth" not in table:
        raise ValueError("regions: set inter_latency (e.g. '40ms') and/or inter_bandwidth (e.g. '1Gbit'); "
                         "without either, regions change nothing")
    latency_s = _at("regions.inter_latency", parse_duration, table.get("inter_latency", 0.0))
    if has_matrix and latency_s > 0:
        # A measured matrix already holds every pair's delay; adding a region latency would count the distance twice.
        raise ValueError("regions.inter_latency: conflicts with latency_matrix, which already gives every pair's "
                         "latency; drop inter_latency (inter_bandwidth still applies) or drop latency_matrix")
    bps = None
    if "inter_bandwidth" in table:
        bps = _at("regions.inter_bandwidth", parse_bandwidth, table["inter_bandwidth"])
    return {"region_of": tuple(assignment), "inter_region_latency_s": latency_s, "inter_region_bps": bps}


def regions_table(network: Network) -> dict[str, Any] | None:
    """The `regions` table that rebuilds the network's regions (for a resolved config), or None without regions."""
    if network.region_of is None:
        return None
    table: dict[str, Any] = {"assignment": list(network.region_of), "inter_latency": network.inter_region_latency_s}
    if network.inter_region_bps is not None:
        table["inter_bandwidth"] = network.inter_region_bps
    return table


def _sites(spec: dict, links: list[Link]) -> dict[str, Any]:
    """The latency matrix and regions of workers placed at named sites (`cluster.sites` says how)."""
    for key in ("latency_matrix", "regions"):
        if key in spec:
            raise ValueError(f"{key}: conflicts with sites, which build every pair's latency and the regions from "
                             f"measured round trips; drop {key} or drop sites")
    placed = sites.site_of_workers(spec["sites"], len(links))
    bps = _at("site_bandwidth", parse_bandwidth, spec.get("site_bandwidth", sites.SITE_BANDWIDTH_BPS))
    # The measured round trips ran between datacenter hosts; a slower access link adds its excess at each end.
    extra = [max(0.0, link.one_way_latency_s - sites.DATACENTER_ACCESS_S) for link in links]
    matrix = tuple(
        tuple(0.0 if i == j
              else links[i].one_way_latency_s + links[j].one_way_latency_s if a == b
              else sites.site_one_way_s(a, b) + extra[i] + extra[j]
              for j, b in enumerate(placed))
        for i, a in enumerate(placed))
    order = list(dict.fromkeys(placed))
    return {"latency_matrix_s": matrix, "region_of": tuple(order.index(site) for site in placed),
            "inter_region_bps": bps}


def build_network(spec: str | dict, n_workers: int) -> Network:
    """A `Network` from a preset name or a `[network]` table.

    Table keys: `preset`, `bandwidth` (both directions) or `uplink`/`downlink`, `latency` (one-way access latency),
    `jitter`, `loss` (0..1), `latency_matrix` (N x N one-way latencies, diagonal ignored) and `workers`, a table from
    worker index ("0", "3") to per-link keys that override that worker's link; a worker `preset` replaces the base link
    before the worker's other keys apply. `regions = {assignment = [0, 0, 1, 1], inter_latency = "40ms",
    inter_bandwidth = "1Gbit"}` puts workers in regions (see the module docstring); give inter_latency (default 0; not
    allowed with a latency_matrix), inter_bandwidth (default: no cap) or both. `sites = ["frankfurt", "virginia"]`
    (one per worker), `{frankfurt = 4, virginia = 4}` or `"frankfurt:4,virginia:4"` places workers in cities and
    builds the latency matrix and regions from measured round trips (`cluster.sites`; not with latency_matrix or
    regions), with `site_bandwidth` capping transfers between sites; the link keys then set each worker's access link
    within its site, on top of the `datacenter` preset. Without a top-level preset (or sites), uplink (or bandwidth)
    and latency are required and downlink defaults to uplink. Errors are `ValueError`s whose message starts
    with the key path inside the table; a bare preset name is treated as `{preset = name}`.
    """
    if n_workers < 1:
        raise ValueError(f"a network needs at least 1 worker, got n_workers={n_workers}")
    if isinstance(spec, str):
        spec = {"preset": spec}
    if not isinstance(spec, dict):
        raise ValueError(f"expected a preset name such as 'home-broadband' or a table of link settings, got {spec!r}")
    for key in spec:
        if key not in _NETWORK_KEYS:
            raise ValueError(f"{key}: unknown key; allowed: {', '.join(_NETWORK_KEYS)}")
    if "site_bandwidth" in spec and "sites" not in spec:
        raise ValueError("site_bandwidth: caps transfers between sites; set sites too (e.g. sites = "
                         "['frankfurt', 'virginia']) or use regions.inter_bandwidth")
    link_table = {key: value for key, value in spec.items() if key in _LINK_KEYS}
    default = _resolve_link(link_table, PRESETS["datacenter"] if "sites" in spec else None, "", _LINK_KEYS)
    links = [default] * n_workers

    overrides = spec.get("workers", {})
    if not isinstance(overrides, dict):
        raise ValueError(f"workers: expected a table from worker index to link settings, got {overrides!r}")
    seen: dict[int, Any] = {}
    for key, table in overrides.items():
        index = _worker_index(key, n_workers)
        if index in seen:
            raise ValueError(f"workers.{key}: worker {index} is already given as workers.{seen[index]}")
        seen[index] = key
        if not isinstance(table, dict):
            raise ValueError(f"workers.{key}: expected a table of link settings ({', '.join(_LINK_KEYS)}), "
                             f"got {table!r}")
        links[index] = _resolve_link(table, default, f"workers.{key}.", _LINK_KEYS)

    if "sites" in spec:
        return Network(links=tuple(links), **_sites(spec, links))
    matrix = _latency_matrix(spec["latency_matrix"], n_workers) if "latency_matrix" in spec else None
    regions = _regions(spec["regions"], n_workers, matrix is not None) if "regions" in spec else {}
    return Network(links=tuple(links), latency_matrix_s=matrix, **regions)
