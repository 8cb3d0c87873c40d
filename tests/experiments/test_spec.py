"""The experiment file: every user mistake exits 2 with one line naming the field; good files round-trip."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import tomli_w

from experiments import cli
from experiments.fields import ConfigError
from cluster.swarm_timing import SwarmTiming
from experiments.resolved import resolved_config
from experiments.spec import load_spec, parse_spec
from trainer.strategies.collaborative import CollaborativeSettings

TINY = Path(__file__).parent / "files" / "tiny.toml"

HEAD = """
[model]
preset = "tiny"
{model}
[data]
corpus = "synthetic"
{data}
[run]
workers = 2
batch_size = 2
tokens = 1280
runtime = "local"
{run}
"""

ARM = """
[[arm]]
name = "x"
algorithm = "ddp"
network = "datacenter"
{arm}
"""

DILOCO = """
[[arm]]
name = "diloco"
algorithm = {{ name = "diloco", inner_steps = {inner_steps} }}
network = "home-broadband"
"""


def experiment(model="", data="", run="", arm="", extra_arms="", top=""):
    return top + HEAD.format(model=model, data=data, run=run) + ARM.format(arm=arm) + extra_arms


MALFORMED = {
    "workers-zero": (experiment(run="workers = 0").replace("workers = 2\n", ""), "run.workers"),
    "model-preset": (experiment().replace('preset = "tiny"', 'preset = "huge"'), "model.preset"),
    "inner-steps": (experiment(extra_arms=DILOCO.format(inner_steps=0)), "arm.diloco.algorithm.inner_steps"),
    "uplink": (experiment().replace('network = "datacenter"', 'network = { uplink = "fast", latency = "10ms" }'),
               "arm.x.network.uplink"),
    "network-not-a-table": (experiment().replace('network = "datacenter"', "network = 5"), "arm.x.network: "),
    "device": (experiment(arm='device = "tpu-v9"'), "arm.x.device"),
    "codec": (experiment(arm='codec = "zip"'), "arm.x.codec"),
    "codec-list": (experiment(arm='codec = ["fp16"]'), "arm.x.codec"),
    "corpus": (experiment().replace('corpus = "synthetic"', 'corpus = "wikipedia"'), "data.corpus"),
    "text-without-path": (experiment().replace('corpus = "synthetic"', 'corpus = "text"'), "data.path"),
    "text-path-missing": (experiment(data='path = "/no/such/folder/anywhere"').replace('"synthetic"', '"text"'),
                          "data.path"),
    "lr": (experiment(top="[optim]\nlr = 0.0\n"), "optim.lr"),
    "duplicate-name": (experiment(extra_arms=ARM.format(arm="")), "arm[1].name"),
    "two-baselines": (experiment(arm="baseline = true", extra_arms=ARM.format(arm="baseline = true")
                                 .replace('"x"', '"y"')), "arm[1].baseline"),
    "unknown-run-key": (experiment(run="wrokers = 3"), "run.wrokers"),
    "unknown-section": (experiment(top='[network]\npreset = "satellite"\n'), "network: unknown key"),
    "no-arms": (HEAD.format(model="", data="", run=""), "arm"),
    "arm-without-algorithm": (experiment().replace('algorithm = "ddp"', ""), "arm.x.algorithm"),
    "tokens-below-one-step": (experiment().replace("tokens = 1280", "tokens = 100"), "run.tokens"),
    "speed-factors-length": (experiment(arm="speed_factors = [1.0, 1.0, 1.0]"), "arm.x.speed_factors"),
    "n-embd-n-head": (experiment(model="n_embd = 30\nn_head = 4"), "model.n_head"),
    "mode": (experiment(run='mode = "dream"'), "run.mode"),
    "estimate-key": (experiment(top='[estimate]\ndevices = 8\n'), "estimate.devices"),
    "real-needs-ray": (experiment(run='mode = "real"'), "run.runtime"),
    "real-algorithm": (experiment(run='mode = "real"').replace('runtime = "local"', 'runtime = "ray"')
                       .replace('algorithm = "ddp"', 'algorithm = "sparta"'), "arm.x.algorithm"),
    "real-topk": (experiment(run='mode = "real"', arm='codec = "topk:0.1"').replace('runtime = "local"', 'runtime = "ray"'),
                  "arm.x.codec"),
    "shaping": (experiment(run='shaping = "netem"'), "run.shaping"),
    "speed-distribution": (experiment(arm='speed_factors = { distribution = "zipf" }'),
                           "arm.x.speed_factors.distribution"),
    "speed-factor-item": (experiment(arm="speed_factors = [1.0, -2.0]"), "arm.x.speed_factors[1]"),
    "client-mode-index": (experiment(arm="client_mode = [5]"), "arm.x.client_mode"),
    "client-mode-everyone": (experiment(arm="client_mode = [0, 1]"), "arm.x.client_mode"),
    # 2 workers do not fill a 4x4 grid: caught when the file is read, not inside a worker.
    "moshpit-grid": (experiment().replace('algorithm = "ddp"', 'algorithm = { name = "moshpit", target_group_size = 4 }'),
                     "arm.x.algorithm.target_group_size"),
    "demo-codec": (experiment(arm='codec = "fp16"').replace('algorithm = "ddp"', 'algorithm = "demo"'), "arm.x.codec"),
    "topk-fraction": (experiment(arm='codec = "topk:2"'), "arm.x.codec"),
    "allreduce": (experiment(arm='allreduce = "nccl"'), "arm.x.allreduce"),
    # gloo's sockets cannot go through the shaping relays (run.shaping defaults to "relay").
    "gloo-shaped": (experiment(run='mode = "real"', arm='allreduce = "gloo"').replace('runtime = "local"', 'runtime = "ray"'),
                    "arm.x.allreduce"),
    # A collaborative arm's swarm timing is read from its algorithm table, with the same messages as its own settings.
    "swarm-timeout": (experiment().replace('algorithm = "ddp"', 'algorithm = { name = "collaborative", '
                                           'averaging_timeout = 0 }'),
                      "arm.x.algorithm.averaging_timeout: must be a number in (0.0, 86400.0], got 0"),
    "swarm-group-split": (experiment(run="workers = 3").replace("workers = 2\n", "").replace(
        'algorithm = "ddp"', 'algorithm = { name = "collaborative", target_group_size = 2 }'),
        "arm.x.algorithm.target_group_size: 2 would split the 3 peers into several groups"),
    "swarm-group-negative": (experiment().replace('algorithm = "ddp"', 'algorithm = { name = "collaborative", '
                                                  'target_group_size = -1 }'),
                             "arm.x.algorithm.target_group_size: must be an integer >= 0 (0: hivemind's default None), "
                             "got -1"),
    "swarm-timing-elsewhere": (experiment().replace('algorithm = "ddp"', 'algorithm = { name = "diloco", '
                                                    'matchmaking_time = 2 }'),
                               "arm.x.algorithm.matchmaking_time: unknown key; allowed: aggregation, clip_iters, "
                               "clip_tau, inner_steps, name, outer_lr, outer_momentum, trim_fraction"),
}


def assert_one_line_error(err: str, expected: str) -> None:
    assert "Traceback" not in err
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("farflung: error: ")
    assert expected in lines[0]


def test_the_template_is_valid_so_each_case_fails_for_its_own_reason(tmp_path):
    path = tmp_path / "good.toml"
    path.write_text(experiment(extra_arms=DILOCO.format(inner_steps=2)))
    spec = load_spec(path)
    assert spec.name == "good"
    assert [a.name for a in spec.arms] == ["x", "diloco"]


@pytest.mark.parametrize("text, expected", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_file_exits_2_with_one_line_naming_the_field(tmp_path, capsys, text, expected):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert cli.main(["run", str(path), "--quiet", "--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert_one_line_error(captured.err, expected)
    assert captured.out == ""
    assert not (tmp_path / "out").exists()


def test_toml_syntax_error_names_the_file(tmp_path, capsys):
    path = tmp_path / "broken.toml"
    path.write_text(experiment() + "\n[run\nworkers = 2\n")
    assert cli.main(["run", str(path), "--quiet"]) == 2
    assert_one_line_error(capsys.readouterr().err, f"{path}: not valid TOML")


def test_missing_file_exits_2(tmp_path, capsys):
    assert cli.main(["run", str(tmp_path / "nope.toml"), "--quiet"]) == 2
    assert_one_line_error(capsys.readouterr().err, "nope.toml: experiment file not found")


def farflung() -> list[str]:
    script = Path(sys.executable).with_name("farflung")
    return [str(script)] if script.exists() else [sys.executable, "-m", "experiments.cli"]


@pytest.mark.parametrize("case", ["inner-steps", "two-baselines"])
def test_malformed_file_exits_2_from_the_console_script(tmp_path, case):
    text, expected = MALFORMED[case]
    path = tmp_path / "bad.toml"
    path.write_text(text)
    done = subprocess.run([*farflung(), "run", str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "farflung: error: " in done.stderr and expected in done.stderr


# --set overrides


def test_set_overrides_a_section_key_and_every_arm():
    spec = load_spec(TINY, ["run.tokens=2560", "arm.*.device=h100"])
    assert spec.run.tokens == 2560
    assert spec.total_steps == 10  # 2560 / (2 workers x 4 sequences x 32 tokens)
    assert [a.device for a in spec.arms] == ["h100", "h100"]
    assert load_spec(TINY).run.tokens == 5120  # the file itself is not changed


def test_set_turns_a_string_algorithm_into_a_table(tmp_path):
    path = tmp_path / "plain.toml"
    path.write_text(experiment(extra_arms='[[arm]]\nname = "diloco-home"\nalgorithm = "diloco"\nnetwork = "mobile"\n'))
    assert load_spec(path).arms[1].settings.inner_steps == 50  # the default
    spec = load_spec(path, ["arm.diloco-home.algorithm.inner_steps=3"])
    arm = spec.arms[1]
    assert (arm.name, arm.algorithm) == ("diloco-home", "diloco")
    assert (arm.settings.inner_steps, arm.settings.outer_lr) == (3, 0.7)
    assert spec.arms[0].algorithm == "ddp"  # the other arm is untouched


def test_set_bare_word_is_a_string():
    spec = load_spec(TINY, ["arm.*.network=satellite"])
    assert [a.network_label for a in spec.arms] == ["satellite", "satellite"]
    assert spec.arms[0].network.links[0].uplink_bps == 15e6


@pytest.mark.parametrize(
    "override, expected",
    [
        ("run.tokens", "--set 'run.tokens'"),  # no '='
        ("tokens=2560", "--set 'tokens=2560'"),  # no section
        ("arm.nope.device=h100", "no arm named 'nope'"),
        ("model.preset.size=3", "model.preset is a value"),
        ("run.tokens=lots", "run.tokens"),  # a good key with a bad value names the field
    ],
)
def test_bad_set_exits_2_naming_it(capsys, override, expected):
    assert cli.main(["run", str(TINY), "--quiet", "--set", override]) == 2
    assert_one_line_error(capsys.readouterr().err, expected)


# The resolved config reads back to the same spec.


def round_trip(spec):
    return parse_spec(tomllib.loads(tomli_w.dumps(resolved_config(spec))))


def test_resolved_config_of_tiny_reads_back_equal():
    spec = load_spec(TINY)
    assert round_trip(spec) == spec
    assert [a.network_label for a in round_trip(spec).arms] == ["datacenter", "home-broadband"]


def test_resolved_config_with_worker_overrides_and_latency_matrix_reads_back_equal(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("hello far-flung world\n" * 100)
    path = tmp_path / "rich.toml"
    path.write_text(f"""
        description = "three workers on uneven links"
        [model]
        preset = "tiny"
        n_layer = 3
        dropout = 0.1
        [data]
        corpus = "text"
        path = "{corpus}"
        max_bytes = 4096
        [optim]
        lr = 1
        grad_clip = 0
        warmup_steps = 0
        [run]
        workers = 3
        batch_size = 2
        tokens = 19200
        seed = 7
        target_loss = 3
        [[arm]]
        name = "custom"
        algorithm = "ddp"
        network = {{ uplink = "1Gbit", downlink = "2Gbit", latency = "5ms", loss = 0.01 }}
        device = "a100"
        speed_factors = [1, 0.5, 2.0]
        codec = "uint8"
        [[arm]]
        name = "spread"
        algorithm = {{ name = "diloco", inner_steps = 4, outer_lr = 1, outer_momentum = 0 }}
        baseline = true
        [arm.network]
        preset = "home-broadband"
        latency_matrix = [[0, "40ms", "80ms"], ["41ms", 0, "60ms"], [0.08, "60ms", "anything"]]
        [arm.network.workers]
        1 = {{ preset = "satellite" }}
        2 = {{ uplink = "10Mbit", jitter = "3ms" }}
    """.replace("\n        ", "\n"))
    spec = load_spec(path)
    spread = spec.arms[1]
    assert spread.baseline and not spec.arms[0].baseline
    assert spread.network.links[1].uplink_bps == 15e6 and spread.network.links[2].uplink_bps == 10e6
    assert spread.network.links[2].downlink_bps == 250e6  # the rest of worker 2's link is the preset's
    assert spread.network.pair_latency_s(1, 0) == pytest.approx(0.041)

    back = round_trip(spec)
    assert back == spec
    text = tomli_w.dumps(resolved_config(spec))
    assert tomli_w.dumps(resolved_config(back)) == text  # and it is a fixed point


# Defaults and the step arithmetic


def test_first_arm_is_the_baseline_when_none_is_flagged():
    spec = load_spec(TINY)
    assert [a.baseline for a in spec.arms] == [True, False]
    assert spec.baseline.name == "ddp-datacenter"
    flagged = load_spec(TINY, ["arm.diloco-home.baseline=true"])
    assert [a.baseline for a in flagged.arms] == [False, True]
    assert flagged.baseline.name == "diloco-home"


def test_defaults_fill_an_almost_empty_file():
    spec = parse_spec({"arm": [{"name": "a", "algorithm": "diloco", "network": "mobile"}]})
    assert (spec.run.workers, spec.run.batch_size, spec.run.tokens, spec.run.seed) == (4, 8, 1_000_000, 0)
    assert (spec.run.mode, spec.run.runtime, spec.model.block_size, spec.data.corpus) == ("sim", "ray", 128, "stdlib")
    arm = spec.arms[0]
    assert (arm.device, arm.codec, arm.speed_factors, arm.settings.inner_steps) == ("laptop-cpu", "none", (1.0,) * 4, 50)


@pytest.mark.parametrize(
    "tokens, eval_interval, total_steps, eval_every_steps",
    [
        # 3 workers x 2 sequences x 32 tokens = 192 tokens a step
        (2000, 0, 10, 1),  # 1920 tokens trained; a tenth of 2000 is 200 tokens, one step
        (2000, 600, 10, 3),  # 600 // 192
        (2000, 50, 10, 1),  # less than a step still evaluates every step, never every 0
        (2000, 100_000, 10, 10),  # never beyond the end of the run
        (192_000, 0, 1000, 100),
    ],
)
def test_step_arithmetic(tokens, eval_interval, total_steps, eval_every_steps):
    raw = {
        "model": {"preset": "tiny"},
        "run": {"workers": 3, "batch_size": 2, "tokens": tokens, "eval_interval": eval_interval},
        "arm": [{"name": "a", "algorithm": "ddp", "network": "datacenter"}],
    }
    spec = parse_spec(raw)
    assert spec.tokens_per_step == 192
    assert (spec.total_steps, spec.eval_every_steps) == (total_steps, eval_every_steps)


def test_config_error_is_a_value_error_with_one_line():
    with pytest.raises(ConfigError, match=r"^run\.batch_size: must be an integer in \[1, 65536\], got 0$"):
        parse_spec({"run": {"batch_size": 0}, "arm": [{"name": "a", "algorithm": "ddp", "network": "nvlink"}]})


def test_a_collaborative_arms_swarm_timing_is_parsed_beside_its_settings_and_reads_back(tmp_path):
    path = tmp_path / "swarm.toml"
    path.write_text(experiment(extra_arms=DILOCO.format(inner_steps=2)).replace(
        'algorithm = "ddp"', 'algorithm = { name = "collaborative", target_batch_size = 16, matchmaking_time = 2, '
                             'target_group_size = 2 }'))
    spec = load_spec(path)
    swarm, diloco = spec.arms
    assert swarm.settings == CollaborativeSettings(target_batch_size=16)
    assert swarm.swarm == SwarmTiming(matchmaking_time=2.0, averaging_timeout=60.0, target_group_size=2,
                                      progress_refresh_s=0.5)
    assert diloco.swarm is None
    assert resolved_config(spec)["arm"][0]["algorithm"] == {
        "name": "collaborative", "target_batch_size": 16, "average_state_every": 1, "matchmaking_time": 2.0,
        "averaging_timeout": 60.0,
        "target_group_size": 2, "progress_refresh_s": 0.5}
    assert "matchmaking_time" not in resolved_config(spec)["arm"][1]["algorithm"]
    assert round_trip(spec) == spec
    assert load_spec(path, ["arm.x.algorithm.progress_refresh_s=0.25"]).arms[0].swarm.progress_refresh_s == 0.25


def test_speed_factor_distributions_and_client_mode_resolve_and_read_back(tmp_path):
    text = experiment(arm='speed_factors = { distribution = "stragglers", fraction = 0.5, slowdown = 2.0 }\n'
                          'client_mode = [1]')
    text = text.replace('network = "datacenter"', 'network = { preset = "home-broadband", regions = '
                        '{ assignment = [0, 1], inter_latency = "40ms" } }')
    path = tmp_path / "e.toml"
    path.write_text(text)
    spec = load_spec(path)
    (arm,) = spec.arms
    assert arm.speed_factors == (1.0, 0.5)
    assert arm.client_mode == (1,)
    assert arm.network.pair_latency_s(0, 1) == pytest.approx(2 * 0.015 + 0.040)
    assert round_trip(spec) == spec
