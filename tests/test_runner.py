"""The whole search loop on real tasks: digits, reduced to a few layers and candidates."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import bitwidth.trial as trial_module
from bitwidth.criteria import make_criterion
from bitwidth.formats import FixedFormat
from bitwidth.runner import STORE_FILE, run_search
from bitwidth.search import SearchResult
from bitwidth.tasks import Task, make_task
from bitwidth.trial import BASELINE_FILE, TrialOptions, train_baseline

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = TrialOptions(epochs=3)  # a short baseline is enough to show per-layer differences
CONFIG = dict(mode="ptq", layers=["fc1", "fc2"], kinds=("weight", "activation"), candidates=(2, 3, 4, 6, 8),
              criterion=make_criterion("accuracy", max_drop=0.01), trial_options=OPTIONS)


@pytest.fixture(scope="module")
def mlp():
    return make_task("digits_mlp")


@pytest.fixture(scope="module")
def baseline_file(mlp, tmp_path_factory):
    """One trained digits_mlp baseline, copied into every run directory (training is the slow part)."""
    cache = tmp_path_factory.mktemp("baseline")
    train_baseline(mlp, OPTIONS, cache_dir=cache)
    return cache / BASELINE_FILE


def run_dir(base: Path, parent: Path, name: str) -> Path:
    d = parent / name
    d.mkdir()
    shutil.copy(base, d / BASELINE_FILE)
    return d


@pytest.fixture(scope="module")
def searched(mlp, baseline_file, tmp_path_factory):
    """The reduced digits search by grid and by bisect, each into its own run directory."""
    parent = tmp_path_factory.mktemp("runs")
    out = {}
    for strategy in ("grid", "bisect"):
        d = run_dir(baseline_file, parent, strategy)
        out[strategy] = (d, run_search(mlp, **CONFIG, strategy=strategy, run_dir=d))
    return out


def stored_keys(directory: Path) -> list[str]:
    return [json.loads(line)["key"] for line in (directory / STORE_FILE).read_text().splitlines()]


def test_bisect_finds_grid_minima_on_digits_with_fewer_evaluations(mlp, searched):
    (grid_dir, by_grid), (_, by_bisect) = searched["grid"], searched["bisect"]
    assert by_grid.min_bits["monotone"].all()
    cols = ["layer", "kind", "min_bits", "metric_at_min"]
    pd.testing.assert_frame_equal(by_grid.min_bits[cols], by_bisect.min_bits[cols])
    assert by_bisect.min_bits["evaluations"].sum() < by_grid.min_bits["evaluations"].sum()
    assert (by_bisect.min_bits["evaluations"] <= math.ceil(math.log2(5)) + 1).all()
    assert by_bisect.joint_passed and by_bisect.uniform_bits is not None
    costs = by_bisect.costs
    assert (costs.loc[["joint", "uniform"], ["memory_bits", "bops"]] < costs.loc["fp32", ["memory_bits", "bops"]]).all(
        axis=None)
    assert costs.loc["joint", "bops_vs_uniform"] == costs.loc["joint", "bops"] / costs.loc["uniform", "bops"]

    # Bisect over grid's run directory: everything is reused, and monotone is now known.
    events = []
    again = run_search(mlp, **CONFIG, strategy="bisect", run_dir=grid_dir, progress=events.append)
    assert again.summary["counts"]["trials_run"] == 0
    assert again.trials["reused"].all()
    assert again.min_bits["monotone"].tolist() == by_grid.min_bits["monotone"].tolist()
    pd.testing.assert_frame_equal(again.min_bits[cols], by_bisect.min_bits[cols])
    assert [e.phase for e in events][:2] == ["baseline", "bisect"] and events[-1].phase == "done"

    loaded = SearchResult.load(grid_dir)
    assert loaded.joint_plan == again.joint_plan
    assert loaded.summary["config"]["strategy"] == "bisect"


RESUME_SCRIPT = """
import sys, time
import bitwidth.trial as trial
from bitwidth.criteria import make_criterion
from bitwidth.runner import run_search
from bitwidth.trial import TrialOptions

real = trial.run_trial
def slow(*args, **kwargs):
    time.sleep(0.25)  # time for the parent to kill us between trials
    return real(*args, **kwargs)
trial.run_trial = slow
run_search("digits_mlp", mode="ptq", layers=["fc1", "fc2"], kinds=("weight", "activation"),
           candidates=(2, 3, 4, 6, 8), criterion=make_criterion("accuracy", max_drop=0.01),
           trial_options=TrialOptions(epochs=3), strategy="bisect", run_dir=sys.argv[1])
