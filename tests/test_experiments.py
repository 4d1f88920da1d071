"""Smoke tests of ``experiments/``: each claim script's ``--quick`` mode, its result files and one sanity property.

The scripts run in this process (one shared, temporary run cache, so the searches the
claim scripts share run once) and write into a temporary directory, never over the
committed results. The shipped predictor calibration is checked against the committed
result file it was copied from.
"""

from __future__ import annotations

import doctest
import importlib
import json
import re
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import bitwidth as bw
from bitwidth import predict

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
# Quick modes search digits_mlp only; the predictor's adds mnist1d_mlp, a second model to hold out.
SCRIPTS = ("per_layer_minima", "minima_vs_distributions", "kinds", "drift", "rounding", "predictor")


def _run_quick(names: tuple[str, ...], out: Path, runs: Path) -> dict[str, Path]:
    sys.path.insert(0, str(EXPERIMENTS))
    threads = torch.get_num_threads()
    try:
        return {name: importlib.import_module(name).main(["--quick", "--out", str(out), "--runs", str(runs)])
                for name in names}
    finally:
        torch.set_num_threads(threads)
        sys.path.remove(str(EXPERIMENTS))


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Run every script's ``--quick`` mode once, sharing one run cache; returns the result file of each."""
    return _run_quick(SCRIPTS, tmp_path_factory.mktemp("results"), tmp_path_factory.mktemp("runs"))


