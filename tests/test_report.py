"""The report of a real (small) run directory: files, self-containment, escaping, rebuilds, a browser."""

from __future__ import annotations

import base64
import io
import math
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from matplotlib.colors import to_hex
from PIL import Image

from bitwidth.criteria import make_criterion
from bitwidth.report import write_report
from bitwidth.report.document import Document, Figure, Section, Table, Text
from bitwidth.report.html import render_html
from bitwidth.report.markdown import render_markdown
from bitwidth.report.plots import VERDICT_COLORS, min_bits_scatter, pareto_plot, sensitivity_heatmap, training_curves
from bitwidth.report.run_files import load_run
from bitwidth.report.tables import (
    correlation_table,
    curves_table,
    joint_plan_table,
    pareto_table,
    sensitivity_table,
)
from bitwidth.result import SearchResult, failure_reason, read_csv, reason_causes
from bitwidth.runner import run_search
from bitwidth.stats import record
from bitwidth.tasks import make_task
from bitwidth.trial import TrialOptions, TrialOutcome, train_baseline
from bitwidth.wrap import QuantSpec

OPTIONS = TrialOptions(epochs=2)  # a short baseline still separates 2 bits from 4
IMG = re.compile(r"<img\b[^>]*\bsrc=\"([^\"]*)\"")


def _record_stats(task, run_dir: Path, options: TrialOptions) -> None:
    """What ``bitwidth run`` records from the fp32 baseline: stats.pt and stats.csv."""
    base = train_baseline(task, options, cache_dir=run_dir)
    model = task.build_model(options.seed)
    model.load_state_dict(base.state_dict)
    with record(model, kinds=("weight", "activation")) as rec:
        for x, _ in task.calib_batches(2):
            model(x)
    rec.save(run_dir / "stats.pt")
    rec.to_frame().to_csv(run_dir / "stats.csv", index=False)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A post-training grid search of two digits_mlp layers with statistics, and its report."""
    d = tmp_path_factory.mktemp("run")
    task = make_task("digits_mlp")
    run_search(task, mode="ptq", layers=["fc1", "fc2"], candidates=(2, 4, 8), strategy="grid",
               criterion=make_criterion("accuracy", max_drop=0.02), trial_options=OPTIONS, run_dir=d)
    _record_stats(task, d, OPTIONS)
    (d / "meta.yaml").write_text(yaml.safe_dump({"bitwidth": "0.1.0", "torch": str(torch.__version__),
                                                 "device": "cpu", "wall_time_s": 1.5}))
    write_report(d)
    return d


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory) -> Path:
    """A training-mode search of one layer's weight and gradient, one epoch per trial."""
    d = tmp_path_factory.mktemp("train")
    run_search("digits_mlp", mode="train", layers=["fc2"], kinds=("weight", "gradient"), family="int",
               candidates=(2, 8), strategy="grid", trial_options=TrialOptions(epochs=1), run_dir=d)
    write_report(d)
    return d


def test_report_files_exist_and_tables_are_kept(run_dir):
    for name in ("report.html", "report.md", "trials.csv", "min_bits.csv", "stats.csv"):
        assert (run_dir / name).stat().st_size > 0, name
    plots = sorted(p.stem for p in (run_dir / "plots").glob("*.png"))
    assert {"sensitivity", "pareto", "min_bits_vs_stats", "stats_log2_hist"} <= set(plots)
    md = (run_dir / "report.md").read_text()
    for title in ("Minimum bits per layer", "The joint plan", "Sensitivity", "Distributions",
                  "Do bit needs follow the distributions?", "Cost against accuracy", "Run metadata"):
        assert title in md
    assert md.index("Minimum bits per layer") < md.index("Sensitivity") < md.index("Cost against accuracy")
    for p in plots:
        assert f"](plots/{p}.png)" in md


def test_html_is_self_contained_and_every_image_is_a_png(run_dir):
    page = (run_dir / "report.html").read_text()
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page and "<link" not in page
    sources = IMG.findall(page)
    assert len(sources) == len(list((run_dir / "plots").glob("*.png")))
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        img.verify()
        assert img.format == "PNG" and img.size[0] > 100


def test_names_and_values_from_the_model_are_escaped():
    evil = "<script>alert(1)</script>"
    table = joint_plan_table({evil: QuantSpec(weight="int4")}, ("weight",))
    doc = Document(evil, evil, [Section(evil, "a", "answer", [
        Text(evil), Table(table, caption=evil), Table(pd.DataFrame({"v": [evil]}), index=False),
        Figure("x", b"\x89PNG", caption=evil, alt=evil)])])
    page = render_html(doc)
    assert "<script" not in page
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 6
    md = render_markdown(doc)
    assert "<script" not in md and "&lt;script&gt;" in md


