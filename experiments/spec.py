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

Every plain key is declared once, with its type, range, default and help, on a dataclass field
(`trainer.settings.setting`: GPTConfig, DataConfig, OptimConfig, RunConfig, ArmConfig, each
strategy's Settings, SwarmTiming) and read by the one parser, `parse_settings`. What is parsed here
by hand is structural: the model preset under its overrides, an arm's network, speed factors,
client-mode workers, device and codec, and the `algorithm` table that holds a strategy's settings
and, for a collaborative arm, the swarm's timing.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cluster.devices import get_device
from cluster.estimate import EstimateConfig
from cluster.faults import KEYS as CHURN_KEYS
from cluster.faults import FaultsConfig, parse_faults
from cluster.heterogeneity import speed_factors
from cluster.hostile import HostileFault, parse_hostile
from cluster.network import Network, build_network
from cluster.real.options import ALLREDUCE, SHAPING, check_real_arm, check_real_faults
from cluster.swarm_churn import swarm_faults
from cluster.swarm_timing import SwarmTiming
from experiments.fields import ConfigError, check_keys, parse_settings, parse_values
from trainer.compression import check_codec
from trainer.data import DataConfig
from trainer.model import PRESETS as MODEL_PRESETS
from trainer.model import GPTConfig
from trainer.replica import OptimConfig
from trainer.robust import Aggregation
from trainer.settings import Setting, describe, setting, settings_of
from trainer.strategies import STRATEGIES, Strategy
from trainer.strategies.base import Settings

MODES = ("sim", "real", "estimate")
RUNTIMES = ("ray", "local")
MODEL_PRESET = Setting("the model's size: tiny, small (about 1M parameters), base (about 10M)", default="small",
                       choices=tuple(MODEL_PRESETS))
ALGORITHM = Setting("the arm's algorithm (farflung algorithms lists them)", choices=tuple(STRATEGIES))


@dataclass(frozen=True)
class RunConfig:
    workers: int = setting(4, "workers (peers) in every arm", low=1, high=1024)
    batch_size: int = setting(8, "sequences per worker per step", low=1, high=65536)
    tokens: int = setting(1_000_000, "training tokens over all workers", low=1)
    seed: int = setting(0, "seeds the model, the data and every random draw", low=0, high=2**32 - 1)
    eval_interval: int = setting(0, "tokens between held-out evaluations; 0: ten evaluations per run", low=0)
    eval_batches: int = setting(8, "held-out batches per evaluation", low=1, high=10_000)
    target_loss: float | None = setting(None, "held-out loss for the time-to-target figures", low=0.0, high=100.0,
                                        low_open=True)
    mode: str = setting("sim", "sim: the network modelled on a virtual clock; real: real hivemind peers; estimate: "
                        "nothing trains, the cost model extrapolates (farflung estimate)", choices=MODES)
    runtime: str = setting("ray", "where workers run: Ray actors, or objects in this process", choices=RUNTIMES)
    shaping: str = setting("relay", "real mode: how each peer's link is shaped", choices=SHAPING)
    # Off by default: a checkpoint writes every replica's parameters and optimizer state, which for a big model or
    # many workers costs disk and time that a short run does not need. Finished arms are kept either way.
    checkpoint_every: int = setting(0, "simulator: steps (a collaborative arm's epochs) between the checkpoints "
                                    "`farflung run --resume` continues from; 0: none, only finished arms are kept",
                                    low=0)

    def check(self) -> None:
        if self.mode == "real" and self.runtime == "local":
            raise ValueError("runtime: mode 'real' runs each worker as a Ray actor; set runtime = 'ray' or use "
                             "mode = 'sim'")


@dataclass(frozen=True)
class ArmConfig:
    name: str = setting(help="the arm's name in reports and in --set arm.NAME.key=value")
    algorithm: str
    settings: Settings
    network: Network
    network_label: str  # the preset's name, or "custom"
    device: str = setting("laptop-cpu", "every worker's device profile (cluster/devices.py)")
    speed_factors: tuple[float, ...] = ()
    codec: str = setting("none", "how exchanged tensors are encoded (trainer/compression.py)")
    baseline: bool = setting(False, "the reference for every ratio (default: the first arm)")
    client_mode: tuple[int, ...] = ()  # workers without inbound connections (reduce no butterfly part)
    allreduce: str = setting("hivemind", "real mode, lockstep arms: hivemind's DecentralizedAverager, or gloo",
                             choices=ALLREDUCE, note="real mode, ddp and diloco arms")
    swarm: SwarmTiming | None = None  # a collaborative arm's matchmaking and timeouts, from its algorithm table
    aggregation: Aggregation | None = None  # an averaging strategy's reducers' rule, from its algorithm table
    hostile: tuple[HostileFault, ...] = ()  # faults.hostile: peers that poison what they send (cluster.hostile)
    faults: FaultsConfig | None = None  # churn: the arm's faults table over the run's, key by key (cluster.faults)


@dataclass(frozen=True)
class ExperimentSpec:
    name: str = setting(help="the experiment's name, its folder under results/ (default: the file's stem)")
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


def algorithm_settings(strategy: type[Strategy]) -> tuple[type, ...]:
    """What an arm's `algorithm` table sets: the strategy's settings, for a swarm its timing (the cluster's), and
    for a strategy whose exchanges a robust rule can combine (`Strategy.robust_aggregation`) that rule."""
    if strategy.schedule == "collaborative":
        return (strategy.Settings, SwarmTiming)
    return (strategy.Settings, Aggregation) if strategy.robust_aggregation else (strategy.Settings,)


def algorithm_catalog() -> list[dict[str, Any]]:
    """Every registered algorithm with what it exchanges, how it runs on real peers and each key of its `algorithm`
    table (default, what is allowed, help): what `farflung algorithms` prints and the README's table must say."""
    return [
        {"name": name, "summary": strategy.summary, "real_mode": strategy.real_mode,
         "settings": [row for cls in algorithm_settings(strategy) for row in describe(cls)]}
        for name, strategy in STRATEGIES.items()
    ]


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentSpec:
    return parse_spec(read_experiment(path, overrides))


def read_experiment(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """An experiment file's tables with the `--set` overrides applied, before any of it is parsed."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: experiment file not found; give the path of a .toml file such as experiments/demo.toml")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    raw.setdefault("name", path.stem)
    return apply_overrides(raw, overrides)


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """`section.key=value` sets a key; `arm.NAME.key=value` one arm's key, `arm.*.key=value` every arm's,
    `arm.!NAME.key=value` every arm's but NAME's."""
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
            names = [a.get("name") for a in arms if isinstance(a, dict)]
            if parts[1].startswith("!") and parts[1][1:] in names:  # every arm but one (a sweep's baseline, say)
                chosen = [a for a in arms if isinstance(a, dict) and a.get("name") != parts[1][1:]]
            else:
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
    # [sweep] and [frontier] are for `farflung sweep` (experiments.sweep), [estimate] for `farflung estimate`
    # (experiments.estimate); a plain run runs the file as written.
    check_keys("experiment", raw, ["name", "description", "model", "data", "optim", "run", "arm", "faults", "sweep",
                                   "frontier", "estimate"])
    name = parse_values("", ExperimentSpec, {"name": raw.get("name", "experiment")})["name"]
    model = parse_model(raw.get("model", {}))
    data = parse_settings("data", DataConfig, raw.get("data", {}))
    optim = parse_settings("optim", OptimConfig, raw.get("optim", {}))
    run = parse_settings("run", RunConfig, raw.get("run", {}))
    if "estimate" in raw:  # read by `farflung estimate`; checked here so that a typo fails in every mode
        parse_settings("estimate", EstimateConfig, raw["estimate"])
    arms = parse_arms(raw.get("arm"), run.workers, run.seed, raw.get("faults"))
    arms = tuple(with_faults(arm, raw["arm"][i], raw.get("faults"), run) for i, arm in enumerate(arms))
    if run.mode == "real":
        for arm in arms:
            if arm.hostile or (arm.aggregation is not None and arm.aggregation.robust):
                key = "faults.hostile" if arm.hostile else "algorithm.aggregation"
                raise ConfigError(f"arm.{arm.name}.{key}: hostile peers and robust aggregation run in the simulator "
                                  f"only; use mode = 'sim'")
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
    """A preset, then any of its figures overridden."""
    check_keys("model", table, ["preset", *settings_of(GPTConfig)])
    preset = MODEL_PRESET.check("model.preset", table.get("preset", MODEL_PRESET.default))
    overrides = {k: v for k, v in table.items() if k != "preset"}
    config = parse_settings("model", GPTConfig, overrides, base=MODEL_PRESETS[preset])
    if config.n_embd % config.n_head:
        raise ConfigError(f"model.n_head: n_embd {config.n_embd} must be divisible by n_head {config.n_head}")
    return config


def parse_arms(arms: Any, n_workers: int, seed: int = 0, faults: Any = None) -> tuple[ArmConfig, ...]:
    """The arms; `faults` (the run's `[faults]` table) applies to every arm whose own `faults` does not set a key."""
    if not isinstance(arms, list) or not arms:
        raise ConfigError("arm: at least one [[arm]] table is required (name, algorithm, network)")
    run_faults = check_keys("faults", faults, FAULT_KEYS) if faults is not None else {}
    parsed = [parse_arm(f"arm[{i}]", table, n_workers, seed, run_faults) for i, table in enumerate(arms)]
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


ARM_KEYS = ["name", "algorithm", "network", "device", "speed_factors", "codec", "baseline", "client_mode", "allreduce",
            "faults"]
FAULT_KEYS = ["hostile", *CHURN_KEYS]  # hostile peers (cluster.hostile) and churn (cluster.faults)


def with_faults(arm: ArmConfig, table: dict, run_faults: Any, run: RunConfig) -> ArmConfig:
    """The arm with its churn: its own `faults` table's churn keys if it has any, else the run's (a trace is one
    whole: an arm's `events` replace the run's `mtbf`, they do not add to it); `hostile` is read by `parse_arm`."""
    own = {k: v for k, v in table.get("faults", {}).items() if k in CHURN_KEYS}
    value = own or {k: v for k, v in (run_faults or {}).items() if k in CHURN_KEYS}
    if not value:
        return arm
    path = f"arm.{arm.name}.faults" if own else "faults"
    faults = parse_faults(path, value, run.workers)
    if run.mode == "real":
        try:
            check_real_faults(arm.algorithm, faults, path, arm.allreduce, arm.settings)  # what real peers play
        except ValueError as e:
            raise ConfigError(str(e)) from None
    elif STRATEGIES[arm.algorithm].schedule == "collaborative":
        faults = swarm_faults(path, faults, arm.swarm or SwarmTiming())  # hivemind.Optimizer's timeouts
    return replace(arm, faults=faults)


def parse_arm(path: str, table: Any, n_workers: int, seed: int = 0, run_faults: dict | None = None) -> ArmConfig:
    check_keys(path, table, ARM_KEYS)
    if "name" not in table:
        raise ConfigError(f"{path}.name: every arm needs a name, e.g. name = \"diloco-home\"")
    name = parse_values(path, ArmConfig, {"name": table["name"]})["name"]
    path = f"arm.{name}"
    plain = parse_values(path, ArmConfig, {k: table[k] for k in ("device", "codec", "baseline", "allreduce")
                                           if k in table})
    algorithm, settings, swarm, aggregation = parse_algorithm(f"{path}.algorithm", table.get("algorithm"))
    faults = check_keys(f"{path}.faults", table["faults"], FAULT_KEYS) if "faults" in table else {}
    where = f"{path}.faults" if "hostile" in faults else "faults"
    hostile = parse_hostile(f"{where}.hostile", {**(run_faults or {}), **faults}.get("hostile"), n_workers)
    if hostile and STRATEGIES[algorithm].schedule != "lockstep":
        raise ConfigError(f"{where}.hostile: hostile peers are modelled for lockstep algorithms only, not "
                          f"{algorithm!r}; give this arm faults = {{ hostile = [] }}")
    network, label = parse_network(f"{path}.network", table.get("network"), n_workers)
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
    arm = ArmConfig(name=name, algorithm=algorithm, settings=settings, network=network, network_label=label,
                    speed_factors=speed, client_mode=tuple(sorted(set(client))), swarm=swarm, aggregation=aggregation,
                    hostile=hostile, **plain)
    try:
        get_device(arm.device)
    except ValueError as e:
        raise ConfigError(f"{path}.device: {e}") from None
    try:
        check_codec(arm.codec)
    except ValueError as e:
        raise ConfigError(f"{path}.codec: {e}") from None
    try:
        STRATEGIES[algorithm].check_arm(settings, n_workers, arm.codec)
        if swarm is not None:
            swarm.check_arm(n_workers)
    except ValueError as e:
        raise ConfigError(f"{path}.algorithm.{e}" if not str(e).startswith("codec") else f"{path}.{e}") from None
    return arm


def parse_network(path: str, value: Any, n_workers: int) -> tuple[Network, str]:
    """The arm's network and its label: the preset's name, or "custom"."""
    if value is None:
        raise ConfigError(f"{path}: every arm needs a network: a preset name such as 'home-broadband' or a table")
    try:
        network = build_network(value, n_workers)
    except ValueError as e:
        raise ConfigError(f"{path}{'.' if isinstance(value, dict) else ': '}{e}") from None
    return network, value if isinstance(value, str) else str(value.get("preset", "custom"))


def parse_algorithm(path: str, value: Any) -> tuple[str, Settings, SwarmTiming | None, Aggregation | None]:
    """The algorithm's name, its settings, for a swarm its timing and for an averaging strategy its aggregation: all
    keys of the one `algorithm` table."""
    if value is None:
        raise ConfigError(f"{path}: every arm needs an algorithm: one of {', '.join(STRATEGIES)}")
    table = {"name": value} if isinstance(value, str) else value
    if not isinstance(table, dict) or "name" not in table:
        raise ConfigError(f"{path}: must be an algorithm name or a table with name = one of {', '.join(STRATEGIES)}")
    name = ALGORITHM.check(f"{path}.name" if isinstance(value, dict) else path, table["name"])
    strategy = STRATEGIES[name]
    classes = algorithm_settings(strategy)
    check_keys(path, table, ["name", *(key for cls in classes for key in settings_of(cls))])
    parsed = [parse_settings(path, cls, {k: v for k, v in table.items() if k in settings_of(cls)}) for cls in classes]
    extra = {type(p): p for p in parsed[1:]}
    return name, parsed[0], extra.get(SwarmTiming), extra.get(Aggregation)
