"""Trials: one plan evaluated in one mode, against an fp32 baseline trained once.

``ptq``: load the baseline weights, apply the plan, calibrate activation ranges, evaluate.
``train``: train from the baseline's initial weights, in the baseline's data order, with
the plan active in forward and backward; record the per-epoch curves.

Divergence rule (train mode): training stops and the trial is marked ``diverged`` as soon
as a batch's loss is NaN or infinite, or exceeds ``diverge_factor`` times the initial loss
(the loss of the very first batch, before any update). The remaining epochs are skipped.
A batch whose inputs or targets hold NaN or Inf is not a divergence but a fault of the
data: training raises :class:`NonFiniteData` naming the batch and epoch before using it.

Chance rule (baseline): a baseline no better than chance makes every plan pass, so
:func:`train_baseline` raises :class:`BaselineAtChance` unless ``allow_chance=True``. With
one label per sample (a classifier) chance is the larger of ``1 / num_classes`` plus a
margin (two standard errors of random guessing on the validation set, at least
:data:`CHANCE_MARGIN`) and the majority-class frequency of the validation labels, judged
on validation accuracy; with a label per position (a language model) it is the validation
loss of predicting the training label frequencies everywhere. Float targets (regression)
are not judged.

Weight storage (train mode): ``master_weights="fp32"`` keeps fp32 weights and quantizes
them in forward (quantization-aware training); ``"quantized"`` rounds every parameter of
each layer with a weight format to that format (with its rounding) at the start and
after every optimizer step, as fixed-point training hardware stores them. Only then does
rounding matter: an update smaller than half a step vanishes under round-to-nearest but
survives in expectation under stochastic rounding (Gupta et al., 2015). On ``digits_mlp``
with every weight in ``fixed16_8`` and SGD (lr 0.005, momentum 0.9, 4 epochs), the mean
over seeds 0-4 is 0.09 validation accuracy with nearest (training never leaves the
initialisation), 0.90 with stochastic rounding, 0.90 for fp32.

Everything random (initial weights, data order, stochastic rounding, calibration sample)
is drawn from ``options.seed`` inside a forked RNG, so the same inputs give the same
outcome on CPU (with the same number of threads) and the caller's RNG state is untouched.

>>> from bitwidth.tasks import make_task
>>> task = make_task("digits_mlp")
>>> opts = TrialOptions(mode="ptq", epochs=1)
>>> base = train_baseline(task, opts)
>>> out = run_trial(task, {"*": "int8"}, opts, base)
>>> abs(out.metrics["accuracy"] - base.metrics["accuracy"]) < 0.05, out.diverged
(True, False)
"""

from __future__ import annotations

import json
import math
import time
import traceback
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, get_args

import torch
import torch.nn.functional as TF
from torch import nn

from . import rundir as rd
from .config import TrainConfig, check_seed, check_train_options
from .sites import engine_of
from .store import atomic_file
from .tasks.base import TaskLike, _class_dim, digest, evaluate
from .wrap import Plan, calibrate, resolve_plan, set_plan, wrap

__all__ = [
    "BASELINE_FILE",
    "CHANCE_MARGIN",
    "MASTER_WEIGHTS",
    "MODES",
    "OPTIMIZERS",
    "Baseline",
    "BaselineAtChance",
    "NonFiniteData",
    "TrialOptions",
    "TrialOutcome",
    "run_trial",
    "train_baseline",
]

MODES = ("ptq", "train")
OPTIMIZERS = get_args(TrainConfig.model_fields["optimizer"].annotation)  # ("sgd", "adam")
MASTER_WEIGHTS = get_args(TrainConfig.model_fields["master_weights"].annotation)  # ("fp32", "quantized")
BASELINE_FILE = rd.BASELINE
# The options that change how the baseline is trained; the others only change trials.
_TRAINING_KEYS = ("seed", "epochs", "lr", "batch_size", "optimizer", "momentum", "weight_decay", "device")
# The least margin above 1 / num_classes that is still chance: a few lucky samples are not learning.
CHANCE_MARGIN = 0.02


class BaselineAtChance(ValueError):
    """The fp32 baseline is no better than chance on ``metric``: a search against it would pass every plan.

    ``value`` is the baseline's validation metric, ``chance`` the level it had to beat.
    """

    def __init__(self, message: str, metric: str, value: float, chance: float) -> None:
        super().__init__(message)
        self.metric, self.value, self.chance = metric, value, chance


