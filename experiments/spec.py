"""The experiment file: sections parsed into typed objects that reject bad values by name.

    name = "demo"                      # optional; defaults to the file's stem
    [model]  preset = "small"          # or block_size, n_layer, n_head, n_embd, dropout
    [data]   corpus = "stdlib"         # stdlib | text (with path) | synthetic
    [optim]  lr = 1e-3                 # the inner AdamW shared by every arm
    [run]    workers = 4, batch_size = 8, tokens = 1_000_000, seed = 0, ...
    [[arm]]  name = "ddp-datacenter", algorithm = "ddp", network = "datacenter", device = "laptop-cpu"
    [[arm]]  name = "diloco-home", algorithm = { name = "diloco", inner_steps = 50 }, network = "home-broadband"

Arms share model, data, optimiser, seed and token budget; the arm with `baseline = true` (by
default the first) is the reference for every ratio.
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from cluster.devices import DEVICES, get_device
from cluster.heterogeneity import speed_factors
from cluster.network import Network, build_network, regions_table
from cluster.real.options import ALLREDUCE, SHAPING, check_real_arm
from experiments.fields import ConfigError, boolean, check_keys, choice, integer, number, string
from trainer.compression import check_codec
from trainer.data import DataConfig
from trainer.model import PRESETS as MODEL_PRESETS
from trainer.model import GPTConfig
from trainer.replica import OptimConfig
from trainer.strategies import STRATEGIES
from trainer.strategies.base import Settings

MODES = ("sim", "real", "estimate")
RUNTIMES = ("ray", "local")
CORPORA = ("stdlib", "text", "synthetic")


@dataclass(frozen=True)
class RunConfig:
    workers: int = 4
    batch_size: int = 8  # sequences per worker per step
    tokens: int = 1_000_000  # training tokens over all workers
    seed: int = 0
    eval_interval: int = 0  # tokens between held-out evaluations; 0 means ten evaluations per run
    eval_batches: int = 8
    target_loss: float | None = None
    mode: str = "sim"
    runtime: str = "ray"
    shaping: str = "relay"  # real mode: how each peer's link is shaped ("relay" or "none")


@dataclass(frozen=True)
class ArmConfig:
    name: str
    algorithm: str
    settings: Settings
    network: Network
    network_label: str  # the preset's name, or "custom"
    device: str = "laptop-cpu"
    speed_factors: tuple[float, ...] = ()
    codec: str = "none"
    baseline: bool = False
    client_mode: tuple[int, ...] = ()  # workers without inbound connections (reduce no butterfly part)
    allreduce: str = "hivemind"  # real mode, lockstep arms: "hivemind" (DecentralizedAverager) or "gloo"


@dataclass(frozen=True)
class ExperimentSpec:
    name: str
    description: str
    model: GPTConfig
    data: DataConfig
    optim: OptimConfig
    run: RunConfig
    arms: tuple[ArmConfig, ...]

    @property
    def baseline(self) -> ArmConfig:
        return next(a for a in self.arms if a.baseline)

    @property
    def tokens_per_step(self) -> int:
        return self.run.workers * self.run.batch_size * self.model.block_size

    @property
    def total_steps(self) -> int:
        return self.run.tokens // self.tokens_per_step

    @property
    def eval_every_steps(self) -> int:
        interval = self.run.eval_interval or self.run.tokens // 10
        return max(1, min(self.total_steps, interval // self.tokens_per_step))


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentSpec:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: experiment file not found; give the path of a .toml file such as experiments/demo.toml")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    raw.setdefault("name", path.stem)
    return parse_spec(apply_overrides(raw, overrides))


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """`section.key=value` sets a key; `arm.NAME.key=value` one arm's key, `arm.*.key=value` every arm's."""
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. run.tokens=200000 or arm.diloco.device=h100")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text  # bare words are strings: --set arm.*.network=satellite
        if parts[0] == "arm":
            arms = raw.get("arm", [])
            chosen = [a for a in arms if isinstance(a, dict) and parts[1] in ("*", a.get("name"))]
            if not chosen or len(parts) < 3:
                names = ", ".join(str(a.get("name")) for a in arms if isinstance(a, dict))
                raise ConfigError(f"--set {item!r}: no arm named {parts[1]!r}; arms: {names}; use arm.NAME.key=value")
            targets, keys = chosen, parts[2:]
        else:
            targets, keys = [raw], parts
        for table in targets:
            for depth, k in enumerate(keys[:-1]):
                if isinstance(table.get(k), str) and k in ("algorithm", "network"):
                    table[k] = {"name" if k == "algorithm" else "preset": table[k]}
                table = table.setdefault(k, {})
                if not isinstance(table, dict):
                    where = ".".join(parts[: len(parts) - len(keys) + depth + 1])
                    raise ConfigError(f"--set {item!r}: {where} is a value, not a table; set {where}=value instead")
            table[keys[-1]] = value
    return raw


def parse_spec(raw: dict) -> ExperimentSpec:
    check_keys("experiment", raw, ["name", "description", "model", "data", "optim", "run", "arm"])
    name = string("name", raw.get("name", "experiment"))
    model = parse_model(raw.get("model", {}))
    data = parse_data(raw.get("data", {}))
    optim = parse_dataclass("optim", OptimConfig, raw.get("optim", {}))
    run = parse_run(raw.get("run", {}))
    arms = parse_arms(raw.get("arm"), run.workers, run.seed)
    if run.mode == "real":
        for arm in arms:
            try:
                check_real_arm(arm.algorithm, arm.codec, arm.network, arm.client_mode, arm.speed_factors, run.shaping,
                               arm.allreduce)
            except ValueError as e:
                raise ConfigError(f"arm.{arm.name}.{e}") from None
    spec = ExperimentSpec(name, str(raw.get("description", "")), model, data, optim, run, arms)
    if spec.total_steps < 1:
        raise ConfigError(
            f"run.tokens: {run.tokens} tokens is less than one step of {spec.tokens_per_step} "
            f"(workers x batch_size x block_size); raise run.tokens"
        )
    return spec


def parse_model(table: Any) -> GPTConfig:
    check_keys("model", table, ["preset", *(f.name for f in fields(GPTConfig))])
    preset = choice("model.preset", table.get("preset", "small"), MODEL_PRESETS)
    config = replace(MODEL_PRESETS[preset])
    limits = {"block_size": (8, 4096), "n_layer": (1, 96), "n_head": (1, 128), "n_embd": (8, 16384), "vocab_size": (256, 256)}
    for key, (low, high) in limits.items():
        if key in table:
            config = replace(config, **{key: integer(f"model.{key}", table[key], low, high)})
    if "dropout" in table:
        config = replace(config, dropout=number("model.dropout", table["dropout"], 0.0, 0.9))
    if "bias" in table:
        config = replace(config, bias=boolean("model.bias", table["bias"]))
    if config.n_embd % config.n_head:
        raise ConfigError(f"model.n_head: n_embd {config.n_embd} must be divisible by n_head {config.n_head}")
    return config


def parse_data(table: Any) -> DataConfig:
    check_keys("data", table, [f.name for f in fields(DataConfig)])
    corpus = choice("data.corpus", table.get("corpus", "stdlib"), CORPORA)
    path = table.get("path")
    if corpus == "text":
        path = string("data.path", path) if path is not None else None
        if path is None:
            raise ConfigError("data.path: corpus 'text' needs a path to a file or folder of text")
        if not Path(path).exists():
            raise ConfigError(f"data.path: {path!r} does not exist; give a file or folder of text")
    elif path is not None:
        raise ConfigError(f"data.path: only used with corpus = 'text', not {corpus!r}; remove it or set data.corpus = 'text'")
    max_bytes = table.get("max_bytes")
    if max_bytes is not None:
        integer("data.max_bytes", max_bytes, 1024)
    return DataConfig(
        corpus=corpus, path=path, max_bytes=max_bytes,
        heldout_fraction=number("data.heldout_fraction", table.get("heldout_fraction", 0.05), 0.0, 0.5, low_open=True),
        synthetic_symbols=integer("data.synthetic_symbols", table.get("synthetic_symbols", 16), 2, 256),
        synthetic_bytes=integer("data.synthetic_bytes", table.get("synthetic_bytes", 2_000_000), 10_000),
        synthetic_concentration=number("data.synthetic_concentration", table.get("synthetic_concentration", 0.1), 0.0, 1e3, low_open=True),
    )


_OPTIM_LIMITS = {
    "lr": (0.0, 1.0, True), "min_lr_ratio": (0.0, 1.0, False), "weight_decay": (0.0, 1.0, False),
    "beta1": (0.0, 0.9999, False), "beta2": (0.0, 0.99999, False), "grad_clip": (0.0, 1e6, False),
}


def parse_dataclass(section: str, cls: type, table: Any):
    check_keys(section, table, [f.name for f in fields(cls)])
    values = {}
    for key, value in table.items():
        if key == "warmup_steps":
            values[key] = integer(f"{section}.{key}", value, 0)
        else:
            low, high, low_open = _OPTIM_LIMITS[key]
            values[key] = number(f"{section}.{key}", value, low, high, low_open=low_open)
    return cls(**values)


def parse_run(table: Any) -> RunConfig:
    check_keys("run", table, [f.name for f in fields(RunConfig)])
    target = table.get("target_loss")
    run = RunConfig(
        workers=integer("run.workers", table.get("workers", 4), 1, 1024),
        batch_size=integer("run.batch_size", table.get("batch_size", 8), 1, 65536),
        tokens=integer("run.tokens", table.get("tokens", 1_000_000), 1),
        seed=integer("run.seed", table.get("seed", 0), 0, 2**32 - 1),
        eval_interval=integer("run.eval_interval", table.get("eval_interval", 0), 0),
        eval_batches=integer("run.eval_batches", table.get("eval_batches", 8), 1, 10_000),
        target_loss=None if target is None else number("run.target_loss", target, 0.0, 100.0, low_open=True),
        mode=choice("run.mode", table.get("mode", "sim"), MODES),
        runtime=choice("run.runtime", table.get("runtime", "ray"), RUNTIMES),
        shaping=choice("run.shaping", table.get("shaping", "relay"), SHAPING),
    )
    if run.mode == "estimate":
        raise ConfigError("run.mode: 'estimate' is not available in this version of farflung; use mode = 'sim' or 'real'")
    if run.mode == "real" and run.runtime == "local":
        raise ConfigError("run.runtime: mode 'real' runs each worker as a Ray actor; set runtime = 'ray' or use mode = 'sim'")
    return run


def parse_arms(arms: Any, n_workers: int, seed: int = 0) -> tuple[ArmConfig, ...]:
    if not isinstance(arms, list) or not arms:
        raise ConfigError("arm: at least one [[arm]] table is required (name, algorithm, network)")
    parsed = [parse_arm(f"arm[{i}]", table, n_workers, seed) for i, table in enumerate(arms)]
    names = [a.name for a in parsed]
    for i, n in enumerate(names):
        if n in names[:i]:
            raise ConfigError(f"arm[{i}].name: {n!r} is used by two arms; give each arm its own name")
    flagged = [i for i, a in enumerate(parsed) if a.baseline]
    if len(flagged) > 1:
        raise ConfigError(f"arm[{flagged[1]}].baseline: only one arm can be the baseline (arm {names[flagged[0]]!r} already is)")
    if not flagged:
        parsed[0] = replace(parsed[0], baseline=True)
    return tuple(parsed)


ARM_KEYS = ["name", "algorithm", "network", "device", "speed_factors", "codec", "baseline", "client_mode", "allreduce"]


def parse_arm(path: str, table: Any, n_workers: int, seed: int = 0) -> ArmConfig:
    check_keys(path, table, ARM_KEYS)
    if "name" not in table:
        raise ConfigError(f"{path}.name: every arm needs a name, e.g. name = \"diloco-home\"")
    name = string(f"{path}.name", table["name"])
    path = f"arm.{name}"
    algorithm, settings = parse_algorithm(f"{path}.algorithm", table.get("algorithm"))
    network_raw = table.get("network")
    if network_raw is None:
        raise ConfigError(f"{path}.network: every arm needs a network: a preset name such as 'home-broadband' or a table")
    try:
        network = build_network(network_raw, n_workers)
    except ValueError as e:
        sep = "." if isinstance(network_raw, dict) else ": "
        raise ConfigError(f"{path}.network{sep}{e}") from None
    label = network_raw if isinstance(network_raw, str) else str(network_raw.get("preset", "custom"))
    device = table.get("device", "laptop-cpu")
    try:
        get_device(device)
    except (ValueError, TypeError):
        raise ConfigError(f"{path}.device: unknown device {device!r}; known: {', '.join(sorted(DEVICES))}") from None
    speed_raw = table.get("speed_factors", [1.0] * n_workers)
    try:
        speed = speed_factors(speed_raw, n_workers, seed)
    except ValueError as e:
        # List items say "[i]: ...", table keys "sigma: ...", anything else is about the value itself.
        sep = "" if str(e).startswith("[") else "." if isinstance(speed_raw, dict) else ": "
        raise ConfigError(f"{path}.speed_factors{sep}{e}") from None
    client = table.get("client_mode", [])
    if not isinstance(client, list) or not all(
        isinstance(w, int) and not isinstance(w, bool) and 0 <= w < n_workers for w in client
    ):
        raise ConfigError(f"{path}.client_mode: must be a list of worker indices in 0..{n_workers - 1}, got {client!r}")
    if len(set(client)) == n_workers:
        raise ConfigError(f"{path}.client_mode: at least one worker must accept connections to reduce a part")
    codec = string(f"{path}.codec", table.get("codec", "none"))
    try:
        check_codec(codec)
    except ValueError as e:
        raise ConfigError(f"{path}.codec: {e}") from None
    try:
        STRATEGIES[algorithm].check_arm(settings, n_workers, codec)
    except ValueError as e:
        raise ConfigError(f"{path}.algorithm.{e}" if not str(e).startswith("codec") else f"{path}.{e}") from None
    allreduce = string(f"{path}.allreduce", table.get("allreduce", "hivemind"))
    if allreduce not in ALLREDUCE:
        raise ConfigError(f"{path}.allreduce: must be one of {', '.join(ALLREDUCE)} (real mode, ddp and diloco arms), "
                          f"got {allreduce!r}")
    return ArmConfig(
        name, algorithm, settings, network, label, device, speed, codec,
        boolean(f"{path}.baseline", table.get("baseline", False)), tuple(sorted(set(client))), allreduce,
    )


def parse_algorithm(path: str, value: Any) -> tuple[str, Settings]:
    if value is None:
        raise ConfigError(f"{path}: every arm needs an algorithm: one of {', '.join(STRATEGIES)}")
    table = {"name": value} if isinstance(value, str) else value
    if not isinstance(table, dict) or "name" not in table:
        raise ConfigError(f"{path}: must be an algorithm name or a table with name = one of {', '.join(STRATEGIES)}")
    name = choice(f"{path}.name" if isinstance(value, dict) else path, table["name"], STRATEGIES)
    settings_cls = STRATEGIES[name].Settings
    check_keys(path, table, ["name", *settings_cls.field_names()])
    settings = settings_cls(**{k: v for k, v in table.items() if k != "name"})
    try:
        settings.check()
    except ValueError as e:
        raise ConfigError(f"{path}.{e}") from None
    return name, settings


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
                "algorithm": {"name": a.algorithm, **asdict(a.settings)},
                "network": network_table(a.network, a.network_label),
                "device": a.device,
                "speed_factors": list(a.speed_factors),
                "codec": a.codec,
                "client_mode": list(a.client_mode),
                "allreduce": a.allreduce,
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
