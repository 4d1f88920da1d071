"""Faults a trial must name rightly: a baseline at chance, NaN/Inf data, and files written whole."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import bitwidth.trial as trial_mod
from bitwidth.stats import Recorder, record
from bitwidth.tasks import load_data
from bitwidth.tasks.base import Task
from bitwidth.tasks.models import digits_mlp
from bitwidth.tasks.text import sequence_cross_entropy
from bitwidth.trial import (
    BASELINE_FILE,
    CHANCE_MARGIN,
    Baseline,
    BaselineAtChance,
    NonFiniteData,
    TrialOptions,
    run_trial,
    train_baseline,
)

OPTS = TrialOptions(mode="ptq", epochs=2)


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


def digits_task(digits, name: str, x: torch.Tensor | None = None, y: torch.Tensor | None = None,
                val: TensorDataset | None = None) -> Task:
    tx, ty = digits.train.tensors
    return Task(name, digits_mlp, TensorDataset(tx if x is None else x, ty if y is None else y), val or digits.val)


# ----------------------------------------------------------------------------- baseline at chance

def test_baseline_trained_on_shuffled_labels_is_at_chance(digits):
    labels = digits.train.tensors[1]
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    expected = r"validation accuracy .* <= .*1/10 classes \+ 0.0283.*lr \(0.05\).*epochs"
    with pytest.raises(BaselineAtChance, match=expected) as err:
        train_baseline(digits_task(digits, "shuffled", y=shuffled), OPTS)
    assert err.value.metric == "accuracy" and err.value.value <= err.value.chance
    n_val = len(digits.val)  # the margin: two standard errors of random guessing, at least CHANCE_MARGIN
    assert err.value.chance == pytest.approx(0.1 + max(CHANCE_MARGIN, 2 * (0.1 * 0.9 / n_val) ** 0.5))
    assert isinstance(err.value, ValueError)


def test_predicting_the_majority_class_is_chance():
    # Inputs carry no information; 90% of labels are class 0: the model learns to say 0.
    gen = torch.Generator().manual_seed(0)

    def split(n: int) -> TensorDataset:
        y = torch.zeros(n, dtype=torch.long)
        y[: n // 10] = torch.arange(n // 10) % 2 + 1
        return TensorDataset(torch.randn(n, 2, generator=gen), y)

    task = Task("majority", lambda: nn.Linear(2, 3), split(400), split(100))
    with pytest.raises(BaselineAtChance, match="majority-class frequency 0.9000") as err:
        train_baseline(task, OPTS)
    assert err.value.chance == pytest.approx(0.9) and err.value.value <= 0.9


def lm_task(copy: bool) -> Task:
    """Token windows over 8 symbols; targets copy the inputs (learnable) or are drawn apart (not)."""
    gen = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.5, 0.2, 0.1, 0.1, 0.04, 0.03, 0.02, 0.01])

    def split(n: int) -> TensorDataset:
        x = torch.multinomial(probs, n * 16, replacement=True, generator=gen).view(n, 16)
        y = x.clone() if copy else torch.multinomial(probs, n * 16, replacement=True, generator=gen).view(n, 16)
        return TensorDataset(x, y)

    return Task(f"lm-copy-{copy}", lambda: nn.Embedding(8, 8), split(256), split(64),
                loss_fn=sequence_cross_entropy)


def test_language_model_no_better_than_label_frequencies_is_at_chance():
    untrained = TrialOptions(mode="ptq", epochs=1, lr=1e-6, optimizer="adam")
    with pytest.raises(BaselineAtChance, match=r"validation loss .* >= .*training label frequencies") as err:
        train_baseline(lm_task(copy=False), untrained)
    assert err.value.metric == "loss" and err.value.value >= err.value.chance
    # The level is the loss of the training frequencies: about their entropy, far below log(8).
    assert 1.3 < err.value.chance < 1.6 < torch.log(torch.tensor(8.0))
    learned = train_baseline(lm_task(copy=True), TrialOptions(mode="ptq", epochs=3, lr=0.1))
    assert learned.metrics["loss"] < err.value.chance - 0.5


def test_at_chance_verdict_is_cached_and_can_be_overridden(digits, tmp_path, monkeypatch):
    labels = digits.train.tensors[1]
    task = digits_task(digits, "shuffled", y=labels[torch.randperm(len(labels),
                                                                   generator=torch.Generator().manual_seed(1))])
    with pytest.raises(BaselineAtChance):
        train_baseline(task, OPTS, tmp_path)
    assert (tmp_path / BASELINE_FILE).exists()
    calls = []
    real_train = trial_mod._train
    monkeypatch.setattr(trial_mod, "_train", lambda *a: calls.append(1) or real_train(*a))
    with pytest.raises(BaselineAtChance):  # a cache hit is judged too
        train_baseline(task, OPTS, tmp_path)
    assert isinstance(train_baseline(task, OPTS, tmp_path, allow_chance=True), Baseline)
    assert calls == []  # neither retrained


def test_a_learning_baseline_passes_the_chance_check(digits):
    assert train_baseline(digits_task(digits, "clean"), OPTS).metrics["accuracy"] > 0.5


# ----------------------------------------------------------------------------- non-finite data

@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_in_training_data_is_named_not_called_divergence(digits, value):
    x = digits.train.tensors[0].clone()
    x[100, 0, 3, 4] = value  # one pixel of one sample
    with pytest.raises(NonFiniteData, match=r"training batch \d+ of epoch 0 has 1 NaN/Inf value\(s\) in its inputs"):
        train_baseline(digits_task(digits, "nan-pixel", x=x), OPTS)


def test_nan_in_a_train_trial_is_reported_as_a_data_error(digits):
    base = train_baseline(digits_task(digits, "clean"), OPTS)
    x = digits.train.tensors[0].clone()
    x[7, 0, 0, 0] = float("nan")
    out = run_trial(digits_task(digits, "nan-pixel", x=x), {"*": "int8"},
                    TrialOptions(mode="train", epochs=2), base)
    assert not out.diverged
    assert out.error is not None and "NonFiniteData: training batch" in out.error and "NaN/Inf" in out.error


def test_nan_in_validation_data_is_named(digits):
    vx, vy = digits.val.tensors
    vx = vx.clone()
    vx[3, 0, 1, 1] = float("nan")
    with pytest.raises(NonFiniteData, match=r"validation batch 0 has 1 NaN/Inf .* inputs \(rows \[3\]"):
        train_baseline(digits_task(digits, "nan-val", val=TensorDataset(vx, vy)), OPTS)


# ----------------------------------------------------------------------------- files written whole

def test_baseline_temp_file_is_unique_to_the_writer(digits, tmp_path):
    # The old shared temp name, taken by another writer (here a directory, so it cannot be overwritten).
    (tmp_path / f"{BASELINE_FILE}.tmp").mkdir()
    train_baseline(digits_task(digits, "clean"), OPTS, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [BASELINE_FILE, f"{BASELINE_FILE}.tmp"]
    assert isinstance(train_baseline(digits_task(digits, "clean"), OPTS, tmp_path), Baseline)


def test_stats_save_is_atomic(tmp_path, monkeypatch):
    model = nn.Sequential(nn.Linear(2, 1))
    with record(model) as rec:
        model(torch.ones(3, 2)).sum().backward()
    path = tmp_path / "stats.pt"
    rec.save(path)
    before = path.read_bytes()

    def killed_midway(obj, f, *args, **kwargs):
        (open(f, "wb") if isinstance(f, (str, os.PathLike)) else f).write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        rec.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["stats.pt"]
    assert Recorder.load(path).to_frame().equals(rec.to_frame())


def test_huge_but_finite_data_is_not_called_non_finite():
    huge = torch.full((4, 3), 3e38)  # its sum overflows to inf; every value is finite
    trial_mod._check_finite(huge, torch.zeros(4), "batch")
    huge[2, 1] = float("-inf")
    with pytest.raises(NonFiniteData, match=r"batch has 1 NaN/Inf value\(s\) in its inputs \(rows \[2\]"):
        trial_mod._check_finite(huge, torch.zeros(4), "batch")
