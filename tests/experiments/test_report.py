import json
import math

import pytest

from cluster.records import CommRecord, EvalRecord, StepRecord
from experiments.report import human_bytes, human_seconds, write_report
from experiments.summary import read_metrics, summarize

ARMS = [
    {"name": "ddp-dc", "workers": 2, "algorithm": "ddp", "network": "datacenter", "device": "h100", "codec": "none"},
    {"name": "ddp-home", "workers": 2, "algorithm": "ddp", "network": "home", "device": "h100", "codec": "none"},
    {"name": "diloco-home", "workers": 2, "algorithm": "diloco", "network": "home", "device": "h100", "codec": "fp16"},
]


def step(arm, worker, n, tokens, time_s, compute_s, loss=3.0):
    return StepRecord(arm=arm, worker=worker, step=n, tokens=tokens, loss=loss, time_s=time_s, compute_s=compute_s)


def comm(arm, n, sent, received, comm_s, idle, time_s, *, raw_bytes=100, message_bytes=100):
    return CommRecord(arm=arm, round=n, group=0, step=n, collective="ring_allreduce", payload="gradients",
                      participants=[0, 1], message_bytes=message_bytes, raw_bytes=raw_bytes, bytes_sent=sent,
                      bytes_received=received, comm_s=comm_s, blocking=True, idle_s=idle, time_s=time_s,
                      staleness=0)


def evaluation(arm, n, tokens, time_s, loss):
    return EvalRecord(arm=arm, step=n, tokens=tokens, time_s=time_s, loss=loss, param_spread=0.0)


def records():
    dc = [evaluation("ddp-dc", 0, 0, 0.0, 4.0)]
    for n in (1, 2):
        dc += [step("ddp-dc", w, n, 200 * n, 1.1 * n, 1.0) for w in (0, 1)]
        dc.append(comm("ddp-dc", n, [100, 100], [100, 100], 0.1, [0.0, 0.0], 1.1 * n))
    dc.append(evaluation("ddp-dc", 2, 400, 2.2, 2.0))

    # Worker 1 computes 1.5 s per step, so worker 0 idles 0.5 s before each 10 s exchange.
    home = [evaluation("ddp-home", 0, 0, 0.0, 4.0),
            step("ddp-home", 0, 1, 200, 1.0, 1.0), step("ddp-home", 1, 1, 200, 1.5, 1.5),
            comm("ddp-home", 1, [100, 100], [100, 100], 10.0, [0.5, 0.0], 11.5),
            evaluation("ddp-home", 1, 200, 11.5, 2.5),
            step("ddp-home", 0, 2, 400, 12.5, 1.0), step("ddp-home", 1, 2, 400, 13.0, 1.5),
            comm("ddp-home", 2, [100, 100], [100, 100], 10.0, [0.5, 0.0], 23.0),
            evaluation("ddp-home", 2, 400, 23.0, 2.0)]

    diloco = [evaluation("diloco-home", 0, 0, 0.0, 4.0)]
    for n in (1, 2, 3, 4):
        diloco += [step("diloco-home", w, n, 200 * n, float(n), 1.0) for w in (0, 1)]
    diloco += [evaluation("diloco-home", 2, 400, 2.0, 2.6), evaluation("diloco-home", 3, 600, 3.0, 2.1),
               comm("diloco-home", 4, [50, 70], [60, 60], 10.0, [0.2, 0.0], 14.0),
               evaluation("diloco-home", 4, 800, 14.0, 2.2)]

    # Interleave arms, as a parallel run would write them.
    merged = []
    for i in range(max(len(dc), len(home), len(diloco))):
        merged += [part[i] for part in (dc, home, diloco) if i < len(part)]
    return merged