def test_rebuilding_gives_identical_tables_and_files(run_dir):
    before = {p.name: p.read_bytes() for p in [*run_dir.glob("*.csv"), *run_dir.glob("report.*"),
                                                *(run_dir / "plots").glob("*.png")]}
    write_report(run_dir)
    after = {p.name: p.read_bytes() for p in [*run_dir.glob("*.csv"), *run_dir.glob("report.*"),
                                               *(run_dir / "plots").glob("*.png")]}
    assert after.keys() == before.keys()
    assert [n for n in before if before[n] != after[n]] == []
    one, two = load_run(run_dir), load_run(run_dir)
    pd.testing.assert_frame_equal(sensitivity_table(one.result.trials), sensitivity_table(two.result.trials))
    pd.testing.assert_frame_equal(
        pareto_table(one.result.trials, one.records, one.summary, one.result.costs, one.result.joint_plan),
        pareto_table(two.result.trials, two.records, two.summary, two.result.costs, two.result.joint_plan))


def test_answer_and_claim_come_from_the_run(run_dir):
    run = load_run(run_dir)
    md = (run_dir / "report.md").read_text()
    for layer in ("fc1", "fc2"):
        assert f"| {layer} |" in md
    points = pareto_table(run.result.trials, run.records, run.summary, run.result.costs, run.result.joint_plan)
    assert {"fp32", "isolated", "uniform", "joint"} <= set(points["group"])
    (joint,) = points[points["group"] == "joint"].itertuples()
    assert joint.memory_bits_vs_fp32 == pytest.approx(run.result.costs.loc["joint", "memory_bits_vs_fp32"])
    assert joint.metric == pytest.approx(run.summary["joint"]["metric"])
    sens = sensitivity_table(run.result.trials, ["fc1", "fc2"])
    assert len(sens) == 2 * 2 * 3 and list(dict.fromkeys(sens["layer"])) == ["fc1", "fc2"]
    assert "Spearman" in md and "(layer, kind) pairs" in md


def test_missing_statistics_give_a_note_not_an_error(run_dir, tmp_path):
    for name in ("trials.csv", "min_bits.csv", "costs.csv", "joint_plan.yaml", "summary.yaml", "trials.jsonl"):
        shutil.copy(run_dir / name, tmp_path / name)
    paths = write_report(tmp_path)
    md = paths["markdown"].read_text()
    assert "No stats.pt in this run directory" in md and "plots/sensitivity" in paths


def test_statistics_alone_give_a_distribution_report(run_dir, tmp_path):
    shutil.copy(run_dir / "stats.pt", tmp_path / "stats.pt")
    paths = write_report(tmp_path)
    titles = re.findall(r"^## (.*)$", paths["markdown"].read_text(), flags=re.M)
    assert titles == ["Why: Distributions", "Why: Distribution statistics", "How: Run metadata"]
    assert "plots/stats_log2_hist" in paths


def test_training_mode_report_has_curves(train_dir):
    run = load_run(train_dir)
    curves = curves_table(run.result.trials, run.records)
    assert set(curves["group"]) >= {"fc2.weight", "fc2.gradient", "uniform"}
    assert (curves["epoch"] == 1).all()
    assert (train_dir / "plots" / "training_loss.png").exists()
    assert "Training curves" in (train_dir / "report.md").read_text()


def test_plots_take_frames_and_handle_edge_cases():
    curves = pd.DataFrame({"group": ["uniform"] * 3 + ["fc1.weight"] * 2, "bits": [2, 2, 8, 2, 8],
                           "seed": [0] * 5, "epoch": [1, 2, 1, 1, 1], "loss": [2.0, 9.0, 1.0, 2.5, 1.1],
                           "val_accuracy": [0.2, 0.1, 0.9, 0.3, 0.9], "diverged": [True, True, False, False, False]})
    fig = training_curves(curves, baseline=[1.2, 0.8])
    assert [ax.get_title() for ax in fig.axes] == ["uniform", "fc1.weight"]
    flat = pd.DataFrame({"layer": ["a", "b", "c"], "kind": ["weight"] * 3, "min_bits": [4, 4, 4],
                         "kurtosis": [0.0, 1.0, 2.0]})
    assert "undefined" in min_bits_scatter(flat, ["kurtosis"]).axes[0].get_title()
    assert correlation_table(flat)["rho"].isna().all()
    none_passed = flat.assign(min_bits=pd.array([2, None, 8], dtype="Int64"))
    assert correlation_table(none_passed, (2, 4, 8))["rho"].iloc[0] == pytest.approx(0.5)
    empty = pd.DataFrame(columns=["layer", "kind", "bits", "metric", "passed"])
    assert len(sensitivity_heatmap(empty).axes) == 1
    assert len(pareto_plot(pd.DataFrame(columns=["group", "metric"])).axes) == 1


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium binary on PATH (Debian: apt-get install chromium)")
    # A copy with a probe that writes each image's decoded width into the DOM once loaded.
    probe = ("<script>window.addEventListener('load', () => { for (const i of document.images) "
             "i.setAttribute('data-natural-width', i.naturalWidth); });</script></body>")
    page = tmp_path / "probe.html"
    page.write_text((run_dir / "report.html").read_text().replace("</body>", probe))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=5000"]
    dom = subprocess.run([browser, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    widths = [int(w) for w in re.findall(r'data-natural-width="(\d+)"', dom)]
    assert len(widths) == len(IMG.findall((run_dir / "report.html").read_text())) > 0
    assert min(widths) > 0
    assert dom.count("<table") >= 5
    shot = run_dir / "screenshot.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1280,4000",
                    (run_dir / "report.html").as_uri()], capture_output=True, timeout=60, check=True)
    img = Image.open(shot)
    assert img.size == (1280, 4000)
    assert len(img.convert("L").resize((64, 200)).getcolors(4096)) > 10  # not a blank page


