"""Networks people can name: workers placed in cities, with round trips measured between cloud regions.

`network = { sites = ["frankfurt", "virginia", "singapore", ...] }` puts worker i at the i-th site (one site per
worker); `sites = { frankfurt = 4, virginia = 4 }` puts that many workers at each site, in the order written; the
string `"frankfurt:4,virginia:4"` (or `"frankfurt,virginia"`, one worker each) says the same where a list or table is
awkward (`--set arm.*.network.sites=frankfurt:4,virginia:4`, a sweep's list of values). `cluster.network` turns this
into an ordinary `Network`:

- Workers at one site share a datacenter: each worker's access link is the network's link (default the `datacenter`
  preset, 100 Gbit/s and 10 us), so a same-site pair is the usual sum of the two access latencies.
- Two sites apart: one-way latency = RTT / 2, the RTT being the mean of the two published directions (they differ by
  at most 5 ms in this table). A worker whose access link is slower than a datacenter host's (`preset =
  "home-broadband"`: volunteers in those cities) pays the difference at its end, because the measured round trip ran
  between datacenter hosts: one-way(i, j) = RTT / 2 + max(0, access_i - 10 us) + max(0, access_j - 10 us).
- Any transfer between sites is capped at `site_bandwidth` (default `SITE_BANDWIDTH_BPS`, 5 Gbit/s) and by the two
  workers' access links. Sites are the network's regions, so the resolved config writes the result as an explicit
  `latency_matrix` and `regions` table, and a run repeats exactly even if this table is later updated.

Source of the round trips: Microsoft, "Azure network round-trip latency statistics",
https://learn.microsoft.com/azure/networking/azure-network-latency (source: MicrosoftDocs/azure-docs,
articles/networking/azure-network-latency.md), dataset taken June 20, 2024 (the 30 days ending June 19, 2024): monthly
P50 round-trip times in ms between Azure regions, measured by Azure's network probes from each source region to each
destination. The page is updated every 6 to 9 months; these are the June 2024 figures, for 16 regions with every pair
published in both directions, so no pair is filled in. Each region is named by the city it is in or next to.

Source of the inter-site bandwidth: AWS, "Amazon EC2 instance network bandwidth",
https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/ec2-instance-network-bandwidth.html: single-flow traffic between
instances outside one cluster placement group is limited to 5 Gbit/s, and traffic to other Regions from an instance
with fewer than 32 vCPUs to 5 Gbit/s in all. hivemind's all-reduce moves each part between two peers on one stream, so
one flow's limit is the figure that applies. It is AWS's figure, assumed to hold between Azure's regions as well.
"""

from __future__ import annotations

from typing import Any

SITE_BANDWIDTH_BPS = 5e9  # AWS EC2's single-flow limit outside a placement group (module docstring)
DATACENTER_ACCESS_S = 10e-6  # the `datacenter` preset's access latency: what the measured hosts already paid

# City -> the Azure region there (Microsoft's region names, the headers of the published table).
SITE_REGION: dict[str, str] = {
    "virginia": "East US",
    "california": "West US",
    "texas": "South Central US",
    "toronto": "Canada Central",
    "sao-paulo": "Brazil South",
    "london": "UK South",
    "amsterdam": "West Europe",
    "frankfurt": "Germany West Central",
    "paris": "France Central",
    "johannesburg": "South Africa North",
    "dubai": "UAE North",
    "pune": "Central India",
    "singapore": "Southeast Asia",
    "tokyo": "Japan East",
    "seoul": "Korea Central",
    "sydney": "Australia East",
}

# The source regions of the published tables, in the page's (alphabetical) row order.
_SOURCES = ("Australia East", "Brazil South", "Canada Central", "Central India", "East US", "France Central",
            "Germany West Central", "Japan East", "Korea Central", "South Africa North", "South Central US",
            "Southeast Asia", "UAE North", "UK South", "West Europe", "West US")