class NonFiniteData(ValueError):
    """A batch of the task's data holds NaN or Inf: the data is at fault, not the training."""


_TRAIN = TrainConfig()  # the defaults


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


@dataclass(frozen=True)
class TrialOptions:
    """How trials (and the baseline) run; the defaults suit the digits tasks (about a second each).

    >>> TrialOptions(mode="train", optimizer="adam", lr=1e-3).to_dict()["optimizer"]
    'adam'
    >>> TrialOptions(mode="qat")
    Traceback (most recent call last):
    ...
    ValueError: mode must be one of ('ptq', 'train'), got 'qat'
    """

    mode: str = "ptq"
    seed: int = 0
    # The training options and their defaults are the config's ``train`` section's (one source).
    epochs: int = _TRAIN.epochs
    lr: float = _TRAIN.lr
    batch_size: int = _TRAIN.batch_size
    optimizer: str = _TRAIN.optimizer
    momentum: float = _TRAIN.momentum
    weight_decay: float = _TRAIN.weight_decay
    calib_batches: int = _TRAIN.calib_batches
    master_weights: str = _TRAIN.master_weights
    diverge_factor: float = _TRAIN.diverge_factor
    device: str = _TRAIN.device

    def __post_init__(self) -> None:
        _choice("mode", self.mode, MODES)
        check_train_options({f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("mode", "seed")})
        check_seed(self.seed)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrialOptions:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` naming the allowed ones."""
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(allowed))
        if unknown:
            raise ValueError(f"unknown trial option(s) {unknown}; allowed: {allowed}")
        return cls(**d)

    def training_key(self) -> dict[str, Any]:
        """The options that determine the fp32 baseline."""
        return {k: getattr(self, k) for k in _TRAINING_KEYS}


@dataclass
class Baseline:
    """The fp32 reference of one (task, seed, training options): weights, metrics, curves."""

    state_dict: dict[str, torch.Tensor]
    metrics: dict[str, float]
    loss_curve: list[float]
    init_state_dict: dict[str, torch.Tensor]
    val_curve: list[float] = field(default_factory=list)
    key: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrialOutcome:
    """The result of one trial; ``metrics`` has at least ``accuracy`` and ``loss`` (validation),
    plus ``train_loss`` (the final epoch's) in train mode.

    >>> TrialOutcome.from_dict(TrialOutcome({"accuracy": 0.9, "loss": 0.3}).to_dict()).metrics["accuracy"]
    0.9
    """

    metrics: dict[str, float]
    loss_curve: list[float] = field(default_factory=list)
    val_curve: list[float] = field(default_factory=list)
    diverged: bool = False
    wall_time: float = 0.0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrialOutcome:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


# ----------------------------------------------------------------------------- baseline

def train_baseline(
    task: TaskLike, options: TrialOptions, cache_dir: Path | str | None = None, *, allow_chance: bool = False
) -> Baseline:
    """Train the fp32 baseline, or reuse ``cache_dir/baseline.pt`` when it matches exactly.

    The file holds one entry per seed of the same task and training options; an entry
    whose key (task fingerprint, seed, training options) differs is retrained, and entries
    of another task or other options are dropped when the file is rewritten.

    Raises :class:`BaselineAtChance` when the trained baseline is no better than chance
    (see the module docstring), also on a cache hit, unless ``allow_chance``; such a
    baseline is still cached, so passing ``allow_chance=True`` afterwards does not retrain.
    Raises :class:`NonFiniteData` when a training or validation batch holds NaN or Inf.
    """
    key = {"task": task.fingerprint(), **options.training_key()}
    key_json = json.dumps(key, sort_keys=True, default=str)
    path = Path(cache_dir) / BASELINE_FILE if cache_dir is not None else None
    entries = _load_entries(path)
    hit = entries.get(digest(key_json.encode()))
    if hit is not None and hit["key"] == key_json:
        _raise_at_chance(hit.get("at_chance"), allow_chance)
        return _baseline_from_entry(hit, key)

    with torch.random.fork_rng(devices=_rng_devices(options.device)):
        torch.manual_seed(options.seed)
        model = task.build_model(options.seed).to(options.device)
        init = _cpu_state(model)
        loss_curve, val_curve, diverged = _train(model, task, options, [])
        metrics = _evaluate(model, task, options.device)
    if diverged:
        raise RuntimeError(f"the fp32 baseline diverged (loss curve {loss_curve}); lower lr or change options")
    at_chance = _at_chance(model, task, options, metrics)
    base = Baseline(_cpu_state(model), metrics, loss_curve, init, val_curve, key)
    if path is not None:
        same_config = {k: e for k, e in entries.items() if _same_config(e["key"], key)}
        same_config[digest(key_json.encode())] = {
            "key": key_json, "state_dict": base.state_dict, "init_state_dict": init,
            "metrics": metrics, "loss_curve": loss_curve, "val_curve": val_curve, "at_chance": at_chance,
        }
        # A temp name unique to this process, then one rename: a killed run never leaves a
        # half-written baseline, and two runs sharing a cache never write the same temp file.
        with atomic_file(path, "wb") as f:
            torch.save(same_config, f)
    _raise_at_chance(at_chance, allow_chance)
    return base


def _load_entries(path: Path | None) -> dict[str, dict]:
    if path is None or not path.exists():
        return {}
    try:
        entries = torch.load(path, weights_only=True)
    except Exception:  # an unreadable cache is retrained, never trusted
        return {}
    if not isinstance(entries, dict):
        return {}
    return {k: e for k, e in entries.items() if isinstance(e, dict) and isinstance(e.get("key"), str)}


def _same_config(stored_key_json: str, key: dict[str, Any]) -> bool:
    stored = json.loads(stored_key_json)
    stored.pop("seed", None)
    other = json.loads(json.dumps({k: v for k, v in key.items() if k != "seed"}, default=str))
    return stored == other


def _baseline_from_entry(e: dict, key: dict[str, Any]) -> Baseline:
    return Baseline(e["state_dict"], e["metrics"], e["loss_curve"], e["init_state_dict"], e["val_curve"], key)


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _rng_devices(device: str) -> list:
    return [torch.device(device)] if torch.device(device).type == "cuda" else []


# ----------------------------------------------------------------------------- chance level

def _raise_at_chance(at_chance: dict | None, allow: bool) -> None:
    if at_chance and not allow:
        raise BaselineAtChance(at_chance["message"], at_chance["metric"], at_chance["value"], at_chance["chance"])


@torch.no_grad()
def _at_chance(model: nn.Module, task: TaskLike, options: TrialOptions, metrics: dict[str, float]) -> dict | None:
    """``{message, metric, value, chance}`` when the trained ``model`` is no better than chance, else None.

    Costs one sample's forward pass (to count the classes) and one pass over the validation
    batches; with a label per position also one over the training batches and a second over
    the validation ones, none of them through the model.
    """
    x, y = next(iter(task.val_batches()))
    if y.is_floating_point() or y.is_complex():
        return None  # regression: no class frequencies to be at the chance level of
    was_training = model.training
    model.eval()
    try:
        out = model(x[:1].to(options.device))  # (1, C), (1, C, ...) or (1, T, V)
    finally:
        model.train(was_training)
    dim = _class_dim(out, y[:1])
    if dim is None:
        return None
    num_classes = out.shape[dim]
    val_counts = _label_counts(task.val_batches(), num_classes, "validation")
    advice = (f"check lr ({options.lr}), epochs ({options.epochs}) and the data (labels shuffled or not "
              f"matching the inputs); pass allow_chance=True to train_baseline to use this baseline anyway")
    if y.dim() == 1:  # one label per sample: a classifier, judged on accuracy
        n, guess = float(val_counts.sum()), 1 / num_classes
        majority = float(val_counts.max()) / n
        # A random guesser's accuracy on n samples spreads by sqrt(p (1 - p) / n): two of those
        # above 1 / num_classes (at least CHANCE_MARGIN) is still luck, not learning.
        margin = max(CHANCE_MARGIN, 2 * math.sqrt(guess * (1 - guess) / n))
        chance = max(guess + margin, majority)
        value = metrics["accuracy"]
        if value > chance:
            return None
        return {"metric": "accuracy", "value": value, "chance": chance, "message": (
            f"the fp32 baseline is no better than chance: validation accuracy {value:.4f} <= {chance:.4f}, the "
            f"larger of 1/{num_classes} classes + {margin:.4f} (random guessing on {n:.0f} samples) and the "
            f"majority-class frequency {majority:.4f} of the validation labels; every plan would pass against it: "
            f"{advice}")}
    # A label per position (a language model): judged on the loss of a model that learned
    # only how often each label occurs in training (+0.5 per label: none gets probability 0).
    train_counts = _label_counts(task.train_batches(options.seed, 0, batch_size=options.batch_size),
                                 num_classes, "training")
    log_freq = ((train_counts + 0.5) / (train_counts.sum() + 0.5 * num_classes)).log().float()
    chance = _constant_loss(task, log_freq, dim)
    value = metrics["loss"]
    if value < chance:
        return None
    return {"metric": "loss", "value": value, "chance": chance, "message": (
        f"the fp32 baseline is no better than chance: validation loss {value:.4f} >= {chance:.4f}, the loss of "
        f"predicting the training label frequencies of its {num_classes} classes at every position; "
        f"every plan would pass against it: {advice}")}


def _label_counts(batches: Any, num_classes: int, split: str) -> torch.Tensor:
    """How often each class ``0 .. num_classes - 1`` is a target (others, e.g. an ignore index, are skipped)."""
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for i, (x, y) in enumerate(batches):
        _check_finite(x, y, f"{split} batch {i}")
        labels = y.flatten().cpu().long()
        labels = labels[(labels >= 0) & (labels < num_classes)]
        counts += torch.bincount(labels, minlength=num_classes).double()
    return counts


def _constant_loss(task: TaskLike, log_freq: torch.Tensor, dim: int) -> float:
    """The task's validation loss (as :func:`evaluate` weighs it) of ``log_freq`` as the scores everywhere."""
    loss_fn = getattr(task, "loss_fn", TF.cross_entropy)
    total, loss_sum = 0, 0.0
    for _, y in task.val_batches():
        if dim == -1:  # (..., C) for (...)
            scores = log_freq.expand(*y.shape, len(log_freq))
        else:  # (N, C, d1, ...) for (N, d1, ...)
            scores = log_freq.view(1, -1, *[1] * (y.dim() - 1)).expand(len(y), -1, *y.shape[1:])
        loss_sum += float(loss_fn(scores.contiguous(), y)) * y.numel()
        total += y.numel()
    return loss_sum / max(total, 1)


# ----------------------------------------------------------------------------- trials

def run_trial(task: TaskLike, plan: Plan, options: TrialOptions, baseline: Baseline) -> TrialOutcome:
    """Evaluate ``plan`` in ``options.mode``; divergence and runtime errors are reported, not raised.

    A plan naming no layer of the model raises ``ValueError`` before anything runs.
    """
    start = time.perf_counter()
    with torch.random.fork_rng(devices=_rng_devices(options.device)):
        torch.manual_seed(options.seed)
        model = task.build_model(options.seed)
        resolve_plan(model, plan)  # a bad plan is the caller's error: raise it now
        try:
            if options.mode == "ptq":
                outcome = _ptq(model, task, plan, options, baseline)
            else:
                outcome = _train_trial(model, task, plan, options, baseline)
        except Exception as err:  # a trial that crashes must not stop a search of hundreds
            msg = traceback.format_exception_only(type(err), err)[-1].strip()
            outcome = TrialOutcome({"accuracy": float("nan"), "loss": float("nan")}, error=msg)
    outcome.wall_time = time.perf_counter() - start
    return outcome


def _ptq(model: nn.Module, task: TaskLike, plan: Plan, options: TrialOptions, baseline: Baseline) -> TrialOutcome:
    model.load_state_dict(baseline.state_dict)
    model.to(options.device)
    wrap(model)
    set_plan(model, plan)
    if options.calib_batches:
        calibrate(model, [x.to(options.device) for x, _ in task.calib_batches(options.calib_batches)])
    return TrialOutcome(_evaluate(model, task, options.device))


def _train_trial(
    model: nn.Module, task: TaskLike, plan: Plan, options: TrialOptions, baseline: Baseline
) -> TrialOutcome:
    model.load_state_dict(baseline.init_state_dict)
    model.to(options.device)
    wrap(model, plan)
    stored = _stored_formats(model) if options.master_weights == "quantized" else []
    loss_curve, val_curve, diverged = _train(model, task, options, stored)
    metrics = _evaluate(model, task, options.device)
    if loss_curve:
        metrics["train_loss"] = loss_curve[-1]
    return TrialOutcome(metrics, loss_curve, val_curve, diverged)


def _stored_formats(model: nn.Module) -> list[tuple[torch.Tensor, Any, int | None]]:
    """(parameter, weight format, channel axis) for every parameter stored in a weight site's format.

    A module's other parameters (its bias) are stored in the format of its ``weight`` site.
    """
    eng = engine_of(model)
    out = []
    for slot in eng.slots.values() if eng else []:
        fmt = eng.spec(slot.name).weight
        if fmt is None:
            continue
        out.append((slot.param, fmt, slot.axis))
        if slot.pname == "weight":
            others = [n for n in slot.module._parameters if n != "weight" and not any(
                s.module is slot.module and s.pname == n for s in eng.slots.values())]
            out += [(slot.module._parameters[n], fmt, None) for n in others if slot.module._parameters[n] is not None]
    return out


@torch.no_grad()
def _store(stored: list[tuple[torch.Tensor, Any, int | None]]) -> None:
    for p, fmt, axis in stored:
        p.copy_(fmt.quantize(p, axis=axis))


def _optimizer(model: nn.Module, options: TrialOptions) -> torch.optim.Optimizer:
    params = model.parameters()
    if options.optimizer == "adam":
        return torch.optim.Adam(params, lr=options.lr, weight_decay=options.weight_decay)
    return torch.optim.SGD(params, lr=options.lr, momentum=options.momentum, weight_decay=options.weight_decay)


def _train(
    model: nn.Module, task: TaskLike, options: TrialOptions, stored: list
) -> tuple[list[float], list[float], bool]:
    """Train in place; return (per-epoch mean training loss, per-epoch val accuracy, diverged).

    The curves hold the completed epochs only, so a trial that diverges in its first epoch
    has empty curves.
    """
    loss_fn = getattr(task, "loss_fn", TF.cross_entropy)
    opt = _optimizer(model, options)
    _store(stored)
    loss_curve: list[float] = []
    val_curve: list[float] = []
    initial = None
    for epoch in range(options.epochs):
        model.train()
        total, count = 0.0, 0
        for step, (x, y) in enumerate(task.train_batches(options.seed, epoch, batch_size=options.batch_size)):
            x, y = x.to(options.device), y.to(options.device)
            _check_finite(x, y, f"training batch {step} of epoch {epoch}")
            loss = loss_fn(model(x), y)
            value = loss.item()
            initial = value if initial is None else initial
            if not math.isfinite(value) or value > options.diverge_factor * initial:
                return loss_curve, val_curve, True
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            _store(stored)
            total, count = total + value * len(y), count + len(y)
        loss_curve.append(total / max(count, 1))
        val_curve.append(_evaluate(model, task, options.device)["accuracy"])
    return loss_curve, val_curve, False


def _check_finite(x: torch.Tensor, y: torch.Tensor, where: str) -> None:
    """Raise :class:`NonFiniteData` if float inputs or targets hold NaN or Inf.

    Costs one sum over the batch (NaN and Inf survive a sum; only a sum that is not finite,
    which huge finite values can also give, pays for the exact elementwise test) and, on an
    accelerator, one sync, which ``loss.item()`` makes anyway. Integer data (token ids,
    labels) cannot hold either and is skipped.
    """
    for name, t in (("inputs", x), ("targets", y)):
        if not (t.is_floating_point() or t.is_complex()) or bool(torch.isfinite(t.sum())):
            continue
        bad = ~torch.isfinite(t)
        if bad.any():
            rows = bad.reshape(len(t), -1).any(1).nonzero().flatten().tolist() if t.dim() else []
            raise NonFiniteData(
                f"{where} has {int(bad.sum())} NaN/Inf value(s) in its {name} (rows {rows[:10]} of the batch): "
                f"the data is at fault, not the training (this is not a divergence; lowering lr will not help); "
                f"clean or drop those samples")


def _evaluate(model: nn.Module, task: TaskLike, device: str) -> dict[str, float]:
    loss_fn = getattr(task, "loss_fn", TF.cross_entropy)
    return evaluate(model, task.val_batches(), loss_fn, device)
