"""Trials: options, the cached baseline, ptq and train trials, divergence, determinism, rounding."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

import bitwidth.trial as trial_mod
from bitwidth import QuantSpec, parse_format
from bitwidth.tasks import make_task
from bitwidth.trial import BASELINE_FILE, Baseline, TrialOptions, TrialOutcome, run_trial, train_baseline


@pytest.fixture(scope="module")
def task():
    return make_task("digits_mlp")


@pytest.fixture(scope="module")
def opts():
    return TrialOptions(mode="ptq", epochs=3)


@pytest.fixture(scope="module")
def base(task, opts):
    return train_baseline(task, opts)


def _same(a: TrialOutcome, b: TrialOutcome) -> bool:
    return {**a.to_dict(), "wall_time": 0} == {**b.to_dict(), "wall_time": 0}


# ----------------------------------------------------------------------------- options and records

@pytest.mark.parametrize("bad, match", [
    ({"mode": "qat"}, "mode must be one of"), ({"optimizer": "lbfgs"}, "optimizer: Input should be 'sgd' or 'adam'"),
    ({"master_weights": "int8"}, "master_weights: Input should be 'fp32' or 'quantized'"), ({"epochs": 0}, "epochs"),
    ({"lr": -1.0}, "lr"), ({"diverge_factor": 1.0}, "diverge_factor"), ({"batch_size": 2.5}, "batch_size"),
    ({"lr_schedule": "step"}, "lr_schedule: Input should be 'constant' or 'cosine'"),
    ({"epochs": 3, "stop_epoch": 4}, "stop_epoch 4 is beyond the schedule's 3 epochs"),
])
def test_options_reject_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        TrialOptions(**bad)


def test_options_and_outcome_round_trip_through_json():
    o = TrialOptions(mode="train", optimizer="adam", lr=1e-3)
    assert TrialOptions.from_dict(json.loads(json.dumps(o.to_dict()))) == o
    with pytest.raises(ValueError, match="allowed"):
        TrialOptions.from_dict({"epoch": 3})
    out = TrialOutcome({"accuracy": 0.5, "loss": 1.0}, [2.0, 1.0], [0.3, 0.5], False, 1.5, None)
    assert TrialOutcome.from_dict(json.loads(json.dumps(out.to_dict()))) == out


# ----------------------------------------------------------------------------- baseline

def test_baseline_trains_and_is_deterministic(task, opts, base):
    assert base.metrics["accuracy"] > 0.9 and len(base.loss_curve) == 3 and len(base.val_curve) == 3
    assert base.loss_curve[-1] < base.loss_curve[0]
    again = train_baseline(task, opts)
    assert again.loss_curve == base.loss_curve
    assert all(torch.equal(base.state_dict[k], again.state_dict[k]) for k in base.state_dict)
    assert not torch.equal(base.state_dict["fc1.weight"], base.init_state_dict["fc1.weight"])


def test_cosine_schedule_sets_each_epochs_rate_and_stop_epoch_is_a_checkpoint(task, monkeypatch):
    seen = []
    real_set_lr = trial_mod.set_lr
    monkeypatch.setattr(trial_mod, "set_lr", lambda opt, lr: (seen.append(lr), real_set_lr(opt, lr)))
    full = train_baseline(task, TrialOptions(epochs=3, lr=0.06, lr_schedule="cosine"))
    assert seen == pytest.approx([0.06 * 0.5 * (1 + math.cos(math.pi * (e + 0.5) / 3)) for e in range(3)])
    assert seen[0] > seen[1] > seen[2] > 0
    # The first two epochs of the 3-epoch schedule, stopped: the full run's curve up to there, not
    # a 2-epoch schedule's (whose rates differ).
    ckpt = train_baseline(task, TrialOptions(epochs=3, lr=0.06, lr_schedule="cosine", stop_epoch=2))
    assert ckpt.loss_curve == full.loss_curve[:2]
    short = train_baseline(task, TrialOptions(epochs=2, lr=0.06, lr_schedule="cosine"))
    assert short.loss_curve[1] != full.loss_curve[1]


def test_baseline_cache_is_reused_and_invalidated(task, opts, tmp_path, monkeypatch):
    calls = []
    real_train = trial_mod._train
    monkeypatch.setattr(trial_mod, "_train", lambda *a: calls.append(1) or real_train(*a))
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k.get("weights_only")) or real_load(*a, **k))

    first = train_baseline(task, opts, tmp_path)
    assert (tmp_path / BASELINE_FILE).exists() and len(calls) == 1
    reused = train_baseline(task, opts, tmp_path)
    assert len(calls) == 1 and reused.metrics == first.metrics and set(loads) == {True}
    assert torch.equal(reused.state_dict["fc3.weight"], first.state_dict["fc3.weight"])
    # Trial-only options (mode, calibration, master weights) do not touch the baseline.
    train_baseline(task, dataclasses.replace(opts, mode="train", calib_batches=1), tmp_path)
    assert len(calls) == 1
    # A second seed is added beside the first; both stay reusable.
    train_baseline(task, dataclasses.replace(opts, seed=1), tmp_path)
    train_baseline(task, opts, tmp_path)
    train_baseline(task, dataclasses.replace(opts, seed=1), tmp_path)
    assert len(calls) == 2
    # Changed training options or a changed task retrain instead of reusing.
    train_baseline(task, dataclasses.replace(opts, lr=0.02), tmp_path)
    train_baseline(make_task("digits_mlp", val_fraction=0.3), opts, tmp_path)
    assert len(calls) == 4
    stored = real_load(tmp_path / BASELINE_FILE, weights_only=True)
    assert len(stored) == 1  # other configurations' entries were dropped on rewrite


def test_unreadable_cache_is_retrained(task, opts, tmp_path):
    (tmp_path / BASELINE_FILE).write_bytes(b"not a checkpoint")
    assert isinstance(train_baseline(task, opts, tmp_path), Baseline)


# ----------------------------------------------------------------------------- ptq trials

def test_ptq_int8_keeps_accuracy_and_int2_loses_it(task, opts, base):
    fp = run_trial(task, {}, opts, base)
    assert fp.metrics == base.metrics and fp.loss_curve == [] and fp.error is None
    int8 = run_trial(task, {"*": "int8"}, opts, base)
    int2 = run_trial(task, {"*": "int2"}, opts, base)
    assert abs(int8.metrics["accuracy"] - base.metrics["accuracy"]) <= 0.01
    assert int2.metrics["accuracy"] < base.metrics["accuracy"] - 0.3
    assert int8.wall_time > 0


def test_trials_are_deterministic_with_stochastic_rounding(task, opts, base):
    plan = {"*": QuantSpec(weight=parse_format("int3", rounding="stochastic"),
                           activation=parse_format("int4", rounding="stochastic"))}
    a, b = run_trial(task, plan, opts, base), run_trial(task, plan, opts, base)
    assert _same(a, b)
    other_seed = run_trial(task, plan, dataclasses.replace(opts, seed=1), base)
    assert other_seed.metrics != a.metrics
    train = dataclasses.replace(opts, mode="train", epochs=2)
    gplan = {"fc2": QuantSpec(gradient=parse_format("e4m3", rounding="stochastic"))}
    assert _same(run_trial(task, gplan, train, base), run_trial(task, gplan, train, base))


def test_trial_leaves_the_global_rng_alone(task, opts, base):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    run_trial(task, {"*": parse_format("int4", rounding="stochastic")}, opts, base)
    assert torch.equal(torch.rand(3), expected)


def test_bad_plan_raises_but_crashes_are_reported(task, opts, base, monkeypatch):
    with pytest.raises(ValueError, match="matches no site"):
        run_trial(task, {"fc9": "int8"}, opts, base)

    def broken():
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(task, "val_batches", broken)
    out = run_trial(task, {"*": "int8"}, opts, base)
    assert out.error == "RuntimeError: disk on fire" and not out.diverged


# ----------------------------------------------------------------------------- train trials

def test_train_trial_from_the_baseline_start_reproduces_the_baseline(task, opts, base):
    out = run_trial(task, {}, dataclasses.replace(opts, mode="train"), base)
    assert out.loss_curve == base.loss_curve and out.val_curve == base.val_curve
    assert out.metrics["accuracy"] == base.metrics["accuracy"] and not out.diverged


@pytest.mark.parametrize("plan, change", [
    ({}, {"lr": 5.0}),
    ({"*": QuantSpec(gradient=parse_format("fixed8_-4", rounding="stochastic"))}, {}),
])
def test_diverging_trial_is_flagged_not_raised(task, opts, base, plan, change):
    options = dataclasses.replace(opts, mode="train", epochs=3, **change)
    out = run_trial(task, plan, options, base)
    assert out.diverged and out.error is None
    assert len(out.loss_curve) < 3  # stopped early


def test_stochastic_rounding_rescues_training_with_quantized_master_weights(task):
    # Gupta et al. 2015: weights stored in 16-bit fixed point with 8 fraction bits (step 2^-8).
    # At lr 0.005 nearly every SGD update is below half a step, so round-to-nearest throws
    # it away and the network never leaves its initialisation; stochastic rounding keeps
    # each update in expectation and trains like fp32.
    options = TrialOptions(mode="train", epochs=4, lr=0.005, master_weights="quantized")
    base = train_baseline(task, options)

    def accuracy(rounding: str, master: str = "quantized") -> float:
        plan = {"*": QuantSpec(weight=parse_format("fixed16_8", rounding=rounding))}
        out = run_trial(task, plan, dataclasses.replace(options, master_weights=master), base)
        assert not out.diverged and out.error is None
        return out.metrics["accuracy"]

    nearest, stochastic = accuracy("nearest"), accuracy("stochastic")
    assert base.metrics["accuracy"] > 0.85
    assert nearest < 0.3
    assert stochastic > base.metrics["accuracy"] - 0.05
    # The same format with fp32 master weights (quantization-aware training) trains fine.
    assert accuracy("nearest", "fp32") > base.metrics["accuracy"] - 0.05


# ----------------------------------------------------------------------------- torchvision

def test_torchvision_resnet18_on_fakedata_runs_a_ptq_trial():
    task = make_task("torchvision:resnet18", "fakedata", size=8, val_size=4, image_size=(3, 16, 16),
                     num_classes=4, batch_size=4)
    options = TrialOptions(mode="ptq", epochs=1, calib_batches=1)
    base = train_baseline(task, options, allow_chance=True)  # fake data has random labels: nothing to learn
    out = run_trial(task, {"*": "int8", "fc": QuantSpec(weight="int4")}, options, base)
    assert out.error is None and 0 <= out.metrics["accuracy"] <= 1
