"""Bad input never reaches a traceback: every user-facing input gets one line naming the field, exit status 2, and
nothing written. The property tests mutate a valid experiment (wrong types, unknown keys, non-positive or unitless
bandwidths, bad durations, groups larger than the run, budgets under one step) and assert that the only exception is
the project's own `ConfigError`, and that the mutations known to be invalid are refused."""

from __future__ import annotations

import copy
import math
import string
from pathlib import Path

import pytest
import tomli_w
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from experiments import cli
from experiments.fields import ConfigError
from experiments.spec import apply_overrides, parse_spec
from experiments.sweep import grid_of

BASE = {
    "name": "bad-input",
    "model": {"preset": "tiny"},
    "data": {"corpus": "synthetic", "synthetic_bytes": 20_000},
    "optim": {"lr": 1e-3, "warmup_steps": 2},
    "run": {"workers": 4, "batch_size": 2, "tokens": 4096, "eval_interval": 1024, "target_loss": 2.0, "seed": 1,
            "runtime": "local"},
    "arm": [
        {"name": "ddp", "algorithm": "ddp", "network": "datacenter", "device": "laptop-cpu"},
        {"name": "dl", "algorithm": {"name": "diloco", "inner_steps": 4, "outer_lr": 0.7}, "codec": "uint8",
         "network": {"preset": "home-broadband", "uplink": "20Mbit", "latency": "30ms",
                     "workers": {"1": {"uplink": "5Mbit"}}},
         "speed_factors": [1.0, 0.5, 1.0, 1.0]},
        {"name": "mp", "algorithm": {"name": "moshpit", "target_group_size": 2},
         "network": {"preset": "datacenter",
                     "regions": {"assignment": [0, 0, 1, 1], "inter_latency": "40ms", "inter_bandwidth": "1Gbit"}}},
        {"name": "co", "algorithm": {"name": "collaborative", "target_batch_size": 16}, "network": "home-broadband",
         "client_mode": [3]},
        {"name": "sd", "algorithm": {"name": "streaming-diloco", "inner_steps": 4},
         "network": {"latency_matrix": [["0ms", "1ms", "2ms", "3ms"]] * 4, "bandwidth": "1Gbit", "latency": "1ms"}},
    ],
}

# Values a mistyped file holds: wrong types, out-of-range numbers, non-finite floats, strings with and without units.
JUNK = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(alphabet=string.printable, max_size=12),
    st.sampled_from(["", "0", "1ms", "-1ms", "10Mbit", "0Mbit", "-5Gbit", "1e400", "nan", "inf", "5 furlongs",
                     "tiny", "ddp", "datacenter", "none", "uint8"]),
    st.lists(st.integers(min_value=-3, max_value=9), max_size=4),
    st.dictionaries(st.sampled_from(["preset", "name", "x", "0"]), st.integers(-2, 3), max_size=2),
)


def _paths(node, prefix=()):
    """Every path into the experiment's tables and lists, the containers themselves included."""
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return
    for key, value in items:
        yield prefix + (key,)
        yield from _paths(value, prefix + (key,))


def _at(node, path):
    for key in path:
        node = node[key]
    return node


PATHS = list(_paths(BASE))
TABLES = [()] + [p for p in PATHS if isinstance(_at(BASE, p), dict)]


def _refused(raw: dict) -> ConfigError | None:
    """None when the file parses; its error when it is refused the way a user must be told. Anything else fails."""
    try:
        parse_spec(raw)
    except ConfigError as e:
        text = str(e)
        assert text and "\n" not in text, f"a refusal must be one line: {text!r}"
        return e
    return None


def test_base_experiment_is_valid():
    assert _refused(copy.deepcopy(BASE)) is None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=st.lists(st.tuples(st.sampled_from(PATHS), JUNK, st.sampled_from(["set", "delete"])), min_size=1,
                      max_size=3))
