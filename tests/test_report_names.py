"""Layer and site names survive the run's CSV files and the report, whatever they look like."""

from __future__ import annotations

import io
import re
import shutil
from collections import OrderedDict
from pathlib import Path

import pandas as pd
import pytest
from test_report import _record_stats
from torch import nn

from bitwidth.criteria import make_criterion
from bitwidth.report import write_report
from bitwidth.report.run_files import load_run
from bitwidth.result import SearchResult, read_csv
from bitwidth.runner import run_search
from bitwidth.tasks import Task
from bitwidth.tasks.digits import digits_datasets
from bitwidth.trial import TrialOptions
from bitwidth.wrap import QuantSpec

# Module names pandas would read back as an int, a float, a missing value or a boolean.
LINEARS = ("0", "007", "True", "nan")
LAYERS = ("0", "1.0", "007", "True", "nan")  # "1.0": a Linear inside a nested Sequential named "1"
OPTIONS = TrialOptions(epochs=1)


def _awkward_model() -> nn.Module:
    return nn.Sequential(OrderedDict([
        ("flat", nn.Flatten()), ("0", nn.Linear(64, 16)), ("1", nn.Sequential(nn.Linear(16, 16))),
        ("007", nn.Linear(16, 16)), ("relu", nn.ReLU()), ("True", nn.Linear(16, 16)), ("nan", nn.Linear(16, 10)),
    ]))


@pytest.fixture(scope="module")
def awkward_run(tmp_path_factory) -> Path:
    """A real search of a user's nn.Sequential whose layer names look like numbers and flags."""
    d = tmp_path_factory.mktemp("awkward")
    train, val = digits_datasets()
    task = Task("awkward-names", _awkward_model, train, val, batch_size=64)
    run_search(task, mode="ptq", layers=list(LAYERS), kinds=("weight",), candidates=(2, 8), strategy="grid",
               criterion=make_criterion("accuracy", max_drop=0.05), trial_options=OPTIONS, run_dir=d)
    _record_stats(task, d, OPTIONS)
    return d


def test_read_csv_keeps_names_as_written():
    text = "layer,kind,min_bits\n0,weight,4\n1.0,weight,\n007,weight,8\nnan,weight,2\nTrue,weight,3\nNA,weight,4\n"
    frame = read_csv(io.StringIO(text))
    assert frame["layer"].tolist() == ["0", "1.0", "007", "nan", "True", "NA"]
    assert frame["min_bits"].isna().tolist() == [False, True, False, False, False, False]


def test_a_sequential_model_round_trips_and_reports(awkward_run):
    res = SearchResult.load(awkward_run)
    assert list(res.min_bits["layer"]) == list(LAYERS)
    assert set(res.trials.loc[res.trials["strategy"] == "grid", "layer"]) == set(LAYERS)
    assert set(res.joint_plan) <= set(LAYERS)
    paths = write_report(awkward_run)
    md = paths["markdown"].read_text()
    for layer in LAYERS:
        assert f"| {layer} |" in md
    run = load_run(awkward_run)
    assert set(run.stats["layer"]) >= set(LAYERS)


def test_statistics_from_stats_csv_merge_with_the_minimum_bits(awkward_run, tmp_path):
    """Without stats.pt the report reads stats.csv: its names must match min_bits.csv's."""
    for name in ("trials.csv", "min_bits.csv", "costs.csv", "joint_plan.yaml", "summary.yaml", "stats.csv"):
        shutil.copy(awkward_run / name, tmp_path / name)
    run = load_run(tmp_path)
    assert run.recorder is None and set(run.stats["layer"]) >= set(LAYERS)
    md = write_report(tmp_path)["markdown"].read_text()
    claim = md[md.index("Do bit needs follow the distributions?"):]
    for layer in LAYERS:
        assert f"| {layer} | weight |" in claim


def _synthetic_result(layers: list[str]) -> SearchResult:
    rows = [{"strategy": "grid", "round": 0, "layer": layer, "kind": "weight", "bits": b,
             "plan": f"{layer} w=int{b}", "passed": b >= 4, "metric": 0.5 + 0.05 * b, "reused": False}
            for layer in layers for b in (2, 4, 8)]
    rows.append({"strategy": "uniform", "round": 0, "layer": "*", "kind": "*", "bits": 4, "plan": "uniform",
                 "passed": True, "metric": 0.7, "reused": False})
    trials = pd.DataFrame(rows).astype({"bits": "Int64"})
    min_bits = pd.DataFrame({"layer": layers, "kind": "weight", "min_bits": pd.array([4] * len(layers), "Int64"),
                             "metric_at_min": 0.7, "evaluations": 3, "monotone": True})
    summary = {"joint": {"passed": True, "metric": 0.7, "steps": 0}, "uniform": {"bits": 4, "passed": True,
               "metric": 0.7}, "baseline": {"metric_name": "accuracy", "metric": 0.92},
               "config": {"mode": "ptq", "layers": layers, "kinds": ["weight"], "family": "int",
                          "candidates": [2, 4, 8], "strategy": "grid", "seeds": [0],
                          "criterion": {"name": "accuracy", "max_drop": 0.25, "relative": False,
                                        "metric": "accuracy"}}}
    return SearchResult(trials, min_bits, {layer: QuantSpec(weight="int4") for layer in layers}, pd.DataFrame(),
                        summary)


def test_site_names_with_colons_and_dots_survive(tmp_path):
    sites = ["transformer.h.0.attn:matmul.1", "blocks.0.attn:sdpa.q", "0", "nan"]
    _synthetic_result(sites).save(tmp_path)
    stats = pd.DataFrame({"layer": sites, "kind": "weight", "absmax": [1.0, 2.0, 3.0, 4.0], "std": 0.5,
                          "kurtosis": [0.1, 0.2, 0.3, 0.4], "zero_frac": 0.0})
    stats.to_csv(tmp_path / "stats.csv", index=False)
    back = SearchResult.load(tmp_path)
    assert back.min_bits["layer"].tolist() == sites and set(back.joint_plan) == set(sites)
    md = write_report(tmp_path)["markdown"].read_text()
    for site in sites:
        assert md.count(f"| {site} |") >= 3, site  # minimum bits, joint plan, statistics
    assert not re.search(r"\| (transformer|blocks) \|", md)  # never cut at a dot or colon
