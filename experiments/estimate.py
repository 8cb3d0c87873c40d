"""`farflung estimate`: an experiment file's arms, or one arm from flags, estimated by `cluster.estimate`; no training.

From a file, the model is its `[model]` (parameters by `trainer.model.count_params`, FLOPs by
`training_flops_per_token`, as a replica counts them), the global batch is workers x batch_size x block_size, the steps
are run.tokens // that, and each arm keeps its algorithm, network, device, codec and speed factors. The `[estimate]`
table says what the simulator does not model: how many devices a worker is, their intra-node link, how the training
state is laid out over them, and optionally a parameter count that replaces the model's (FLOPs then 6 per parameter
and token, the Kaplan et al. 2020 approximation, attention left out).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cluster import estimate as cost
from cluster.devices import get_device
from cluster.estimate import EstimateConfig
from cluster.network import PRESETS as LINK_PRESETS
from cluster.network import Network, build_network, parse_bandwidth, parse_duration
from experiments.fields import ConfigError, parse_settings
from experiments.spec import ExperimentSpec, parse_spec, read_experiment
from trainer.model import GPTConfig, count_params, training_flops_per_token
from trainer.settings import settings_of
from trainer.strategies import STRATEGIES
from trainer.strategies.streaming_diloco import fragment_bounds


@dataclass(frozen=True)
class ArmInput:
    """Everything the cost model needs of one arm."""

    name: str
    schedule: cost.Schedule
    workload: cost.Workload
    node: cost.Node
    network: Network
    codec: str
    speed_factors: tuple[float, ...] | None = None


def schedule_of(algorithm: str, settings, n_params: int) -> cost.Schedule:
    """The exchange schedule the strategy follows with these settings (see each strategy's train_step)."""
    if algorithm == "ddp":
        return cost.Schedule("ddp", 1, (n_params,), (0,), 0)
    if algorithm == "diloco":
        return cost.Schedule("diloco", settings.inner_steps, (n_params,), (0,), 0)
    if algorithm == "streaming-diloco":
        H, P = settings.inner_steps, settings.fragments
        sizes = tuple(b - a for a, b in fragment_bounds(n_params, P))
        return cost.Schedule("streaming-diloco", H, sizes, tuple(p * H // P for p in range(P)), settings.overlap_steps)
    raise ConfigError(f"algorithm: the estimate covers {', '.join(cost.ALGORITHMS)}, not {algorithm!r}; "
                      "simulate it instead (mode = 'sim')")


def node_of(config: EstimateConfig, device: str) -> cost.Node:
    link = LINK_PRESETS[config.intra_node] if config.devices_per_worker > 1 else None
    return cost.Node(get_device(device), config.devices_per_worker, link, config.memory)


def arms_from_spec(spec: ExperimentSpec, config: EstimateConfig) -> list[ArmInput]:
    seq = spec.model.block_size
    if config.params is None:
        n_params = count_params(spec.model)
        flops = training_flops_per_token(spec.model, seq) * spec.run.batch_size * seq  # as trainer.replica counts it
    else:
        n_params = int(config.params)
        flops = 6.0 * config.params * spec.run.batch_size * seq
    workload = cost.Workload(n_params, flops, spec.tokens_per_step, spec.total_steps)
    arms = []
    for arm in spec.arms:
        try:
            schedule = schedule_of(arm.algorithm, arm.settings, n_params)
        except ConfigError as e:
            raise ConfigError(f"arm.{arm.name}.{e}") from None
        try:
            cost.message_nbytes(1, arm.codec)
        except ValueError as e:
            raise ConfigError(f"arm.{arm.name}.codec: {e}") from None
        arms.append(ArmInput(arm.name, schedule, workload, node_of(config, arm.device), arm.network, arm.codec,
                             arm.speed_factors))
    return arms


def load_arms(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> list[ArmInput]:
    raw = read_experiment(path, overrides)
    config = parse_settings("estimate", EstimateConfig, raw.get("estimate", {}))
    return arms_from_spec(parse_spec(raw), config)


def _number(flag: str, text: str | None, low: float = 0.0) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{flag}: expected a number such as 10e9, got {text!r}") from None
    if not value > low:
        raise ConfigError(f"{flag}: must be > {low:g}, got {text!r}")
    return value


def _as_flag(error: ValueError) -> ConfigError:
    """A settings error ('inner_steps: must be ...') as the flag's error ('--inner-steps: must be ...')."""
    key, _, message = str(error).lstrip(".").partition(": ")
    return ConfigError(f"--{key.replace('_', '-')}: {message}")


def _flagged(flag: str, parse, value):
    try:
        return parse(value)
    except ValueError as e:
        raise ConfigError(f"{flag}: {e}") from None


def _model_from_flags(args) -> tuple[int, float]:
    """Parameters and training FLOPs per token, from --params or from the architecture flags."""
    params = _number("--params", args.params, 1.0)
    if params is not None:
        return int(params), 6.0 * params
    if args.layers is None or args.d_model is None:
        raise ConfigError("--params: give the model size (--params 10e9) or its architecture (--layers and --d-model, "
                          "optionally --heads, --seq-len, --vocab)")
    for flag, value in (("--layers", args.layers), ("--d-model", args.d_model), ("--heads", args.heads),
                        ("--seq-len", args.seq_len), ("--vocab", args.vocab)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag}: must be an integer >= 1, got {value}")
    model = GPTConfig(block_size=args.seq_len or 2048, vocab_size=args.vocab or 32000, n_layer=args.layers,
                      n_head=args.heads or 1, n_embd=args.d_model)
    return count_params(model), training_flops_per_token(model)


def _network_from_flags(args, workers: int) -> Network:
    if (args.network is None) == (args.bandwidth is None):
        raise ConfigError("--network: give a preset (--network cross-region) or --bandwidth with --latency, not both")
    if args.network is not None:
        return _flagged("--network", lambda name: build_network(name, workers), args.network)
    if args.latency is None:
        raise ConfigError("--latency: give the one-way access latency of each link, e.g. --latency 50ms")
    bps = _flagged("--bandwidth", parse_bandwidth, args.bandwidth)
    return build_network({"bandwidth": bps, "latency": _flagged("--latency", parse_duration, args.latency)}, workers)


def arm_from_flags(args, algorithm: str | None = None) -> ArmInput:
    """One arm from `farflung estimate --params ... --workers ...` (see `add_arguments`)."""
    algorithm = algorithm or args.algorithm or "diloco"
    workers = _number("--workers", args.workers, 0)
    if workers is None or workers != int(workers):
        raise ConfigError("--workers: give the number of workers (nodes), e.g. --workers 14")
    workers = int(workers)
    batch_tokens = _number("--batch-tokens", args.batch_tokens)
    if batch_tokens is None:
        raise ConfigError("--batch-tokens: give the global batch per optimizer step in tokens, e.g. 2000000")
    n_params, flops_per_token = _model_from_flags(args)
    network = _network_from_flags(args, workers)
    _flagged("--device", get_device, args.device)
    _flagged("--codec", lambda codec: cost.message_nbytes(1, codec), args.codec)
    strategy = STRATEGIES[algorithm]
    values = {"inner_steps": args.inner_steps, "fragments": args.fragments, "overlap_steps": args.overlap_steps}
    try:
        settings = parse_settings("", strategy.Settings, {k: v for k, v in values.items()
                                                          if v is not None and k in settings_of(strategy.Settings)})
        config = parse_settings("", EstimateConfig, {"devices_per_worker": args.devices_per_worker,
                                                     "intra_node": args.intra_node, "memory": args.memory})
    except ConfigError as e:
        raise _as_flag(e) from None
    tokens = _number("--tokens", args.tokens)
    total_steps = int(tokens // batch_tokens) if tokens is not None else 0
    workload = cost.Workload(n_params, flops_per_token * batch_tokens / workers, batch_tokens, total_steps)
    return ArmInput(algorithm, schedule_of(algorithm, settings, n_params), workload, node_of(config, args.device),
                    network, args.codec)


def estimate_arm(arm: ArmInput, network: Network | None = None) -> cost.Estimate:
    return cost.estimate(arm.schedule, arm.workload, arm.node, network or arm.network, arm.codec, arm.speed_factors)


def solve(arm: ArmInput, what: str, target: float) -> cost.Solved:
    def utilisation_at(network: Network) -> float:
        return estimate_arm(arm, network).compute_utilisation

    solver = cost.solve_bandwidth if what == "bandwidth" else cost.solve_latency
    return solver(utilisation_at, arm.network, target)


def add_arguments(p) -> None:
    p.add_argument("file", nargs="?", help="experiment file (.toml); or describe one arm with the flags below")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a setting of the file, e.g. estimate.devices_per_worker=8 (repeatable)")
    p.add_argument("--json", action="store_true", help='print {"arms": [...]} as JSON')
    p.add_argument("--solve", choices=["bandwidth", "latency"],
                   help="print the least bandwidth (or the largest latency) reaching --utilisation, per arm")
    p.add_argument("--utilisation", type=float, default=0.9, help="the target of --solve (default 0.9)")
    flags = p.add_argument_group("one arm from flags (instead of a file)")
    flags.add_argument("--params", help="parameters, e.g. 10e9 (FLOPs: 6 per parameter and token)")
    for name, help_ in (("--layers", "transformer blocks (with --d-model, instead of --params)"),
                        ("--d-model", "width of the residual stream"), ("--heads", "attention heads"),
                        ("--seq-len", "context length (default 2048)"), ("--vocab", "vocabulary (default 32000)")):
        flags.add_argument(name, type=int, help=help_)
    flags.add_argument("--device", default="h100", help="device profile (cluster/devices.py); default h100")
    flags.add_argument("--devices-per-worker", type=int, default=1, help="devices in one worker (a node)")
    flags.add_argument("--intra-node", default="nvlink", help="link between a node's devices (default nvlink)")
    flags.add_argument("--memory", default="sharded", help="training state sharded over a node's devices or replicated")
    flags.add_argument("--workers", help="workers (nodes)")
    flags.add_argument("--network", help="a network preset for every worker's link, instead of --bandwidth/--latency")
    flags.add_argument("--bandwidth", help="every worker's uplink and downlink, e.g. 1Gbit")
    flags.add_argument("--latency", help="every worker's one-way access latency, e.g. 100ms (a pair: twice this)")
    flags.add_argument("--algorithm", choices=cost.ALGORITHMS, help="default diloco; --solve without it: all three")
    flags.add_argument("--inner-steps", type=int, help="H of diloco and streaming-diloco")
    flags.add_argument("--fragments", type=int, help="streaming-diloco's fragments")
    flags.add_argument("--overlap-steps", type=int, help="streaming-diloco's overlap (tau)")
    flags.add_argument("--codec", default="none", help="codec of the exchanged tensors (default none)")
    flags.add_argument("--batch-tokens", help="global batch per optimizer step, in tokens")
    flags.add_argument("--tokens", help="training tokens, for wall_s")


def _arms(args) -> list[ArmInput]:
    if args.file is not None:
        given = [f for f in ("params", "layers", "workers", "network", "bandwidth", "algorithm") if getattr(args, f)]
        if given:
            raise ConfigError(f"--{given[0]}: describes an arm from flags; with an experiment file use "
                              f"--set (e.g. --set arm.*.network=cross-region)")
        return load_arms(args.file, args.overrides)
    if args.solve and args.algorithm is None:
        return [arm_from_flags(args, a) for a in cost.ALGORITHMS]
    return [arm_from_flags(args)]


def arm_rows(arms: list[ArmInput], tokens_given: bool = True) -> list[dict]:
    rows = []
    for arm in arms:
        row = {"name": arm.name} | estimate_arm(arm).as_dict()
        if not tokens_given:
            row["wall_s"] = row["bytes_sent_total"] = None
        rows.append(row)
    return rows


def main(args) -> int:
    if not 0.0 < args.utilisation <= 1.0:
        raise ConfigError(f"--utilisation: must be in (0, 1], got {args.utilisation}")
    arms = _arms(args)
    if args.solve:
        rows = [{"name": arm.name, "algorithm": arm.schedule.algorithm} | _solved(arm, args.solve, args.utilisation)
                for arm in arms]
        if args.json:
            print(json.dumps({"solve": args.solve, "utilisation": args.utilisation, "arms": rows}, indent=1))
        for row in rows if not args.json else ():
            print(_solved_line(row, args.solve, args.utilisation))
        return 0
    rows = arm_rows(arms, tokens_given=args.file is not None or args.tokens is not None)
    if args.json:
        print(json.dumps({"arms": rows}, indent=1))
        return 0
    for arm, row in zip(arms, rows):
        print(describe(arm, row))
    return 0


def _solved(arm: ArmInput, what: str, target: float) -> dict:
    solved = solve(arm, what, target)
    key = "bandwidth_bps" if what == "bandwidth" else "latency_s"
    return {key: solved.value, "note": solved.reason}


def _solved_line(row: dict, what: str, target: float) -> str:
    from experiments.report import human_seconds

    if what == "bandwidth":
        value = row["bandwidth_bps"]
        text = None if value is None else f"needs at least {_bits(value)} per worker (uplink and downlink)"
    else:
        value = row["latency_s"]
        text = None if value is None else (f"tolerates at most {human_seconds(value)} one-way access latency per "
                                           f"link ({human_seconds(2 * value)} between two workers)")
    tail = row["note"] if text is None else text + (f"; {row['note']}" if row["note"] else "")
    return f"{row['name']}: utilisation {target:g} {tail}"


def _bits(bps: float) -> str:
    for scale, unit in ((1e12, "Tbit/s"), (1e9, "Gbit/s"), (1e6, "Mbit/s"), (1e3, "kbit/s")):
        if bps >= scale:
            return f"{bps / scale:.3g} {unit}"
    return f"{bps:.3g} bit/s"


def describe(arm: ArmInput, row: dict) -> str:
    """An arm's estimate in a few lines of plain words."""
    from experiments.report import human_bytes, human_seconds

    link = arm.network.links[0]  # worker 0's, where links differ
    node = arm.node
    lines = [
        f"{row['name']}: " + (f"{row['algorithm']}, " if row["name"] != row["algorithm"] else "")
        + f"{row['workers']} workers x {node.devices} {node.device.name}, links "
        f"{_bits(link.uplink_bps)} up / {_bits(link.downlink_bps)} down, {human_seconds(link.one_way_latency_s)} "
        f"one-way access latency, codec {arm.codec}",
        f"  step compute {human_seconds(row['step_compute_s'])}"
        + (f" + intra-node reduce {human_seconds(row['intra_node_s'])}" if node.devices > 1 else "")
        + f"; exchange {human_seconds(row['exchange_s'])} every {row['sync_every_steps']:g} steps, "
          f"{human_seconds(row['exposed_comm_s'])} of it exposed",
        f"  compute utilisation {row['compute_utilisation']:.3f}, {row['tokens_per_s']:,.0f} tokens/s"
        + ("" if row["wall_s"] is None else f", {human_seconds(row['wall_s'])} for {arm.workload.total_steps} steps"),
        f"  each worker sends {human_bytes(row['bytes_sent_per_sync'])} per synchronisation"
        + ("" if row["bytes_sent_total"] is None else f", {human_bytes(row['bytes_sent_total'])} in all"),
    ]
    if any(link.jitter_s > 0 for link in arm.network.links):
        lines.append("  (the links' jitter is left out: this is the cost without it)")
    needed, has = row["memory_needed_per_device"], row["device_memory"]
    layout = (f"sharded over {node.devices} devices" if node.memory == "sharded" and node.devices > 1
              else "on every device")
    state = (f"  memory: {human_bytes(needed)} of training state per device ({row['memory_bytes_per_param']} bytes a "
             f"parameter, {layout}; activations not counted)")
    if has is None:
        lines.append(state + f"; the device's memory is not known")
    elif row["memory_fits"]:
        lines.append(state + f", fits in {human_bytes(has)}")
    else:
        lines.append(state + f": DOES NOT FIT in the {human_bytes(has)} of an {node.device.name}; add devices per "
                     f"worker, shard the state (--memory sharded) or pick a larger device")
    return "\n".join(lines)
