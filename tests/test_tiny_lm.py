"""tiny_lm on pytext: the stdlib corpus, the model, evaluate on sequences, the loss criterion, the config."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as TF

from bitwidth.config import ConfigError, load_config
from bitwidth.criteria import LossCriterion, criterion_from_dict, make_criterion
from bitwidth.tasks import check_pairing, evaluate, load_data, make_task
from bitwidth.tasks.lm import TinyLM, tiny_lm
from bitwidth.tasks.text import corpus_files, load_pytext, sequence_cross_entropy, split_corpus
from bitwidth.trial import Baseline, TrialOptions, TrialOutcome, run_trial, train_baseline

SMALL = {"train_bytes": 8192, "val_bytes": 2048}
CONFIG = Path(__file__).parent.parent / "configs" / "tiny_lm.yaml"


# ----------------------------------------------------------------------------- the corpus

def test_corpus_is_split_by_file_and_deterministic():
    train, val = corpus_files()
    assert train and val and not {p.name for p in train} & {p.name for p in val}
    assert len(val) < len(train)  # one file in eight, by the hash of its name
    assert corpus_files() == (train, val)


def test_windows_are_next_byte_pairs_of_exact_size():
    spec = load_pytext(context=16, **SMALL)
    x, y = spec.train.tensors
    assert x.shape == (8191 // 16, 16) and x.dtype == torch.int64 and int(x.max()) < 256
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(x[1:, 0], y[:-1, -1])  # windows are contiguous
    text, _ = split_corpus(corpus_files()[0], 8192)
    assert bytes(x[0].tolist()) == text[:16]
    assert torch.equal(load_pytext(context=16, **SMALL).val.tensors[0], spec.val.tensors[0])


def test_fingerprint_names_python_and_corpus():
    info = load_data("pytext", **SMALL).info
    assert info["python"].count(".") == 2 and len(info["corpus_digest"]) == 16
    assert load_data("pytext", train_bytes=4096, val_bytes=2048).info["corpus_digest"] != info["corpus_digest"]
    fp = make_task("tiny_lm", "pytext", **SMALL).fingerprint()
    assert fp["corpus_digest"] == info["corpus_digest"] and fp["loss"] == "sequence_cross_entropy"


def test_corpus_of_another_stdlib(tmp_path):
    for i in range(16):
        (tmp_path / f"m{i}.py").write_text(f"x = {i}\n" * 10)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "sub.py").write_text("ignored\n")
    train, val = corpus_files(tmp_path)
    assert len(train) + len(val) == 16 and all(p.parent == tmp_path for p in train + val)
    with pytest.raises(ValueError, match="only"):
        split_corpus(train, 10**6)
    with pytest.raises(FileNotFoundError, match="no standard-library"):
        corpus_files(tmp_path / "pkg" / "none")


@pytest.mark.parametrize("kw, match", [
    ({"context": 0}, "context must be an integer >= 1"),
    ({"train_bytes": 10}, "train_bytes must be an integer >= 65"),
    ({"val_bytes": 1.5}, "val_bytes"),
])
def test_bad_data_options(kw, match):
    with pytest.raises(ValueError, match=match):
        load_pytext(**kw)


def test_unknown_data_option_lists_allowed():
    with pytest.raises(ValueError, match=r"allowed: \['context', 'train_bytes', 'val_bytes'\]"):
        make_task("tiny_lm", "pytext", vocab=128)


# ----------------------------------------------------------------------------- the model

def test_model_shapes_names_and_seed():
    task = make_task("tiny_lm", "pytext", **SMALL)
    model = task.build_model(0)
    assert model(task.example_input()).shape == (1, 64, 256)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 13 and linears[-1] == "head" and "blocks.1.mlp.fc2" in linears
    assert torch.equal(model.head.weight, task.build_model(0).head.weight)
    assert not torch.equal(model.head.weight, task.build_model(1).head.weight)
    assert model.head.weight.data_ptr() != model.tok_emb.weight.data_ptr()  # untied


def test_model_is_causal():
    model = tiny_lm().eval()
    x = torch.randint(0, 256, (1, 20))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 256
    a, b = model(x), model(y)
    assert torch.allclose(a[:, :10], b[:, :10]) and not torch.allclose(a[:, 10:], b[:, 10:])


def test_model_rejects_bad_shapes():
    with pytest.raises(ValueError, match="exceeds the model's context of 64"):
        tiny_lm()(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="use data 'pytext'"):
        tiny_lm(1, 10, (8, 8))
    with pytest.raises(ValueError, match="multiple of n_heads"):
        TinyLM(d_model=30, n_heads=4)


@pytest.mark.parametrize("model, data, match", [
    ("tiny_lm", "digits", r"takes text data \(pytext\), not image data 'digits'"),
    ("digits_mlp", "pytext", "takes image data"),
    ("torchvision:resnet18", "pytext", "takes image data"),
])
def test_models_and_data_must_pair(model, data, match):
    with pytest.raises(ValueError, match=match):
        make_task(model, data)
    check_pairing("mypkg.models:build", data)  # a user model may take either


def test_task_pickles_for_process_pools():
    task = make_task("tiny_lm", "pytext", **SMALL)
    clone = pickle.loads(pickle.dumps(task))
    assert clone.fingerprint() == task.fingerprint() and clone.loss_fn is sequence_cross_entropy


# ----------------------------------------------------------------------------- loss and evaluate on sequences

def test_sequence_cross_entropy_is_the_mean_over_positions():
    logits, y = torch.randn(3, 5, 7), torch.randint(0, 7, (3, 5))
    manual = torch.stack([TF.cross_entropy(logits[b, t:t + 1], y[b, t:t + 1]) for b in range(3) for t in range(5)])
    assert torch.allclose(sequence_cross_entropy(logits, y), manual.mean())


def test_evaluate_scores_every_position():
    model = torch.nn.Embedding(4, 4)
    x, y = torch.randint(0, 4, (6, 8)), torch.randint(0, 4, (6, 8))
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]  # unequal batches: weighted by positions
    got = evaluate(model, batches, sequence_cross_entropy)
    with torch.no_grad():
        out = model(x)
    assert got["accuracy"] == pytest.approx(float((out.argmax(-1) == y).float().mean()))
    assert got["loss"] == pytest.approx(float(sequence_cross_entropy(out, y)), rel=1e-6)


def test_evaluate_keeps_classifiers_and_scores_dense_outputs():
    torch.manual_seed(0)
    clf, x, y = torch.nn.Linear(3, 4), torch.randn(10, 3), torch.randint(0, 4, (10,))
    got = evaluate(clf, [(x, y)])
    with torch.no_grad():
        assert got["accuracy"] == pytest.approx(float((clf(x).argmax(1) == y).float().mean()))
    conv, img, mask = torch.nn.Conv2d(2, 3, 1), torch.randn(2, 2, 4, 5), torch.randint(0, 3, (2, 4, 5))
    with torch.no_grad():
        expected = float((conv(img).argmax(1) == mask).float().mean())
    assert evaluate(conv, [(img, mask)])["accuracy"] == pytest.approx(expected)  # (N, C, H, W): classes on dim 1
    reg = evaluate(torch.nn.Linear(3, 1), [(x, torch.randn(10, 1))], TF.mse_loss)
    assert math.isnan(reg["accuracy"]) and reg["loss"] > 0


# ----------------------------------------------------------------------------- trials

def test_baseline_learns_and_int8_ptq_keeps_the_loss():
    task = make_task("tiny_lm", "pytext", train_bytes=32768, val_bytes=4096)
    opts = TrialOptions(mode="ptq", epochs=1, lr=0.003, optimizer="adam", batch_size=16, calib_batches=2)
    base = train_baseline(task, opts)
    assert base.metrics["loss"] < math.log(256) - 1.5 and 0.1 < base.metrics["accuracy"] < 1
    out = run_trial(task, {"*": "int8"}, opts, base)
    assert out.error is None and make_criterion("loss", max_rise=0.02).passes(out, base.metrics)
    assert not make_criterion("loss", max_rise=0.02).passes(run_trial(task, {"*": "int2"}, opts, base), base.metrics)


# ----------------------------------------------------------------------------- the loss criterion

BASE = {"accuracy": 0.5, "loss": 2.0}


def lm_outcome(loss: float, *, diverged: bool = False, error: str | None = None) -> TrialOutcome:
    return TrialOutcome({"accuracy": 0.4, "loss": loss}, diverged=diverged, error=error)


@pytest.mark.parametrize("loss, ok", [(1.5, True), (2.0, True), (2.1, True), (2.1001, False), (math.nan, False),
                                      (math.inf, False)])
def test_loss_rise_is_relative_by_default(loss, ok):
    crit = make_criterion("loss", max_rise=0.05)
    assert crit.threshold(BASE) == pytest.approx(2.1)
    assert crit.passes(lm_outcome(loss), BASE) is ok


def test_loss_rise_absolute():
    crit = LossCriterion(max_rise=0.3, relative=False)
    assert crit.passes(lm_outcome(2.3), BASE) and not crit.passes(lm_outcome(2.31), BASE)


def test_loss_criterion_fails_errors_and_divergence_in_either_mode():
    crit = LossCriterion()
    assert not crit.passes(lm_outcome(1.0, error="RuntimeError: x"), BASE)
    assert not crit.passes(lm_outcome(1.0, diverged=True), BASE, [3.0, 2.0])
    trained = TrialOutcome({"accuracy": 0.5, "loss": 2.05, "train_loss": 1.9}, loss_curve=[3.0, 1.9])
    assert crit.passes(trained, BASE, [3.0, 1.8])  # train mode: judged on the validation loss


def test_loss_criterion_over_seeds():
    bases = [Baseline({}, {"accuracy": 0.5, "loss": b}, [1.0], {}) for b in (1.9, 2.1)]  # mean 2.0
    crit = LossCriterion(max_rise=0.05)
    assert crit.passes_seeds([lm_outcome(2.0), lm_outcome(2.2)], bases)  # mean 2.1
    assert not crit.passes_seeds([lm_outcome(2.0), lm_outcome(2.21)], bases)
    assert not crit.passes_seeds([lm_outcome(1.0), lm_outcome(1.0, diverged=True)], bases)


@pytest.mark.parametrize("kw, match", [
    ({"max_drop": 0.1}, r"allowed: \['max_rise', 'metric', 'relative'\]"),
    ({"max_rise": -0.1}, "max_rise must be a number >= 0"),
    ({"metric": "accuracy"}, "use criterion 'accuracy'"),
])
def test_loss_criterion_rejects_bad_input(kw, match):
    with pytest.raises(ValueError, match=match):
        make_criterion("loss", **kw)


def test_loss_criterion_round_trips():
    crit = LossCriterion(0.1, False, "train_loss")
    assert crit.to_dict() == {"name": "loss", "max_rise": 0.1, "relative": False, "metric": "train_loss"}
    assert criterion_from_dict(crit.to_dict()) == crit
    with pytest.raises(ValueError, match="allowed: accuracy, converge, loss"):
        make_criterion("perplexity")


# ----------------------------------------------------------------------------- config

def test_shipped_config_is_a_ptq_loss_search_of_every_site():
    cfg = load_config(CONFIG)
    assert (cfg.task.model, cfg.task.data, cfg.mode, cfg.search.layers) == ("tiny_lm", "pytext", "ptq", "*")
    assert cfg.criterion.build() == LossCriterion(max_rise=cfg.criterion.max_rise, relative=True)


def test_criterion_defaults_follow_the_criterion():
    loss = load_config(None, ["criterion={name: loss}"]).criterion
    assert (loss.relative, loss.metric, loss.max_rise) == (True, "loss", 0.05)
    acc = load_config(None, []).criterion
    assert (acc.name, acc.relative, acc.metric) == ("accuracy", False, "accuracy")
    assert load_config(None, ["mode=train", "criterion.name=loss"]).criterion.build() == LossCriterion()
    assert load_config(None, ["criterion={name: loss, relative: false}"]).criterion.build().relative is False


def test_config_reports_criterion_and_pairing_problems():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["criterion={name: loss, metric: accuracy}", "task={model: tiny_lm, data: digits}"])
    text = str(info.value)
    assert "criterion: the loss criterion judges a loss" in text
    assert "task: model 'tiny_lm' takes text data (pytext)" in text