def test_trials_csv_carries_losses_and_why_each_plan_failed(train_dir, tmp_path):
    trials = read_csv(train_dir / "trials.csv")
    assert {"loss", "train_loss", "reason"} <= set(trials.columns)
    assert trials[["loss", "train_loss"]].notna().all().all()
    assert trials["reason"].notna().tolist() == (~trials["passed"]).tolist()
    for reason in trials["reason"].dropna():
        assert set(reason_causes(reason)) <= {"accuracy", "train loss", "diverged", "error"}, reason
    # A run directory written before trials.csv kept them gets the same reasons when loaded.
    for name in ("min_bits.csv", "costs.csv", "joint_plan.yaml", "summary.yaml", "trials.jsonl", "baseline.pt"):
        shutil.copy(train_dir / name, tmp_path / name)
    trials.drop(columns=["loss", "train_loss", "accuracy", "reason"]).to_csv(tmp_path / "trials.csv", index=False)
    again = SearchResult.load(tmp_path).trials
    assert again["reason"].fillna("").tolist() == trials["reason"].fillna("").tolist()


@pytest.mark.parametrize("accuracy", [0.90, 0.93, 0.95, 0.99])
@pytest.mark.parametrize("train_loss", [0.5, 0.755, 0.765, 2.0])
def test_failure_reason_names_what_the_criterion_failed_on(accuracy, train_loss):
    crit = make_criterion("converge", max_drop=0.02, loss_tol=0.5)  # train loss at most 0.5 * 1.5 + 0.01
    outcome = TrialOutcome({"accuracy": accuracy, "loss": 0.3, "train_loss": train_loss}, loss_curve=[train_loss])
    passed = crit.passes(outcome, {"accuracy": 0.95}, [0.5])
    reason = failure_reason({"metric": accuracy, "train_loss": train_loss}, crit.to_dict(), 0.95, 0.5)
    want = [c for c, bad in (("accuracy", accuracy < 0.93), ("train loss", train_loss > 0.76)) if bad]
    assert passed == (not want)
    if want:
        assert reason_causes(reason) == want
    assert failure_reason({"metric": accuracy, "diverged": True}, crit.to_dict(), 0.95, 0.5) == "diverged"
    assert failure_reason({"metric": math.nan, "error": "OOM"}, crit.to_dict(), 0.95) == "error: OOM"
    loss_crit = make_criterion("loss", max_rise=0.1).to_dict()
    assert failure_reason({"metric": 2.5}, loss_crit, 2.0) == "loss 2.5 > 2.2"


def test_training_heatmap_colours_by_verdict_and_names_the_cause():
    sens = pd.DataFrame({"layer": ["fc1", "fc1", "fc1"], "kind": ["weight"] * 3, "bits": [2, 4, 8],
                         "metric": [0.97, 0.80, 0.97], "passed": [False, False, True],
                         "reason": ["train loss 1.9 > 1.5 (1.5x fp32)", "accuracy 80.0% < 95.0%", None]})
    ax = sensitivity_heatmap(sens, baseline=0.97, threshold=0.95, by_verdict=True).axes[0]
    cells = [p for p in ax.patches if p.get_fill() and p.get_width() == 1]
    assert [to_hex(p.get_facecolor()) for p in cells] == [VERDICT_COLORS[False], VERDICT_COLORS[False],
                                                          VERDICT_COLORS[True]]
    assert [t.get_text() for t in ax.texts] == ["97.0%\ntrain loss", "80.0%\naccuracy", "97.0%"]
    # Post-training: coloured by the metric against the threshold, as before.
    ptq = sensitivity_heatmap(sens.drop(columns="reason"), baseline=0.97, threshold=0.95)
    first = next(p for p in ptq.axes[0].patches if p.get_fill())
    assert to_hex(first.get_facecolor()) != VERDICT_COLORS[False]
    assert [t.get_text() for t in ptq.axes[1].get_yticklabels()] == ["80.0%", "95.0%", "97.0%"]


def test_training_report_explains_failing_cells(train_dir):
    md = (train_dir / "report.md").read_text()
    assert "green cells pass the criterion, red ones fail it" in md
    trials = read_csv(train_dir / "trials.csv")
    if (~trials.loc[trials["strategy"] == "grid", "passed"]).any():
        assert "Why each failing cell failed" in md


def test_fractions_are_shown_as_percentages(run_dir):
    md = (run_dir / "report.md").read_text()
    answer = md[:md.index("## Why")]
    assert not re.search(r"\d\.\d{3,}", answer), re.findall(r".{30}\d\.\d{3,}.{10}", answer)
    run = load_run(run_dir)
    assert f"accuracy: {run.summary['joint']['metric']:.1%}**" in answer
    assert f"vs fp32 ({run.summary['baseline']['metric']:.1%})" in answer
