"""The resolved config: every setting of a parsed experiment with its default filled in, as `config.toml` holds it.

`experiments.spec.parse_spec` reads it back to the same spec, so a run repeats from its own folder.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from cluster.hostile import hostile_table
from cluster.network import Network, regions_table

if TYPE_CHECKING:
    from experiments.spec import ExperimentSpec


def resolved_config(spec: ExperimentSpec) -> dict[str, Any]:
    """Every setting with its default filled in, in a form `parse_spec` reads back to the same spec."""

    def clean(d: dict) -> dict:
        return {k: v for k, v in d.items() if v is not None}

    return {
        "name": spec.name,
        "description": spec.description,
        "model": asdict(spec.model),
        "data": clean(asdict(spec.data)),
        "optim": asdict(spec.optim),
        "run": clean(asdict(spec.run)),
        "arm": [
            {
                "name": a.name,
                "baseline": a.baseline,
                "algorithm": {"name": a.algorithm, **asdict(a.settings), **(asdict(a.swarm) if a.swarm else {}),
                              **(asdict(a.aggregation) if a.aggregation else {})},
                "network": network_table(a.network, a.network_label),
                "device": a.device,
                "speed_factors": list(a.speed_factors),
                "codec": a.codec,
                "client_mode": list(a.client_mode),
                "allreduce": a.allreduce,
                **({"faults": ({"hostile": hostile_table(a.hostile)} if a.hostile else {})
                    | (a.faults.raw if a.faults is not None else {})} if a.hostile or a.faults is not None else {}),
            }
            for a in spec.arms
        ],
    }


def network_table(network: Network, label: str = "custom") -> dict[str, Any]:
    def link_table(link) -> dict[str, Any]:
        return {
            "uplink": link.uplink_bps, "downlink": link.downlink_bps, "latency": link.one_way_latency_s,
            "jitter": link.jitter_s, "loss": link.loss,
        }

    first = network.links[0]
    # The preset is kept only so the run keeps its label; the explicit figures below override all of it.
    table = ({} if label == "custom" else {"preset": label}) | link_table(first)
    workers = {str(i): link_table(link) for i, link in enumerate(network.links) if link != first}
    if workers:
        table["workers"] = workers
    if network.latency_matrix_s is not None:
        table["latency_matrix"] = [list(row) for row in network.latency_matrix_s]
    regions = regions_table(network)
    if regions is not None:
        table["regions"] = regions
    return table
