"""Criteria: accuracy drop (absolute, relative), convergence, several seeds, spread, names."""

from __future__ import annotations

import math

import pytest

from bitwidth.criteria import (
    AccuracyCriterion,
    ConvergeCriterion,
    baseline_spread,
    criterion_from_dict,
    make_criterion,
)
from bitwidth.trial import Baseline, TrialOutcome

BASE = {"accuracy": 0.90, "loss": 0.30}


def outcome(acc: float, curve=(), *, loss: float = 0.3, diverged=False, error=None) -> TrialOutcome:
    return TrialOutcome({"accuracy": acc, "loss": loss}, list(curve), diverged=diverged, error=error)


@pytest.mark.parametrize("acc, ok", [(0.90, True), (0.89, True), (0.8899, False), (0.95, True), (math.nan, False)])
def test_accuracy_absolute_drop(acc, ok):
    assert AccuracyCriterion(max_drop=0.01).passes(outcome(acc), BASE) is ok


def test_accuracy_relative_drop():
    crit = AccuracyCriterion(max_drop=0.1, relative=True)
    assert crit.threshold(BASE) == pytest.approx(0.81)
    assert crit.passes(outcome(0.81), BASE) and not crit.passes(outcome(0.80), BASE)


def test_error_or_divergence_fails_whatever_the_metric():
    crit = AccuracyCriterion()
    assert not crit.passes(outcome(0.99, error="RuntimeError: x"), BASE)
    assert not crit.passes(outcome(0.99, diverged=True), BASE)


def test_lower_is_better_for_loss_metrics():
    crit = AccuracyCriterion(max_drop=0.05, metric="loss")
    assert crit.passes(outcome(0.5, loss=0.34), BASE) and not crit.passes(outcome(0.99, loss=0.36), BASE)


def test_converge_checks_metric_loss_and_divergence():
    crit = ConvergeCriterion(max_drop=0.02, loss_tol=0.5, loss_abs_tol=0.0)
    base_curve = [2.0, 0.4]
    assert crit.passes(outcome(0.89, [2.0, 0.6]), BASE, base_curve)
    assert not crit.passes(outcome(0.89, [2.0, 0.61]), BASE, base_curve)  # loss above 0.4 * 1.5
    assert not crit.passes(outcome(0.87, [2.0, 0.4]), BASE, base_curve)  # accuracy dropped 0.03
    assert not crit.passes(outcome(0.95, [2.0], diverged=True), BASE, base_curve)
    assert not crit.passes(outcome(0.95, [2.0, math.inf]), BASE, base_curve)
    assert crit.passes(outcome(0.89, [2.0, 9.0]), BASE)  # no baseline curve: metric only
    with pytest.raises(ValueError, match="no loss curve"):
        crit.passes(outcome(0.9), BASE, base_curve)


def test_converge_takes_the_documented_arguments_in_order():
    assert ConvergeCriterion(0.03, 0.25, "accuracy") == ConvergeCriterion(max_drop=0.03, loss_tol=0.25)


def test_passes_seeds_compares_means():
    crit = AccuracyCriterion(max_drop=0.01)
    bases = [{"accuracy": 0.90}, {"accuracy": 0.94}]  # mean 0.92
    assert crit.passes_seeds([outcome(0.89), outcome(0.93)], bases)  # mean 0.91
    assert not crit.passes_seeds([outcome(0.88), outcome(0.93)], bases)  # mean 0.905
    assert not crit.passes_seeds([outcome(0.99), outcome(0.99, diverged=True)], bases)
    with pytest.raises(ValueError, match="one outcome per baseline"):
        crit.passes_seeds([outcome(0.9)], bases)


def test_passes_seeds_with_baseline_objects_and_loss_curves():
    bases = [Baseline({}, {"accuracy": 0.9, "loss": 0.3}, [1.0, c], {}) for c in (0.2, 0.4)]  # mean final 0.3
    crit = ConvergeCriterion(loss_tol=0.5, loss_abs_tol=0.0)
    assert crit.passes_seeds([outcome(0.9, [1.0, 0.4]), outcome(0.9, [1.0, 0.5])], bases)  # mean 0.45
    assert not crit.passes_seeds([outcome(0.9, [1.0, 0.4]), outcome(0.9, [1.0, 0.52])], bases)


def test_baseline_spread():
    spread = baseline_spread([{"accuracy": a} for a in (0.90, 0.92, 0.94)])
    assert spread["mean"] == pytest.approx(0.92) and spread["std"] == pytest.approx(0.02)
    assert (spread["min"], spread["max"], spread["n"]) == (0.90, 0.94, 3)
    assert baseline_spread([{"accuracy": 0.9}])["std"] == 0.0


@pytest.mark.parametrize("name, kw, match", [
    ("f1", {}, "allowed: accuracy, converge"),
    ("accuracy", {"loss_tol": 0.1}, r"allowed: \['max_drop', 'metric', 'relative'\]"),
    ("accuracy", {"max_drop": -0.1}, "max_drop"),
    ("converge", {"loss_tol": -1}, "loss_tol"),
])
def test_make_criterion_rejects_bad_input(name, kw, match):
    with pytest.raises(ValueError, match=match):
        make_criterion(name, **kw)


@pytest.mark.parametrize("crit", [AccuracyCriterion(0.05, True), ConvergeCriterion(loss_tol=0.2, metric="accuracy")])
def test_to_dict_round_trip(crit):
    assert criterion_from_dict(crit.to_dict()) == crit
    assert make_criterion(crit.name) == type(crit)()


def test_converge_allows_an_absolute_slack_above_a_fitted_baseline():
    # A baseline that fits its training set ends near zero loss: 0.001 -> 0.004 is chance, not
    # a failure to converge; the ratio alone would call it one, the slack does not.
    base_curve = [2.0, 0.001]
    assert not ConvergeCriterion(loss_abs_tol=0.0).passes(outcome(0.9, [2.0, 0.004]), BASE, base_curve)
    assert ConvergeCriterion().passes(outcome(0.9, [2.0, 0.004]), BASE, base_curve)  # 0.0015 + 0.01
    assert not ConvergeCriterion().passes(outcome(0.9, [2.0, 0.0116]), BASE, base_curve)
    with pytest.raises(ValueError, match="loss_abs_tol"):
        ConvergeCriterion(loss_abs_tol=-1)