def test_mutated_experiments_are_parsed_or_refused_in_one_line(edits):
    raw = copy.deepcopy(BASE)
    for path, value, op in edits:
        try:
            parent = _at(raw, path[:-1])
            if op == "delete" and isinstance(parent, dict):
                del parent[path[-1]]
            else:
                parent[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            pass  # an earlier edit replaced the container
    _refused(raw)


@settings(max_examples=100, deadline=None)
@given(table=st.sampled_from(TABLES), key=st.text(alphabet=string.ascii_lowercase + "_", min_size=1, max_size=10),
       value=JUNK)
def test_an_unknown_key_is_refused_by_name(table, key, value):
    raw = copy.deepcopy(BASE)
    parent = _at(raw, table)
    assume(key not in parent)
    if table and table[-1] == "workers" and "network" in table:
        return  # a network's `workers` table is keyed by worker index, tested below
    parent[key] = value
    error = _refused(raw)
    if error is None:
        # Random text can spell a real key (a network's `workers`): then the table's own list of allowed keys, which
        # a key that no table has is refused with, must name it.
        del parent[key]
        parent["zz_no_such_key"] = 0
        listing = str(_refused(raw))
        allowed = listing.partition("allowed: ")[2].split(", ")
        assert key in allowed, f"{'.'.join(map(str, table + (key,)))} was accepted but is not an allowed key: {listing}"
        return
    assert key in str(error)


BANDWIDTHS = st.one_of(st.integers(max_value=0), st.floats(max_value=0.0), st.just(float("nan")),
                       st.sampled_from(["0Mbit", "-10Mbit", "10 furlongs", "10ms", "Mbit", "", "1e400bit", "fast"]))
DURATIONS = st.one_of(st.integers(max_value=-1), st.floats(max_value=-1e-12), st.just(float("nan")),
                      st.sampled_from(["-1ms", "10Mbit", "soon", "", "1e400s", "ms"]))


@settings(max_examples=60, deadline=None)
@given(arm=st.sampled_from([1, 2, 4]), key=st.sampled_from(["uplink", "downlink", "bandwidth"]), value=BANDWIDTHS)
def test_a_bandwidth_that_is_not_positive_or_has_no_unit_is_refused(arm, key, value):
    raw = copy.deepcopy(BASE)
    network = raw["arm"][arm]["network"]
    for other in (["uplink", "downlink"] if key == "bandwidth" else ["bandwidth"]):
        network.pop(other, None)  # so that the only thing wrong is the value under test
    network[key] = value
    error = _refused(raw)
    assert error is not None and f"network.{key}" in str(error)


@settings(max_examples=40, deadline=None)
@given(arm=st.sampled_from([1, 2, 4]), key=st.sampled_from(["latency", "jitter"]), value=DURATIONS)
def test_a_negative_or_unitless_duration_is_refused(arm, key, value):
    raw = copy.deepcopy(BASE)
    raw["arm"][arm]["network"][key] = value
    error = _refused(raw)
    assert error is not None and f"network.{key}" in str(error)


@settings(max_examples=30, deadline=None)
@given(workers=st.integers(min_value=1, max_value=3))
def test_a_group_larger_than_the_run_is_refused(workers):
    raw = copy.deepcopy(BASE)
    raw["run"]["workers"] = workers
    raw["arm"] = [{"name": "mp", "algorithm": {"name": "moshpit", "target_group_size": 4, "grouping": "random"},
                   "network": "datacenter"}]
    error = _refused(raw)
    assert error is not None and "target_group_size" in str(error)


@settings(max_examples=30, deadline=None)
@given(tokens=st.integers(min_value=1, max_value=4 * 2 * 32 - 1))
def test_a_budget_under_one_step_is_refused(tokens):
    raw = copy.deepcopy(BASE)
    raw["run"]["tokens"] = tokens  # one step is 4 workers x 2 sequences x 32 bytes
    error = _refused(raw)
    assert error is not None and str(error).startswith("run.tokens")


@settings(max_examples=150, deadline=None)
@given(key=st.text(alphabet=string.ascii_letters + string.digits + "._*!-", max_size=24),
       value=st.text(alphabet=string.printable, max_size=16))
def test_set_values_are_applied_or_refused_in_one_line(key, value):
    try:
        raw = apply_overrides(copy.deepcopy(BASE), [f"{key}={value}"])
    except ConfigError as e:
        assert "\n" not in str(e)
        return
    _refused(raw)


SWEEP_VALUES = st.one_of(
    JUNK,
    st.lists(JUNK, max_size=3),
    st.fixed_dictionaries({"log": st.lists(JUNK, max_size=4)}),
    st.fixed_dictionaries({"linear": st.lists(JUNK, max_size=4)}),
    st.fixed_dictionaries({"log": st.tuples(st.sampled_from(["10Mbit", "1ms", 1, 0, -1, "x"]),
                                            st.sampled_from(["1Gbit", "300ms", 10, 1e400, "y"]),
                                            st.integers(-1, 6))}),
)


@settings(max_examples=150, deadline=None)
@given(table=st.dictionaries(st.sampled_from(["arm.*.network.bandwidth", "arm.*.network.latency", "run.seed", "zip"]),
                             SWEEP_VALUES, max_size=3))
def test_sweep_ranges_are_expanded_or_refused_in_one_line(table):
    try:
        keys, points = grid_of(table)
    except ConfigError as e:
        assert "\n" not in str(e)
        return
    for point in points:
        assert len(point) == len(keys)
        for value in point:
            if isinstance(value, float):
                assert math.isfinite(value)


# ------------------------------------------------------------------------------------------ the command line itself

def _cli(args, capsys) -> tuple[int, str]:
    try:
        code = cli.main(args)
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    return code, capsys.readouterr().err


def _one_refusal(err: str, prefix: str = "farflung") -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith(prefix), err
    assert "Traceback" not in err
    return lines[-1]


def test_a_malformed_file_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys):
    raw = copy.deepcopy(BASE)
    raw["arm"][1]["network"]["uplink"] = "-3Mbit"
    path = tmp_path / "bad.toml"
    path.write_text(tomli_w.dumps(raw))
    out = tmp_path / "out"
    code, err = _cli(["run", str(path), "--out", str(out), "--quiet"], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("farflung: error: arm.dl.network.uplink:")
    assert not out.exists() and list(tmp_path.iterdir()) == [path]


def test_invalid_toml_exits_2(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text("[run\nworkers = 4\n")
    code, err = _cli(["run", str(path), "--quiet"], capsys)
    assert code == 2 and "not valid TOML" in _one_refusal(err)


def _text_corpus_file(tmp_path: Path, path: str) -> Path:
    raw = copy.deepcopy(BASE)
    raw["data"] = {"corpus": "text", "path": path}
    raw["arm"] = raw["arm"][:1]
    raw["run"]["workers"] = 2
    file = tmp_path / "text.toml"
    file.write_text(tomli_w.dumps(raw))
    return file


def _corpus(tmp_path: Path, kind: str) -> str:
    if kind == "missing":
        return str(tmp_path / "nowhere.txt")
    if kind == "empty-file":
        (tmp_path / "empty.txt").write_bytes(b"")
        return str(tmp_path / "empty.txt")
    if kind == "empty-folder":
        (tmp_path / "corpus").mkdir()
        return str(tmp_path / "corpus")
    if kind == "binary":
        (tmp_path / "weights.bin").write_bytes(bytes(range(256)) * 64)
        return str(tmp_path / "weights.bin")
    if kind == "not-utf8":
        (tmp_path / "latin1.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1") * 500)
        return str(tmp_path / "latin1.txt")
    if kind == "binary-in-folder":
        (tmp_path / "corpus").mkdir()
        (tmp_path / "corpus" / "a.txt").write_text("print('hello')\n" * 500)
        (tmp_path / "corpus" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" * 10)
        return str(tmp_path / "corpus")
    if kind == "too-small":
        (tmp_path / "tiny.txt").write_text("abc")
        return str(tmp_path / "tiny.txt")
    if kind == "unreadable":
        return "/proc/self/mem"  # exists, but reading it from the start fails (EIO), even for root
    raise AssertionError(kind)


@pytest.mark.parametrize("kind,says", [
    ("missing", "does not exist"), ("empty-file", "holds no bytes"), ("empty-folder", "holds no bytes"),
    ("binary", "looks binary"), ("not-utf8", "not UTF-8 text"), ("binary-in-folder", "b.png"),
    ("too-small", "shard"), ("unreadable", "cannot be read"),
])
def test_a_bad_corpus_path_exits_2_before_anything_runs(tmp_path, capsys, kind, says):
    if kind == "unreadable" and not Path("/proc/self/mem").exists():
        pytest.skip("needs Linux's /proc")
    file = _text_corpus_file(tmp_path, _corpus(tmp_path, kind))
    out = tmp_path / "out"
    code, err = _cli(["run", str(file), "--out", str(out), "--quiet"], capsys)
    assert code == 2
    line = _one_refusal(err)
    assert says in line and ("data.path" in line or "data:" in line)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no half-written work folder


def test_a_target_below_the_corpus_floor_is_refused(tmp_path, capsys):
    raw = copy.deepcopy(BASE)
    raw["run"]["target_loss"] = 0.05  # this synthetic source's entropy rate is far above it
    raw["arm"] = raw["arm"][:1]
    file = tmp_path / "floor.toml"
    file.write_text(tomli_w.dumps(raw))
    code, err = _cli(["run", str(file), "--out", str(tmp_path / "out"), "--quiet"], capsys)
    assert code == 2 and "run.target_loss: 0.05 is at or below the corpus's entropy rate" in _one_refusal(err)


@pytest.mark.parametrize("args", [
    ["run", "x.toml", "--runtime", "cloud"], ["sweep"], ["report", "/nonexistent/sweep"], ["estimate-nothing"],
    ["doctor", "--streams", "0"], ["doctor", "--timeout", "nan"], ["doctor", "--port", "70000"],
    ["doctor", "--initial-peers", "not-an-address"], ["join"], ["join", "--initial-peers", "garbage"],
    ["join", "--initial-peers", "/ip4/127.0.0.1/tcp/4001"],
])
def test_command_line_arguments_are_refused_in_one_line(args, capsys):
    code, err = _cli(args, capsys)
    assert code == 2
    _one_refusal(err, prefix="farflung" if args[0] not in ("join", "doctor") else f"farflung {args[0]}")


JOIN_FLAGS = st.sampled_from(["--epochs", "--threads", "--timeout"])


@settings(max_examples=40, deadline=None)
@given(flag=JOIN_FLAGS, value=st.sampled_from(["0", "-1", "nan", "inf", "-inf", "x", "", "1e999", "-0.0"]))
def test_join_numbers_are_refused_before_anything_starts(flag, value):
    from cluster.real import join

    parser = cli.parser()
    try:
        args = parser.parse_args(["join", "--initial-peers",
                                  "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN",
                                  f"{flag}={value}"])
    except SystemExit as e:
        assert e.code == 2
        return
    with pytest.raises(join.JoinError, match=flag):
        join._check(args)


# ------------------------------------------------------------------------------------------------- fault tables

FAULT_VALUES = st.one_of(
    JUNK,
    st.lists(st.fixed_dictionaries({}, optional={
        "worker": st.integers(-2, 6), "leave_step": st.integers(-3, 40), "return_step": st.integers(-3, 40),
        "leave_s": JUNK, "round": st.integers(-2, 5), "phase": st.sampled_from(["before", "sending", "x", ""]),
        "peers": st.lists(st.integers(-1, 5), max_size=3), "kind": st.sampled_from(["sign_flip", "noise", "nope"]),
        "from_step": st.integers(-2, 10), "groups": st.lists(st.lists(st.integers(-1, 5), max_size=3), max_size=3),
        "speed": JUNK, "from_s": JUNK, "to_s": JUNK}), max_size=3),
)


@settings(max_examples=150, deadline=None)
@given(table=st.dictionaries(st.sampled_from(["events", "mtbf", "mttr", "exchange", "stragglers", "partition",
                                              "sender_timeout", "reducer_timeout", "state_sources", "hostile"]),
                             FAULT_VALUES, max_size=3))
def test_fault_tables_are_parsed_or_refused_in_one_line(table):
    raw = copy.deepcopy(BASE)
    raw["arm"] = raw["arm"][:2]
    raw["faults"] = table
    _refused(raw)


@pytest.mark.parametrize("faults,says", [
    ({"mtbf": "1min"}, "mttr"),
    ({"events": [{"worker": 1, "leave_step": 5, "return_step": 9}], "mtbf": "1min", "mttr": "10s"},
     "contradictory"),
    ({"events": [{"worker": 1, "leave_step": 5, "return_step": 9}, {"worker": 1, "leave_step": 7}]},
     "leaves again before it has returned"),
    ({"exchange": [{"worker": 2, "round": 1, "phase": "sending"}, {"worker": 2, "round": 1, "phase": "reducing"}]},
     "fails twice in one round"),
    ({"partition": [{"groups": [[0, 1], [1, 2, 3]], "from_s": 0, "to_s": 1}]}, "on two sides"),
    ({"sender_timeout": "10s", "reducer_timeout": "5s"}, "must be longer than sender_timeout"),
])
def test_contradictory_faults_are_refused(faults, says):
    raw = copy.deepcopy(BASE)
    raw["arm"] = raw["arm"][:2]
    raw["faults"] = faults
    error = _refused(raw)
    assert error is not None and says in str(error) and str(error).startswith("faults")
