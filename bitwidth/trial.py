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
from .early_stop import EarlyStop, decide, hoeffding_bound, looks, mean_bound, wilson_bound
from .formats import IntFormat
from .sites import engine_of
from .store import atomic_file
from .tasks.base import TaskLike, _class_dim, digest, evaluate
from .wrap import Plan, as_spec, calibrate, resolve_plan, set_plan, wrap

__all__ = [
    "BASELINE_FILE",
    "CHANCE_MARGIN",
    "MASTER_WEIGHTS",
    "MODES",
    "OPTIMIZERS",
    "Baseline",
    "BaselineAtChance",
    "NonFiniteData",
    "TrialCache",
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
_TRAINING_KEYS = ("seed", "epochs", "lr", "batch_size", "optimizer", "momentum", "weight_decay", "lr_schedule",
                  "stop_epoch", "device")
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
    lr_schedule: str = _TRAIN.lr_schedule
    stop_epoch: int | None = _TRAIN.stop_epoch
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
    samples: int | None = None  # validation samples evaluated (post-training)
    early_stop: dict[str, Any] | None = None  # the early stop's record: samples, of, decision, bound, threshold

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

def run_trial(task: TaskLike, plan: Plan, options: TrialOptions, baseline: Baseline, *,
              early_stop: EarlyStop | None = None, cache: TrialCache | None = None) -> TrialOutcome:
    """Evaluate ``plan`` in ``options.mode``; divergence and runtime errors are reported, not raised.

    A plan naming no layer of the model raises ``ValueError`` before anything runs.
    ``early_stop`` (post-training only; a training run always trains to the end) evaluates
    batch by batch and stops once a confidence bound decides the verdict
    (:mod:`bitwidth.early_stop`); the outcome then holds the metrics of the samples seen,
    ``samples`` and the decision in ``early_stop``. ``cache`` (post-training only) reuses
    one wrapped model, its fp32 calibration and the validation data across the trials of
    a process: the outcome is the same as without it, bit for bit.
    """
    start = time.perf_counter()
    if options.mode != "ptq" and early_stop is not None:
        raise ValueError("early stopping is for post-training trials (mode 'ptq'); a training run trains fully")
    with torch.random.fork_rng(devices=_rng_devices(options.device)):
        torch.manual_seed(options.seed)
        if options.mode == "ptq" and cache is not None:
            model = cache.model(task, options, baseline)
        else:
            model = task.build_model(options.seed)
        resolve_plan(model, plan)  # a bad plan is the caller's error: raise it now
        try:
            if options.mode == "ptq":
                outcome = _ptq(model, task, plan, options, baseline, early_stop, cache)
            else:
                outcome = _train_trial(model, task, plan, options, baseline)
        except Exception as err:  # a trial that crashes must not stop a search of hundreds
            msg = traceback.format_exception_only(type(err), err)[-1].strip()
            outcome = TrialOutcome({"accuracy": float("nan"), "loss": float("nan")}, error=msg)
    outcome.wall_time = time.perf_counter() - start
    return outcome


def _ptq(model: nn.Module, task: TaskLike, plan: Plan, options: TrialOptions, baseline: Baseline,
         early_stop: EarlyStop | None, cache: TrialCache | None) -> TrialOutcome:
    if cache is None:
        model.load_state_dict(baseline.state_dict)
        model.to(options.device)
        wrap(model)
    set_plan(model, plan)
    if options.calib_batches and _needs_calibration(plan):
        if cache is None:
            calibrate(model, [x.to(options.device) for x, _ in task.calib_batches(options.calib_batches)])
        elif not cache.reuse_calibration(model, plan):
            calibrate(model, cache.calib(task, options))
    loss_fn = getattr(task, "loss_fn", TF.cross_entropy)
    if early_stop is not None:
        data = cache.val_tensors(task, options.device) if cache is not None else _val_tensors(task, options.device)
        if data is not None:
            metrics, info = _evaluate_early(model, data, loss_fn, early_stop, task)
            return TrialOutcome(metrics, samples=info["samples"], early_stop=info)
    seen = [0]
    batches = cache.val_batches(task, options.device) if cache is not None else task.val_batches()
    metrics = evaluate(model, _counted(batches, seen), loss_fn, options.device)
    return TrialOutcome(metrics, samples=seen[0])


def _counted(batches: Any, seen: list[int]) -> Any:
    """``batches`` as they are, adding each batch's number of samples to ``seen[0]``."""
    for x, y in batches:
        seen[0] += len(y)
        yield x, y


def _needs_calibration(plan: Plan) -> bool:
    """Only integer activations read the calibrated ranges."""
    return any(isinstance(as_spec(spec).activation, IntFormat) for spec in plan.values())


# The validation data kept in memory for reuse, at most this many bytes (larger sets stream from the task).
VAL_CACHE_BYTES = 1 << 29


def _val_tensors(task: TaskLike, device: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The validation inputs and targets in one fixed random order (seed 0), or None when the
    batches cannot be joined (differing shapes) or exceed :data:`VAL_CACHE_BYTES`.

    The order is random so that any prefix is a random sample of the set (what the early
    stop's bounds assume), and fixed so that every trial sees the same samples first.
    """
    xs, ys, size = [], [], 0
    for x, y in task.val_batches():
        size += x.nelement() * x.element_size() + y.nelement() * y.element_size()
        if size > VAL_CACHE_BYTES:
            return None
        xs.append(x)
        ys.append(y)
    try:
        x, y = torch.cat(xs), torch.cat(ys)
    except RuntimeError:  # samples of differing shapes
        return None
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return x[order].to(device), y[order].to(device)


def _per_sample_loss(loss_fn: Any, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each sample's mean loss over its predictions, (N,): one call where the loss takes
    ``reduction="none"``, else one call per sample."""
    try:
        per = loss_fn(out, y, reduction="none")
    except TypeError:
        per = None
    if per is not None and per.shape[:1] == y.shape[:1]:
        return per.reshape(len(y), -1).float().mean(1)
    return torch.stack([loss_fn(out[i:i + 1], y[i:i + 1]).float() for i in range(len(y))])


@torch.no_grad()
def _evaluate_early(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], loss_fn: Any,
                    stop: EarlyStop, task: TaskLike) -> tuple[dict[str, float], dict[str, Any]]:
    """Metrics of the first samples of ``data`` and the early stop's record: look after
    ``looks(N)`` samples, stop at the first decided bound (see :mod:`bitwidth.early_stop`)."""
    x_all, y_all = data
    total = len(y_all)
    batch = max(1, int(getattr(task, "eval_batch_size", 512)))
    delta = stop.delta(total)
    was_training = model.training
    model.eval()
    correct, preds, loss_sum, seen = 0, 0, 0.0, 0
    shares: list[torch.Tensor] = []  # per sample: share of right predictions (accuracy) or mean loss
    scored, decision, bound = True, None, (math.nan, math.nan)
    try:
        for target in looks(total, stop.min_samples):
            while seen < target:
                x, y = x_all[seen:min(target, seen + batch)], y_all[seen:min(target, seen + batch)]
                out = model(x)  # (N, C), (N, C, ...) or (B, T, V)
                loss_sum += float(loss_fn(out, y)) * y.numel()
                dim = _class_dim(out, y)
                scored = scored and dim is not None
                if dim is not None:
                    right = (out.argmax(dim=dim) == y).reshape(len(y), -1)
                    correct += int(right.sum())
                    if stop.metric == "accuracy":
                        shares.append(right.float().mean(1).cpu())
                if stop.metric == "loss":
                    shares.append(_per_sample_loss(loss_fn, out, y).cpu())
                preds += y.numel()
                seen += len(y)
            metrics = {"accuracy": correct / preds if scored else math.nan, "loss": loss_sum / preds}
            if seen == total or not math.isfinite(metrics[stop.metric]):
                value = metrics[stop.metric]
                bound = (value, value)
                break
            values = torch.cat(shares).double()
            if stop.metric == "loss":
                bound = mean_bound(float(values.mean()), float(values.std()), seen, total, delta)
            elif y_all.dim() == 1:  # one prediction per sample: a share of successes
                bound = wilson_bound(float(values.sum()), seen, total, delta)
            else:
                bound = hoeffding_bound(float(values.mean()), seen, total, delta)
            decision = decide(bound, stop)
            if decision is not None:
                break
    finally:
        model.train(was_training)
    info = {"samples": seen, "of": total, "decision": decision, "bound": [float(b) for b in bound],
            **stop.to_dict()}
    return metrics, info


class TrialCache:
    """What the post-training trials of one process share, built on first use.

    Per seed: the model built, loaded with the baseline's weights and wrapped once (a
    trial then only sets its plan), the random state a fresh build leaves (restored for
    every trial, so a reused model draws what a new one would), and the calibration of
    the fp32 model. That calibration is the one a plan quantizing a single site would
    compute for it (nothing upstream of the site is quantized), so such plans reuse it
    (round-to-nearest formats only: stochastic rounding would draw from the random state
    during calibration). Also the validation data, in memory. Pickling drops all of it:
    every worker builds its own.

    >>> from bitwidth.tasks import make_task
    >>> task, opts = make_task("digits_mlp"), TrialOptions(epochs=1)
    >>> base, cache = train_baseline(task, opts), TrialCache()
    >>> a = run_trial(task, {"fc1": "int4"}, opts, base, cache=cache).metrics
    >>> a == run_trial(task, {"fc1": "int4"}, opts, base).metrics
    True
    """

    def __init__(self) -> None:
        self._models: dict[tuple, tuple[nn.Module, torch.Tensor, dict[str, Any], set[str]]] = {}
        self._val: dict[tuple, Any] = {}
        self._current: tuple | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]

    def model(self, task: TaskLike, options: TrialOptions, baseline: Baseline) -> nn.Module:
        """The wrapped model of ``options.seed``; call right after ``torch.manual_seed(seed)``."""
        key = (id(task), options.seed, options.device, id(baseline.state_dict))
        if key not in self._models:
            model = task.build_model(options.seed)
            rng = torch.get_rng_state()
            model.load_state_dict(baseline.state_dict)
            model.to(options.device)
            wrap(model)
            calib, once = self._fp32_calibration(model, task, options)
            self._models[key] = (model, rng, calib, once)
        model, rng, _, _ = self._models[key]
        torch.set_rng_state(rng)
        self._current = key
        return model

    def _fp32_calibration(self, model: nn.Module, task: TaskLike,
                          options: TrialOptions) -> tuple[dict[str, Any], set[str]]:
        """Each site's calibration with nothing quantized, and the sites observed once per forward."""
        if not options.calib_batches:
            return {}, set()
        eng = engine_of(model)
        counts: dict[str, int] = {}

        def count(site: str, kind: str, x: Any, quantized: bool) -> None:
            if kind == "activation" and not quantized:
                counts[site] = counts.get(site, 0) + 1

        batches = self.calib(task, options)
        eng.taps.append(count)
        try:
            calibrate(model, batches)
        finally:
            eng.taps.remove(count)
            eng.refresh()
        once = {site for site, n in counts.items() if n == len(batches)}
        return {name: dict(st.calib) for name, st in eng.states.items() if st.calib is not None}, once

    def reuse_calibration(self, model: nn.Module, plan: Plan) -> bool:
        """Give a single-site, round-to-nearest plan its site's fp32 calibration; False when that would differ."""
        if self._current is None or len(plan) != 1:
            return False
        (site, spec), = plan.items()
        spec = as_spec(spec)
        _, _, calib, once = self._models[self._current]
        formats = [f for f in (spec.weight, spec.activation) if f is not None]
        if site not in once or site not in calib or any(f.rounding != "nearest" for f in formats):
            return False
        eng = engine_of(model)
        for st in eng.states.values():
            st.calib = None
        eng.state(site).calib = dict(calib[site])
        return True

    def calib(self, task: TaskLike, options: TrialOptions) -> list[torch.Tensor]:
        """The calibration inputs, on the device."""
        key = ("calib", id(task), options.calib_batches, options.device)
        if key not in self._val:
            self._val[key] = [x.to(options.device) for x, _ in task.calib_batches(options.calib_batches)]
        return self._val[key]

    def val_tensors(self, task: TaskLike, device: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The validation set in the early stop's fixed random order (see :func:`_val_tensors`)."""
        key = ("tensors", id(task), device)
        if key not in self._val:
            self._val[key] = _val_tensors(task, device)
        return self._val[key]

    def val_batches(self, task: TaskLike, device: str) -> Any:
        """The validation batches, on the device, kept when they fit :data:`VAL_CACHE_BYTES`."""
        key = ("batches", id(task), device)
        if key not in self._val:
            batches, size = [], 0
            for x, y in task.val_batches():
                size += x.nelement() * x.element_size() + y.nelement() * y.element_size()
                if size > VAL_CACHE_BYTES:
                    batches = None
                    break
                batches.append((x.to(device), y.to(device)))
            self._val[key] = batches
        return task.val_batches() if self._val[key] is None else self._val[key]


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


def epoch_lr(options: TrialOptions, epoch: int) -> float:
    """The learning rate of ``epoch`` (0-based) under ``options.lr_schedule``.

    Cosine takes each epoch's midpoint, so no epoch trains at exactly zero; it is a function
    of the epoch alone, so a run resumed mid-training gets the same rates.

    >>> [round(epoch_lr(TrialOptions(epochs=4, lr=1.0, lr_schedule="cosine"), e), 3) for e in range(4)]
    [0.962, 0.691, 0.309, 0.038]
    """
    if options.lr_schedule == "cosine":
        return options.lr * 0.5 * (1 + math.cos(math.pi * (epoch + 0.5) / options.epochs))
    return options.lr


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate."""
    for group in opt.param_groups:
        group["lr"] = lr


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
    for epoch in range(options.stop_epoch or options.epochs):
        set_lr(opt, epoch_lr(options, epoch))
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
