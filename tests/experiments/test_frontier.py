"""The feasibility frontier from a sweep's rows, and the sweep report as a browser shows it."""

import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from experiments.fields import ConfigError
from experiments.frontier import FrontierCriteria, frontier, margin

BW, LAT = "arm.!base.network.bandwidth", "arm.!base.network.latency"


def _rows(losses_by_latency: dict, base_loss=2.0, util=None):
    """Rows of a 4-bandwidth sweep: the baseline and arm 'a' at each point, with a's final loss as given."""
    rows, point = [], 0
    for latency, losses in losses_by_latency.items():
        for bandwidth, loss in zip((1e6, 1e7, 1e8, 1e9), losses):
            common = {"point": point, BW: bandwidth, LAT: latency, "time_to_target_s": None,
                      "compute_utilisation": util}
            rows += [{**common, "arm": "base", "algorithm": "ddp", "final_loss": base_loss},
                     {**common, "arm": "a", "algorithm": "diloco", "final_loss": loss}]
            point += 1
    return rows


def test_the_frontier_interpolates_the_margin_on_the_log_bandwidth_axis():
    criteria = FrontierCriteria(loss_tolerance=0.05)  # competitive: loss <= 2.1
    rows = _rows({"10ms": [2.6, 2.3, 2.05, 2.0], "100ms": [2.0, 2.0, 2.0, 2.0], "300ms": [3.0, 3.0, 3.0, 3.0],
                  "1s": [2.0, 2.5, 2.0, 2.0]})
    (at10, at100, at300, at1s) = frontier(rows, BW, LAT, "base", criteria)
    # Margins: at 1e7, 2.3/2.1 - 1 = 0.2/2.1; at 1e8, 2.05/2.1 - 1 = -0.05/2.1: the zero is 0.2/0.25 = 0.8 of a decade up.
    assert at10["below_bps"] == 1e7 and at10["above_bps"] == 1e8
    assert at10["frontier_bps"] == pytest.approx(10 ** 7.8, rel=1e-12)
    assert at100 == {**at100, "frontier_bps": 1e6, "below_bps": None, "above_bps": 1e6}  # competitive everywhere
    assert at300["frontier_bps"] is None and at300["above_bps"] is None  # never
    # Competitive at 1e6 but not at 1e7: only from 1e8 up is it competitive at every higher bandwidth.
    assert (at1s["below_bps"], at1s["above_bps"]) == (1e7, 1e8)
    assert at1s["frontier_bps"] == pytest.approx(10 ** (7 + (2.5 / 2.1 - 1) / (2.5 / 2.1 - 2.0 / 2.1)), rel=1e-12)
    assert [e["latency_s"] for e in (at10, at100, at300, at1s)] == [0.01, 0.1, 0.3, 1.0]


def test_every_criterion_set_must_hold_and_a_missing_figure_is_not_competitive():
    row = {"final_loss": 2.0, "time_to_target_s": 30.0, "compute_utilisation": 0.5}
    base = {"final_loss": 2.0, "time_to_target_s": 10.0}
    assert margin(row, base, FrontierCriteria(loss_tolerance=0.05)) == pytest.approx(2.0 / 2.1 - 1)
    assert margin(row, base, FrontierCriteria(loss_tolerance=0.05, time_factor=2.0)) == pytest.approx(0.5)
    assert margin(row, base, FrontierCriteria(utilisation=0.8)) == pytest.approx(0.6)
    assert margin({**row, "time_to_target_s": None}, base, FrontierCriteria(time_factor=2.0)) == math.inf
    with pytest.raises(ConfigError, match=r"^frontier.loss_tolerance: set at least one of"):
        FrontierCriteria.parse({})
    with pytest.raises(ConfigError, match=r"^frontier.time_factor: must be a number in \[1.0, 1000000.0\]"):
        FrontierCriteria.parse({"time_factor": 0.5})


SWEEP = '''
name = "report-test"
[model]
preset = "tiny"
[data]
corpus = "synthetic"
synthetic_bytes = 200_000
[run]
workers = 2
batch_size = 2
tokens = 4096
eval_interval = 1024
eval_batches = 2
target_loss = 5.0
runtime = "local"
[[arm]]
name = "base"
algorithm = "ddp"
network = "datacenter"
[[arm]]
name = "diloco"
algorithm = { name = "diloco", inner_steps = 4 }
network = "home-broadband"
[sweep]
"arm.!base.network.bandwidth" = { log = ["1Mbit", "1Gbit", 3] }
"arm.!base.network.latency" = ["1ms", "100ms"]
[frontier]
loss_tolerance = 0.05
time_factor = 2.0
'''


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_the_sweep_report_renders_in_a_browser_with_every_image_and_the_frontier_table(tmp_path):
    from experiments.sweep import sweep

    path = tmp_path / "sweep.toml"
    path.write_text(SWEEP)
    out = sweep(path, out=tmp_path / "sweep", progress=False)
    page = (out / "report.html").read_text()
    assert not re.findall(r'src="(?!data:image/png;base64,)', page), "every image is embedded"
    assert 'id="frontier-table"' in page and page.count("<tr><td>diloco</td>") == 2
    # In the browser: every image decoded (naturalWidth > 0), the table there; the page says so in its title.
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", """<script>
      const imgs = [...document.images];
      document.title = `images=${imgs.length} decoded=${imgs.filter(i => i.complete && i.naturalWidth > 0).length}`
        + ` table=${document.querySelectorAll('#frontier-table tr').length}`;
    </script></body>"""))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(["chromium", *flags, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    title = re.search(r"<title>(.*?)</title>", dom).group(1)
    n_images = page.count("<img ")
    assert n_images >= 4 and title == f"images={n_images} decoded={n_images} table=3", title
    shot = tmp_path / "report.png"
    subprocess.run(["chromium", *flags, f"--screenshot={shot}", "--window-size=1200,2400", (out / "report.html").as_uri()],
                   capture_output=True, timeout=120)
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[:2] == (2400, 1200) and pixels.std() > 0.05  # a page with content, not a blank one