def _table(text: str, header_start: str) -> list[list[str]]:
    """The rows of the first pipe table whose header starts with ``header_start``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header_start}"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split(" | ")])
    return rows


@pytest.mark.parametrize("name", SCRIPTS)
def test_each_script_writes_its_result_file_and_figure(quick: dict[str, Path], name: str) -> None:
    text = quick[name].read_text()
    assert quick[name].name == f"{name}.md"
    assert text.startswith("# ") and "## Answer" in text and "wall time" in text and '"seeds": [0, 1]' in text
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", text)
    assert figures and all((quick[name].parent / f).stat().st_size > 1000 for f in figures)


def test_minima_are_candidates_or_none(quick: dict[str, Path]) -> None:
    text = quick["per_layer_minima"].read_text()
    rows = _table(text.split("### digits_mlp · ptq")[1], "layer")
    assert {r[1] for r in rows} == {"weight", "activation"}
    assert all(b in {"2", "4", "8", "–"} for r in rows for b in r[2].split())


def test_correlations_are_correlations(quick: dict[str, Path]) -> None:
    rows = _table(quick["minima_vs_distributions"].read_text(), "scope")
    rhos = [float(r[3]) for r in rows if r[3] not in ("—", "–")]
    assert rhos and all(-1 <= r <= 1 for r in rhos)


def test_predictor_quick_calibrates_every_family_and_kind(quick: dict[str, Path]) -> None:
    result = quick["predictor"]
    calib = json.loads((result.parent / "predictor_calibration.json").read_text())
    assert set(calib["linear_dynamic_range"]["fixed"]) == {"weight", "activation", "gradient"}
    assert set(calib["thresholds_db"]["int"]) == {"weight", "activation"}
    assert set(calib["thresholds_db"]["fixed"]) == {"weight", "activation", "gradient"}
    for v in calib["validation"].values():
        assert 0 <= v["exact"] <= v["within1"] <= 1 and 0 <= v["median_exact"] <= v["median_within1"] <= 1


def test_stochastic_rounding_needs_no_more_fraction_bits_than_nearest(quick: dict[str, Path]) -> None:
    rows = _table(quick["rounding"].read_text(), "seed")
    big = 99  # "<NA>": never converged on the grid
    nearest = sorted(int(r[1]) if r[1].isdigit() else big for r in rows)
    stochastic = sorted(int(r[2]) if r[2].isdigit() else big for r in rows)
    assert stochastic[len(stochastic) // 2] <= nearest[len(nearest) // 2]


def test_shipped_calibration_is_the_committed_result() -> None:
    path = EXPERIMENTS / "results" / "predictor_calibration.json"
    if not path.exists():
        pytest.skip("no committed calibration yet")
    calib = json.loads(path.read_text())
    shipped = {(f, k): t for f, kinds in calib["thresholds_db"].items() for k, t in kinds.items()}
    assert predict.CALIBRATION == shipped
    assert predict.MEDIAN_BITS == {(f, k): b for f, kinds in calib["median_bits"].items() for k, b in kinds.items()}
    assert predict.VALIDATION == calib["validation"]
    assert predict.LINEAR == {(f, k): tuple(line) for f, kinds in calib["linear_dynamic_range"].items()
                              for k, line in kinds.items()}


def test_predict_min_bits_uses_the_calibration_unless_told_otherwise() -> None:
    from bitwidth.histogram import histogram_stats

    _ = torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 8))
    with bw.record(model, kinds=("weight", "activation")) as rec:
        model(torch.randn(32, 64) * torch.logspace(-3, 0, 64))  # activations spanning octaves
    pred = bw.predict_min_bits(rec, "int", range(2, 17))
    assert list(pred["threshold_db"]) == [predict.threshold_db("int", k) for k in pred["kind"]]
    assert str(pred["min_bits"].dtype) == "Int64"
    old = bw.predict_min_bits(rec, "int", range(2, 17), sqnr_db=30.0)
    assert (old["threshold_db"] == 30.0).all()
    ranges = {(r.layer, r.kind): r.dynamic_range for r in histogram_stats(rec.hist_frame()).itertuples()}
    for p in pred.itertuples():  # the default: the line on dynamic range, rounded to a candidate
        a, b = predict.LINEAR[("int", p.kind)]
        expected = predict.nearest_candidate(a + b * ranges[(p.layer, p.kind)], range(2, 17))
        assert (17 if pd.isna(p.min_bits) else int(p.min_bits)) == expected
    # A wider range predicts at least as many bits (both slopes are positive).
    assert all(line[1] > 0 for line in predict.LINEAR.values())


def test_drift_covers_every_kind_at_the_first_and_end_checkpoints(quick: dict[str, Path]) -> None:
    text = quick["drift"].read_text().split("## Minimum per checkpoint")[1]
    header = next(line for line in text.splitlines() if line.startswith("| model"))
    assert "bits first" in header and "bits end" in header
    rows = _table(text, "model")
    assert {r[2] for r in rows} == {"weight", "activation", "gradient"}
    cols = [c.strip() for c in header.strip("|").split(" | ")]
    first, end, delta = cols.index("bits first"), cols.index("bits end"), cols.index("Δ bits")
    for r in rows:  # the change is end minus first; medians of two seeds' candidates (or 9: none passed)
        assert float(r[delta]) == float(r[end]) - float(r[first])
        assert all(2 <= float(r[c]) <= 9 for c in (first, end))


@pytest.mark.parametrize("module", ["common", "inference", "drift"])
def test_experiment_helpers_doctests(module: str) -> None:
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        result = doctest.testmod(importlib.import_module(module))
    finally:
        sys.path.remove(str(EXPERIMENTS))
    assert result.failed == 0 and result.attempted > 0


def test_predict_from_sweep_keeps_chosen_widths_after_a_midpoint_stream() -> None:
    # Stream "a" has no chosen width (midpoint path); stream "b" after it keeps its chosen 8 bits.
    sw = pd.DataFrame({"layer": ["a"] * 3 + ["b"] * 3, "kind": ["weight"] * 6, "bits": [2, 4, 8] * 2,
                       "format": ["int2", "int4", "int8"] * 2, "sqnr_db": [3.0, 14.0, 38.0] * 2})
    out = predict.predict_from_sweep(sw, "int", {"weight": 12.0}, {"weight": 4}, {("b", "weight"): 8})
    assert out["min_bits"].tolist() == [4, 8]