def test_summary_matches_hand_computation():
    s = summarize(records(), ARMS, baseline="ddp-dc", target_loss=2.5)
    assert list(s["arms"]) == ["ddp-dc", "ddp-home", "diloco-home"]
    assert s["baseline"] == "ddp-dc" and s["target_loss"] == 2.5

    dc = s["arms"]["ddp-dc"]
    assert dc["bytes_sent"] == 400 and dc["bytes_received"] == 400 and dc["bytes_sent_per_worker"] == [200, 200]
    assert dc["rounds"] == 2 and dc["tokens"] == 400
    assert dc["comm_s"] == pytest.approx(0.2) and dc["compute_s"] == pytest.approx(4.0)
    assert dc["time_s"] == pytest.approx(2.2)
    assert dc["compute_utilisation"] == pytest.approx(4.0 / (2 * 2.2))
    assert (dc["time_to_target_s"], dc["tokens_to_target"]) == (pytest.approx(2.2), 400)
    assert dc["loss_ratio"] == dc["time_ratio"] == dc["bytes_ratio"] == dc["time_to_target_ratio"] == 1.0

    home = s["arms"]["ddp-home"]
    assert home["idle_s"] == pytest.approx(1.0) and home["compute_s"] == pytest.approx(5.0)
    assert home["time_s"] == pytest.approx(23.0)
    assert home["compute_utilisation"] == pytest.approx(5.0 / (2 * 23.0))
    # Loss exactly at the target counts as reached.
    assert (home["time_to_target_s"], home["tokens_to_target"]) == (pytest.approx(11.5), 200)
    assert home["time_ratio"] == pytest.approx(23.0 / 2.2)
    assert home["time_to_target_ratio"] == pytest.approx(11.5 / 2.2)
    assert home["bytes_ratio"] == pytest.approx(1.0)

    diloco = s["arms"]["diloco-home"]
    assert diloco["algorithm"] == "diloco" and diloco["codec"] == "fp16" and diloco["workers"] == 2
    assert diloco["bytes_sent"] == 120 and diloco["bytes_received"] == 120
    assert diloco["bytes_sent_per_worker"] == [50, 70]
    assert diloco["rounds"] == 1 and diloco["tokens"] == 800
    # The exchange at 14 s ends after every step's clock, so it sets the arm's time.
    assert diloco["time_s"] == pytest.approx(14.0)
    assert diloco["compute_utilisation"] == pytest.approx(8.0 / (2 * 14.0))
    assert diloco["final_loss"] == 2.2 and diloco["best_loss"] == 2.1
    # First eval at or under 2.5 is step 3 (2.1), not the better-timed step 2 (2.6) nor the final one.
    assert (diloco["time_to_target_s"], diloco["tokens_to_target"]) == (pytest.approx(3.0), 600)
    assert diloco["loss_ratio"] == pytest.approx(1.1)
    assert diloco["time_ratio"] == pytest.approx(14.0 / 2.2)
    assert diloco["bytes_ratio"] == pytest.approx(0.3)
    assert diloco["time_to_target_ratio"] == pytest.approx(3.0 / 2.2)


def test_summary_is_strict_json_and_deterministic():
    first = json.dumps(summarize(records(), ARMS, "ddp-dc", 2.5), allow_nan=False)
    assert first == json.dumps(summarize(records(), ARMS, "ddp-dc", 2.5), allow_nan=False)


def test_null_cases():
    no_target = summarize(records(), ARMS, "ddp-dc", None)["arms"]["diloco-home"]
    assert no_target["time_to_target_s"] is None and no_target["tokens_to_target"] is None
    assert no_target["time_to_target_ratio"] is None

    # diloco-home's best loss is 2.1, so it misses 2.05 while the other arms reach it.
    unreached = summarize(records(), ARMS, "ddp-dc", 2.05)["arms"]
    assert unreached["diloco-home"]["time_to_target_s"] is None
    assert unreached["diloco-home"]["tokens_to_target"] is None
    assert unreached["diloco-home"]["time_to_target_ratio"] is None
    missed_baseline = summarize(records(), ARMS, "diloco-home", 2.05)["arms"]
    assert missed_baseline["ddp-dc"]["time_to_target_s"] == pytest.approx(2.2)
    assert missed_baseline["ddp-dc"]["time_to_target_ratio"] is None

    # A baseline that sent nothing gives no bytes ratio rather than a division by zero.
    silent = [r for r in records() if not (r.arm == "ddp-dc" and r.kind == "comm")]
    arms = summarize(silent, ARMS, "ddp-dc", 2.5)["arms"]
    assert arms["ddp-dc"]["bytes_sent"] == 0 and arms["ddp-dc"]["bytes_sent_per_worker"] == [0, 0]
    assert arms["diloco-home"]["bytes_ratio"] is None


def test_arm_without_records_and_diverged_arm():
    arms = ARMS + [{"name": "idle", "workers": 2, "algorithm": "ddp", "network": "home", "device": "cpu",
                    "codec": "none"}]
    extra = [evaluation("ddp-home", 3, 600, 30.0, math.nan)]
    s = summarize(records() + extra, arms, "ddp-dc", 2.5)
    idle = s["arms"]["idle"]
    assert idle["final_loss"] is None and idle["time_s"] == 0.0 and idle["compute_utilisation"] is None
    assert idle["loss_ratio"] is None and idle["bytes_ratio"] == 0.0
    home = s["arms"]["ddp-home"]
    assert home["diverged"] and home["final_loss"] is None and home["best_loss"] == 2.0
    assert not s["arms"]["ddp-dc"]["diverged"]
    json.dumps(s, allow_nan=False)


