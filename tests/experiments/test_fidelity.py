"""`farflung fidelity`: the comparison table, its 25 % flags, and one small run on real loopback peers."""

import json
from pathlib import Path

import pytest

from cluster.records import CommRecord, EvalRecord, StepRecord
from experiments import cli
from experiments.fidelity import compare

REAL = Path(__file__).parents[2] / "experiments" / "real-loopback.toml"


def comm(arm, round_, comm_s, sent, time_s, idle_s=(0.0, 0.0)):
    return CommRecord(arm=arm, round=round_, group=0, step=round_, collective="butterfly", payload="gradients",
                      participants=[0, 1], message_bytes=1, raw_bytes=1, bytes_sent=sent, bytes_received=sent,
                      comm_s=comm_s, blocking=True, idle_s=list(idle_s), time_s=time_s, staleness=0)


def step(arm, compute_s, time_s, samples=None):
    return StepRecord(arm=arm, worker=0, step=0, tokens=0, loss=3.0, time_s=time_s, compute_s=compute_s,
                      samples=samples)


def evaluation(arm, loss, time_s):
    return EvalRecord(arm=arm, step=0, tokens=0, time_s=time_s, loss=loss, param_spread=0.0)


def records(arm, comm_s, compute_s, time_s, sent, loss):
    return ([comm(arm, i, c, sent, time_s) for i, c in enumerate(comm_s)] + [step(arm, c, time_s) for c in compute_s]
            + [evaluation(arm, 9.0, 0.0), evaluation(arm, loss, time_s)])


def test_compare_takes_medians_and_flags_what_is_off_by_more_than_a_quarter():
    sim = records("a", [1.0, 2.0, 3.0], [0.1, 0.1, 0.3], 10.0, [100, 100], 2.0)
    real = records("a", [2.0, 2.5, 9.0], [0.12, 0.12, 0.5], 20.0, [110, 100], 2.0)
    table = compare(sim, real, ["a"])["a"]
    assert table["exchange_s"] == {"predicted": 2.0, "measured": 2.5, "ratio": 1.25, "flagged": False}
    assert table["compute_per_step_s"]["ratio"] == pytest.approx(1.2) and not table["compute_per_step_s"]["flagged"]
    assert table["total_s"] == {"predicted": 10.0, "measured": 20.0, "ratio": 2.0, "flagged": True}
    assert table["bytes_sent"]["predicted"] == 600 and table["bytes_sent"]["measured"] == 630
    assert table["final_loss"]["ratio"] == 1.0
    assert table["bytes_per_round"]["predicted"] == 200 and table["bytes_per_round"]["measured"] == 210


def test_swarm_arms_compare_compute_per_sample_and_rounds():
    # Epochs of different sizes: 2 epochs of 64 samples predicted, 1 of 192 measured.
    sim = [comm("c", r, 0.2, [50, 50], 1.0, idle_s=(1.0, w)) for r, w in ((0, 1.5), (1, 0.5))]
    sim += [step("c", 0.32, 1.0, samples=64) for _ in (0, 1)]
    real = [comm("c", 0, 3.0, [300, 300], 4.0, idle_s=(3.0, 2.5)), step("c", 1.92, 4.0, samples=192)]
    table = compare(sim, real, ["c"])["c"]
    assert "compute_per_step_s" not in table and "exchange_s" not in table
    assert table["epoch_wait_s"]["predicted"] == pytest.approx(1.25)  # the median of the slowest peers' 1.5 and 1.0
    assert table["epoch_wait_s"]["measured"] == pytest.approx(3.0)
    assert table["compute_per_sample_s"]["predicted"] == pytest.approx(0.005)
    assert table["compute_per_sample_s"]["measured"] == pytest.approx(0.01)
    assert table["rounds"] == {"predicted": 2, "measured": 1, "ratio": 0.5, "flagged": True}
    assert table["bytes_per_round"]["ratio"] == pytest.approx(6.0)


def test_a_simulated_swarm_epoch_is_its_gradient_round_and_state_average_together():
    # The simulator writes an epoch as two records (the state round's all-reduce in comm_s); a real swarm as one.
    def state(round_, step_, idle, comm_s):
        return CommRecord(arm="c", round=round_, group=0, step=step_, collective="butterfly", payload="parameters",
                          participants=[0, 1], message_bytes=1, raw_bytes=1, bytes_sent=[50, 50],
                          bytes_received=[50, 50], comm_s=comm_s, blocking=True, idle_s=[idle, idle], time_s=2.0,
                          staleness=0)

    sim = [comm("c", 0, 0.2, [50, 50], 1.0, idle_s=(1.0, 0.5)), state(1, 0, 4.0, 0.2)]
    sim += [step("c", 0.32, 2.0, samples=64)]
    real = [comm("c", 0, 5.0, [100, 100], 4.0, idle_s=(5.0, 4.5)), step("c", 0.32, 4.0, samples=64)]
    table = compare(sim, real, ["c"])["c"]
    assert table["epoch_wait_s"]["predicted"] == pytest.approx(1.0 + 4.0 + 0.2)
    assert table["rounds"]["predicted"] == table["rounds"]["measured"] == 1
    assert table["bytes_per_round"]["predicted"] == table["bytes_per_round"]["measured"] == 200


def test_fidelity_of_an_algorithm_without_a_real_counterpart_exits_2(tmp_path, capsys):
    text = REAL.read_text().replace('algorithm = "ddp"', 'algorithm = "sparta"')
    path = tmp_path / "e.toml"
    path.write_text(text)
    assert cli.main(["fidelity", str(path)]) == 2
    assert "arm.ddp.algorithm" in capsys.readouterr().err


@pytest.mark.ray
@pytest.mark.hivemind
def test_fidelity_runs_sim_and_real_and_writes_its_report(tmp_path, capsys):
    out = tmp_path / "fid"
    # One DiLoCo arm, 20 steps: two real exchanges over shaped loopback links.
    code = cli.main(["fidelity", str(REAL), "--out", str(out), "--set", "run.tokens=7680",
                     "--set", "arm.ddp.algorithm.name=diloco"])
    assert code == 0
    result = json.loads((out / "fidelity.json").read_text())
    for arm in result["arms"].values():
        assert arm["final_loss"]["predicted"] == pytest.approx(arm["final_loss"]["measured"], rel=1e-3)
        assert arm["bytes_sent"]["measured"] > arm["bytes_sent"]["predicted"] > 0  # libp2p framing on top
    html = (out / "fidelity.html").read_text()
    assert html.count("data:image/png;base64,") == 1
    assert (out / "sim" / "metrics.jsonl").exists() and (out / "real" / "metrics.jsonl").exists()
