"""A comparison of variants reads and writes only directly inside its run directory."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from bitwidth.report.compare import read_variants, variant_dir, write_comparison, write_variant_reports
from bitwidth.result import SearchResult
from bitwidth.wrap import QuantSpec

ABSOLUTE = "<absolute path of victim/>"
BAD_NAMES = ["../victim", ABSOLUTE, "..", ".", "", "a/b", "a\\b", "C:victim", "nested/../..", 3, None]


def _variant(d: Path) -> None:
    """A finished (synthetic) search result in ``d``."""
    trials = pd.DataFrame({"strategy": ["grid", "grid"], "round": [0, 0], "layer": ["fc1", "fc1"],
                           "kind": ["weight", "weight"], "bits": pd.array([2, 4], "Int64"),
                           "plan": ["fc1 w=int2", "fc1 w=int4"], "passed": [False, True], "metric": [0.4, 0.9],
                           "reused": [False, False]})
    min_bits = pd.DataFrame({"layer": ["fc1"], "kind": ["weight"], "min_bits": pd.array([4], "Int64"),
                             "metric_at_min": [0.9], "evaluations": [2], "monotone": [True]})
    summary = {"joint": {"passed": True, "metric": 0.9}, "uniform": {"bits": 4, "passed": True, "metric": 0.9},
               "baseline": {"metric_name": "accuracy", "metric": 0.9166666666666666},
               "config": {"mode": "ptq", "layers": ["fc1"], "kinds": ["weight"], "family": "int",
                          "candidates": [2, 4], "strategy": "grid",
                          "criterion": {"name": "accuracy", "max_drop": 0.05, "relative": False,
                                        "metric": "accuracy"}}}
    SearchResult(trials, min_bits, {"fc1": QuantSpec(weight="int4")}, pd.DataFrame(), summary).save(d)


@pytest.fixture
def study(tmp_path) -> tuple[Path, Path]:
    """``study/`` with two valid variants, and ``victim/`` beside it that holds a run of its own."""
    run_dir, victim = tmp_path / "study", tmp_path / "victim"
    for d in (run_dir / "nearest", run_dir / "stochastic", victim):
        _variant(d)
    (victim / "report.html").write_text("the victim's own report")
    return run_dir, victim


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("bad", BAD_NAMES, ids=repr)
def test_bad_names_in_variants_yaml_are_refused_before_anything_is_written(study, bad):
    run_dir, victim = study
    bad = str(victim.resolve()) if bad == ABSOLUTE else bad
    (run_dir / "variants.yaml").write_text(yaml.safe_dump(["nearest", bad]))
    before = _files(run_dir.parent)
    with pytest.raises(ValueError, match=r"entry .*plain directory name directly inside") as err:
        write_variant_reports(run_dir)
    assert repr(bad) in str(err.value)
    with pytest.raises(ValueError, match="plain directory name"):
        write_comparison(run_dir, ["nearest", bad])
    assert _files(run_dir.parent) == before  # not even the valid variant's report was written
    assert (victim / "report.html").read_text() == "the victim's own report"


def test_a_link_out_of_the_run_directory_is_refused(study):
    run_dir, victim = study
    (run_dir / "elsewhere").symlink_to(victim, target_is_directory=True)
    with pytest.raises(ValueError, match="link that leads out of"):
        variant_dir(run_dir, "elsewhere")
    with pytest.raises(ValueError, match="'elsewhere'"):
        write_comparison(run_dir, ["nearest", "elsewhere"])
    assert (victim / "report.html").read_text() == "the victim's own report"


def test_variants_yaml_must_be_a_list_of_names(study):
    run_dir, _ = study
    (run_dir / "variants.yaml").write_text("nearest: 1\n")
    with pytest.raises(ValueError, match="list of variant names"):
        read_variants(run_dir)


def test_good_variants_are_reported_and_compared_inside_the_run_directory(study):
    run_dir, victim = study
    (run_dir / "variants.yaml").write_text(yaml.safe_dump(["nearest", "stochastic"]))
    victim_before = _files(victim)
    paths = write_variant_reports(run_dir)
    assert all(p.resolve().is_relative_to(run_dir.resolve()) for p in paths.values())
    for name in ("nearest", "stochastic"):
        assert (run_dir / name / "report.html").exists()
    assert _files(victim) == victim_before
    page = paths["html"].read_text()
    assert 'href="nearest/report.html"' in page
    assert "91.7%" in page and "0.9166" not in page  # metrics in percent, as in the run reports