def test_an_arm_that_ends_above_its_untrained_loss_diverged():
    # Finite, but above its step-0 evaluation (4.0): worse than untrained. At 4.0 exactly it has not diverged.
    for last, diverged in ((5.75, True), (4.0, False)):
        s = summarize(records() + [evaluation("ddp-home", 3, 600, 30.0, last)], ARMS, "ddp-dc", 2.5)
        home = s["arms"]["ddp-home"]
        assert home["final_loss"] == last and home["diverged"] is diverged
        assert not s["arms"]["ddp-dc"]["diverged"]


def test_unknown_baseline_names_the_arms():
    with pytest.raises(ValueError, match="ddp-home"):
        summarize(records(), ARMS, "ddp-nowhere", None)


def test_read_metrics_round_trip(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r.to_json()) for r in records()) + "\n\n")
    assert read_metrics(path) == records()
    path.write_text(json.dumps(records()[0].to_json()) + "\n{\"kind\": \"st")
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        read_metrics(path)
    # A line that is JSON but no record names its line and what is wrong with it.
    path.write_text(json.dumps({**records()[0].to_json(), "colour": "red"}) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:1: a eval record has unknown fields \['colour'\]"):
        read_metrics(path)


def test_record_lines_keep_the_documented_field_order():
    # results/README.md documents these fields in this order; the real mode's extras appear only when set.
    line = comm("a", 3, [1, 2], [2, 1], 0.5, [0.0, 0.1], 4.0).to_json()
    assert list(line) == ["kind", "arm", "round", "group", "step", "collective", "payload", "participants",
                          "message_bytes", "raw_bytes", "bytes_sent", "bytes_received", "comm_s", "blocking",
                          "idle_s", "time_s", "staleness"]
    assert list(step("a", 0, 1, 10, 1.0, 1.0).to_json()) == ["kind", "arm", "worker", "step", "tokens", "loss",
                                                             "time_s", "compute_s"]
    swarm = StepRecord(arm="a", worker=0, step=0, tokens=1, loss=None, time_s=1.0, compute_s=1.0, samples=4,
                       late_samples=0, staleness=0).to_json()
    assert list(swarm)[-4:] == ["compute_s", "samples", "late_samples", "staleness"] and swarm["loss"] is None


def test_write_report(tmp_path):
    s = summarize(records(), ARMS, "ddp-dc", 2.5)
    manifest = {"seed": 7, "git_commit": "abc123", "packages": {"torch": "2.13.0"}}
    paths = write_report(tmp_path, records(), s, "[run]\nname = \"a<b>\"\n", manifest, "Home vs <datacenter>")
    names = {p.name for p in paths}
    assert names == {"loss_vs_tokens.png", "loss_vs_time.png", "bytes.png", "report.html"}
    for path in paths:
        assert path.parent == tmp_path and path.exists()
        if path.suffix == ".png":
            assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

    page = (tmp_path / "report.html").read_text()
    assert 'src="http' not in page and "<script" not in page and "<link" not in page
    assert page.count("data:image/png;base64,") == 3
    for arm in ARMS:
        assert arm["name"] in page
    assert "Home vs &lt;datacenter&gt;" in page and 'name = &quot;a&lt;b&gt;&quot;' in page
    assert "abc123" in page and "&quot;torch&quot;: &quot;2.13.0&quot;" in page
    assert ("diloco-home reached loss 2.200 (1.10x the baseline) in 14.0 s of simulated time "
            "(6.4x ddp-dc&#x27;s, 0.61x ddp-home&#x27;s), sending 120 B (3.3x fewer than ddp-dc, "
            "3.3x fewer than ddp-home)") in page
    assert "23.0 s" in page and "not reached" not in page


def test_write_report_is_reproducible(tmp_path):
    s = summarize(records(), ARMS, "ddp-dc", None)
    first = [p.read_bytes() for p in write_report(tmp_path / "a", records(), s, "", {}, "t")]
    second = [p.read_bytes() for p in write_report(tmp_path / "b", records(), s, "", {}, "t")]
    assert first == second


@pytest.mark.parametrize("n, text", [(0, "0 B"), (999, "999 B"), (1000, "1.0 kB"), (48_000_000, "48.0 MB"),
                                     (3_200_000_000, "3.2 GB"), (320e9, "320 GB"), (999_600, "1.0 MB"),
                                     (2.5e15, "2.5 PB")])
def test_human_bytes(n, text):
    assert human_bytes(n) == text


@pytest.mark.parametrize("s, text", [(0, "0 s"), (0.85, "850 ms"), (12.34, "12.3 s"), (252, "4.2 min"),
                                     (3.1 * 3600, "3.1 h"), (2 * 86400, "2.0 d"), (59.97, "1.0 min"),
                                     (0.0005, "500 µs")])
def test_human_seconds(s, text):
    assert human_seconds(s) == text


def test_report_survives_missing_numbers(tmp_path):
    arms = ARMS + [{"name": "idle", "workers": 2, "algorithm": "ddp", "network": "home", "device": "cpu",
                    "codec": "none"}]
    s = summarize([], arms, "ddp-dc", 2.5)
    paths = write_report(tmp_path, [], s, "", {}, "empty")
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "not reached" in page and "sending nothing" in page
    assert all(p.exists() for p in paths)


def test_rankings_put_arms_that_reached_the_target_first_then_by_final_loss():
    from experiments.summary import rankings

    arms = {
        "a": {"time_to_target_s": None, "final_loss": 2.9, "bytes_sent": 10},
        "b": {"time_to_target_s": 50.0, "final_loss": 2.5, "bytes_sent": 30},
        "c": {"time_to_target_s": 20.0, "final_loss": 2.6, "bytes_sent": 20},
        "d": {"time_to_target_s": None, "final_loss": 2.7, "bytes_sent": 0},
    }
    assert rankings(arms) == {"time_to_target": ["c", "b", "d", "a"], "bytes_sent": ["d", "a", "c", "b"]}


def test_compression_ratio_is_raw_over_message_bytes():
    from experiments.summary import summarize

    records = [comm("x", 0, [5, 5], [5, 5], 1.0, [0.0, 0.0], 1.0, raw_bytes=4000, message_bytes=1000),
               comm("x", 1, [5, 5], [5, 5], 1.0, [0.0, 0.0], 1.0, raw_bytes=4000, message_bytes=3000)]
    arms = [{"name": "x", "workers": 2, "algorithm": "ddp", "network": "n", "device": "d", "codec": "c"}]
    summary = summarize(records, arms, "x", None)["arms"]["x"]
    assert summary["compression_ratio"] == 8000 / 4000
    assert summary["rounds"] == 2 and summary["comm_s"] == 2.0  # two rounds, both workers in each


def test_a_run_shorter_than_every_tick_still_plots(tmp_path):
    # One evaluation at 3 ms: no round duration within a factor 1.5 of it, so the time axis has no fixed ticks.
    arms = [{"name": "x", "workers": 2, "algorithm": "ddp", "network": "n", "device": "d", "codec": "none"}]
    records = [evaluation("x", 0, 0, 0.0, 4.0), evaluation("x", 1, 10, 0.00305, 3.0)]
    summary = summarize(records, arms, "x", None)
    paths = write_report(tmp_path, records, summary, "", {}, "t")
    assert [p.name for p in paths] == ["loss_vs_tokens.png", "loss_vs_time.png", "bytes.png", "report.html"]


def test_time_axes_name_the_clock_they_show():
    """The simulator's seconds are the network model's; real peers' are the wall clock's: the plots say which."""
    from cluster.records import EvalRecord, FaultRecord
    from experiments.churn_report import churn_figure, membership
    from experiments.report import _loss_figure

    records = [EvalRecord(arm="a", step=0, tokens=0, time_s=0.0, loss=3.0, param_spread=0.0),
               FaultRecord(arm="a", worker=1, event="leave", time_s=1.5, step=1),
               FaultRecord(arm="a", worker=1, event="return", time_s=2.0, step=2),
               FaultRecord(arm="a", worker=1, event="join", time_s=2.5, step=2),
               EvalRecord(arm="a", step=4, tokens=64, time_s=4.0, loss=2.5, param_spread=0.0)]
    assert membership(records, "a", 2, 4.0) == [[(0.0, 4.0, "live")],
                                               [(0.0, 1.5, "live"), (1.5, 2.0, "gone"), (2.0, 2.5, "waiting"),
                                                (2.5, 4.0, "live")]]
    for clock in ("simulated", "wall-clock"):
        figure = churn_figure(records, ["a"], {"a": 2}, clock=clock)
        assert [ax.get_xlabel() for ax in figure.axes] == [f"{clock} s"] * 2
        summary = {"arms": {"a": {}}, "baseline": "a", "target_loss": None}
        loss = _loss_figure({"a": [r for r in records if isinstance(r, EvalRecord)]}, summary, "time_s", clock=clock)
        assert loss.axes[0].get_xlabel() == f"{clock} time (log scale)"