"""


def test_resume_after_sigkill_redoes_no_stored_trial(mlp, baseline_file, searched, tmp_path):
    d = run_dir(baseline_file, tmp_path, "killed")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(RESUME_SCRIPT), str(d)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    store = d / STORE_FILE
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if store.exists() and len(store.read_bytes().splitlines()) >= 5:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the search ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    data = store.read_bytes()
    # A line cut short by the kill is a trial in flight: the store drops it.
    before = {json.loads(line)["key"] for line in data[: data.rfind(b"\n") + 1].splitlines()}
    assert len(before) >= 5

    resumed = run_search(mlp, **CONFIG, strategy="bisect", run_dir=d)
    keys = stored_keys(d)
    assert len(keys) == len(set(keys)), "a stored trial was run again"
    assert resumed.summary["counts"]["trials_run"] == len(set(keys) - before)
    assert resumed.summary["counts"]["trials_reused"] >= len(before)
    reference = searched["bisect"][1]
    pd.testing.assert_frame_equal(resumed.min_bits, reference.min_bits)
    assert resumed.joint_plan == reference.joint_plan
    assert resumed.trials["metric"].tolist() == reference.trials["metric"].tolist()


def test_trial_errors_are_failed_verdicts_and_config_changes_rerun(mlp, baseline_file, tmp_path, monkeypatch):
    real = trial_module.run_trial

    def flaky(task, plan, options, baseline, **kwargs):
        if any(spec.weight is not None and spec.weight.bits == 2 for spec in plan.values()):
            raise RuntimeError("simulated crash")
        return real(task, plan, options, baseline, **kwargs)

    monkeypatch.setattr(trial_module, "run_trial", flaky)
    d = run_dir(baseline_file, tmp_path, "errors")
    config = {**CONFIG, "layers": "fc1", "kinds": ("weight",), "candidates": (2, 8)}
    res = run_search(mlp, **config, run_dir=d)
    crashed = res.trials[res.trials["bits"] == 2]
    assert len(crashed) and not crashed["passed"].any()
    assert crashed["error"].str.contains("simulated crash").all()
    assert res.min_bits_dict() == {("fc1", "weight"): 8}
    first = res.summary["counts"]["trials_run"]
    assert len(stored_keys(d)) == first

    same = run_search(mlp, **config, run_dir=d)
    assert same.summary["counts"]["trials_run"] == 0
    changed = run_search(mlp, **{**config, "trial_options": TrialOptions(epochs=3, calib_batches=2)}, run_dir=d)
    assert changed.summary["counts"]["trials_run"] == first  # nothing of the old config matches


def test_diverging_training_trial_is_a_failed_verdict(tmp_path):
    # Fraction bits of a 16-bit fixed-point gradient; with 0 of them stochastic rounding
    # turns tiny gradients into steps of 1 and training blows up at once.
    res = run_search("digits_mlp", mode="train", layers="fc2", kinds=("gradient",), family="fixed_frac",
                     family_options={"word": 16, "rounding": "stochastic"}, candidates=(0, 12),
                     trial_options=TrialOptions(epochs=2), run_dir=tmp_path)
    diverged = res.trials[res.trials["diverged"]]
    assert len(diverged) and not diverged["passed"].any()
    assert res.min_bits_dict() == {("fc2", "gradient"): 12}
    assert res.joint_passed
    assert res.joint_plan["fc2"].gradient == FixedFormat(16, 12, rounding="stochastic")
    assert res.costs.loc["joint", "train_bops"] < res.costs.loc["fp32", "train_bops"]


def test_fixed_family_places_the_binary_point_per_layer(mlp, baseline_file, tmp_path):
    d = run_dir(baseline_file, tmp_path, "fixed")
    res = run_search(mlp, **{**CONFIG, "layers": ["fc1", "fc3"], "candidates": (6, 12)}, family="fixed",
                     run_dir=d)
    fracs = {(layer, kind): getattr(spec, kind).frac for layer, spec in res.joint_plan.items()
             for kind in ("weight", "activation")}
    assert len(fracs) == 4 and len(set(fracs.values())) > 1
    # The input of fc1 is standardised pixels (|x| up to a few units): fewer fraction bits than fc3's weights.
    assert fracs[("fc1", "activation")] < fracs[("fc3", "weight")]


def toy_task() -> Task:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 8, generator=gen)
    y = (x @ torch.randn(8, 3, generator=gen)).argmax(1)
    data = TensorDataset(x, y)
    return Task("toy", lambda: nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3)), data, data)


def test_several_seeds_judge_the_mean_and_store_one_trial_per_seed(tmp_path):
    res = run_search(toy_task(), mode="ptq", kinds=("weight",), candidates=(2, 4, 8), seeds=(0, 1),
                     criterion=make_criterion("accuracy", max_drop=0.02), trial_options=TrialOptions(epochs=5),
                     run_dir=tmp_path)
    assert set(res.summary["baseline"]["per_seed"]) == {0, 1}
    records = [json.loads(line)["record"] for line in (tmp_path / STORE_FILE).read_text().splitlines()]
    assert {r["seed"] for r in records} == {0, 1}
    assert len(records) == 2 * res.summary["counts"]["trials_run"] // 2
    assert (res.trials["keys"].str.split().str.len() == 2).all()
    assert "metric_std" in res.trials


@pytest.mark.parametrize("bad, match", [
    ({"mode": "qat"}, "mode: must be 'ptq' or 'train'"),
    ({"kinds": ("bias",)}, r"search.kinds\[0\]: must be 'weight', 'activation' or 'gradient'"),
    ({"kinds": ("gradient",)}, "only in mode 'train'"),
    ({"strategy": "random"}, "search.strategy: must be 'grid', 'bisect' or 'predict'"),
    ({"family": "posit"}, "allowed"),
    ({"layers": "conv9"}, r"matches no site \(sites: 0, 2"),
    ({"seeds": ()}, "seeds"),
    ({"family_options": {"exponent": 4}}, "unknown option of family 'int'"),
    ({"candidates": ()}, "candidates"),
], ids=lambda v: str(v)[:30])
def test_bad_input_is_a_value_error_naming_what_is_allowed(bad, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        run_search(toy_task(), **{"mode": "ptq", "run_dir": tmp_path, **bad})
    assert not (tmp_path / STORE_FILE).exists()