_ = None  # a region to itself: not a pair
# Destination region -> P50 RTT in ms from each source region (in `_SOURCES` order), as published (June 2024 dataset).
_PUBLISHED_RTT_MS: dict[str, tuple[int | None, ...]] = {
    "West US":              (140, 186,  61, 220,  71, 150, 160, 108, 160, 294,  36, 171, 255, 148, 154,   _),
    "South Central US":     (162, 142,  47, 230,  35, 112, 122, 128, 166, 255,   _, 203, 215, 114, 119,  36),
    "East US":              (201, 119,  20, 203,   _,  90,  96, 170, 229, 227,  38, 234, 187,  79,  90,  74),
    "Brazil South":         (316,   _, 130, 307, 116, 190, 197, 278, 302, 326, 142, 343, 287, 179, 185, 186),
    "Canada Central":       (196, 131,   _, 213,  18, 103, 110, 159, 236, 239,  48, 223, 199,  90,  95,  62),
    "Australia East":       (  _, 317, 194, 147, 201, 294, 296, 104, 134, 279, 162,  95, 180, 281, 286, 140),
    "Japan East":           (103, 278, 158, 121, 169, 251, 250,   _,  33, 252, 127,  72, 155, 244, 250, 108),
    "France Central":       (293, 190, 102, 126,  87,   _,  11, 252, 247, 156, 110, 183, 116,  10,  11, 149),
    "West Europe":          (287, 186,  95, 135,  89,  12,  11, 251, 254, 163, 118, 190, 123,  11,   _, 155),
    "Germany West Central": (296, 199, 110, 135,  96,  13,   _, 252, 254, 164, 123, 189, 122,  19,  12, 162),
    "UK South":             (280, 179,  89, 131,  77,  10,  17, 244, 252, 162, 114, 188, 122,   _,  10, 147),
    "Korea Central":        (131, 303, 235, 118, 224, 247, 251,  32,   _, 250, 165,  69, 152, 252, 253, 159),
    "Central India":        (147, 307, 213,   _, 200, 127, 134, 122, 119, 138, 230,  55,  38, 133, 136, 221),
    "Southeast Asia":       ( 91, 344, 223,  55, 233, 186, 188,  73,  70, 188, 204,   _,  90, 189, 190, 172),
    "UAE North":            (180, 287, 198,  37, 184, 116, 120, 155, 152, 102, 214,  88,   _, 121, 122, 254),
    "South Africa North":   (280, 327, 239, 137, 225, 157, 164, 253, 251,   _, 256, 187, 104, 163, 163, 295),
}
SITES = tuple(SITE_REGION)


def published_rtt_ms(source: str, destination: str) -> int:
    """The published P50 round trip from one site's region to another's, in ms."""
    return _PUBLISHED_RTT_MS[SITE_REGION[destination]][_SOURCES.index(SITE_REGION[source])]


def site_one_way_s(a: str, b: str) -> float:
    """One-way latency between two sites' datacenters: half the mean of the two published round trips."""
    if a == b:
        return 0.0
    return (published_rtt_ms(a, b) + published_rtt_ms(b, a)) / 4e3


def _site(name: Any, where: str) -> str:
    if not isinstance(name, str) or name.strip().lower() not in SITE_REGION:
        raise ValueError(f"{where}: unknown site {name!r}; known: {', '.join(SITES)}")
    return name.strip().lower()


def _count(value: Any, where: str) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: expected a number of workers (an integer >= 1), got {value!r}")
    return value


def site_of_workers(spec: Any, n_workers: int) -> tuple[str, ...]:
    """The site of each worker from a `sites` value (see the module docstring); errors start with `sites`."""
    if isinstance(spec, str):  # "frankfurt:4,virginia:4" or "frankfurt,virginia"
        items = [item.strip() for item in spec.split(",")]
        if any(":" in item for item in items):
            pairs = [item.partition(":") for item in items]
            if any(not sep for _, sep, _ in pairs):
                raise ValueError(f"sites: {spec!r} mixes 'site:count' and bare sites; give a count for every site "
                                 f"(e.g. 'frankfurt:4,virginia:4') or none (one worker each)")
            spec = {name.strip(): count.strip() for name, _, count in pairs}
        else:
            spec = items
    if isinstance(spec, dict):
        placed = []
        for name, count in spec.items():
            placed += [_site(name, "sites")] * _count(count, f"sites.{name}")
        what = "counts that add up to"
    elif isinstance(spec, (list, tuple)):
        placed = [_site(name, f"sites[{i}]") for i, name in enumerate(spec)]
        what = "one site per worker, i.e."
    else:
        raise ValueError(f"sites: expected a list of sites (one per worker), a table of site = number of workers "
                         f"or a string such as 'frankfurt:4,virginia:4', got {spec!r}")
    if len(placed) != n_workers:
        example = (f"frankfurt = {n_workers - n_workers // 2}, virginia = {n_workers // 2}" if n_workers > 1
                   else "frankfurt = 1")
        raise ValueError(f"sites: places {len(placed)} worker{'s' * (len(placed) != 1)} but the run has "
                         f"{n_workers}; give {what} {n_workers} (e.g. {{ {example} }})")
    return tuple(placed)
