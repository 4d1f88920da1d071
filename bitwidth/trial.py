"""Trials: one plan evaluated in one mode, against an fp32 baseline trained once.

``ptq``: load the baseline weights, apply the plan, calibrate activation ranges, evaluate.
``train``: train from the baseline's initial weights, in the baseline's data order, with
the plan active in forward and backward; record the per-epoch curves.

Divergence rule (train mode): training stops and the trial is marked ``diverged`` as soon
as a batch's loss is NaN or infinite, or exceeds ``diverge_factor`` times the initial loss
(the loss of the very first batch, before any update). The remaining epochs are skipped.

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
import os
import time
import traceback
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as TF
from torch import nn

from .sites import engine_of
from .tasks.base import TaskLike, digest, evaluate
from .wrap import Plan, calibrate, resolve_plan, set_plan, wrap

__all__ = [
    "BASELINE_FILE",
    "MASTER_WEIGHTS",
    "MODES",
    "OPTIMIZERS",
    "Baseline",
    "TrialOptions",
    "TrialOutcome",
    "run_trial",
    "train_baseline",
]

MODES = ("ptq", "train")
OPTIMIZERS = ("sgd", "adam")
MASTER_WEIGHTS = ("fp32", "quantized")
BASELINE_FILE = "baseline.pt"
# The options that change how the baseline is trained; the others only change trials.
_TRAINING_KEYS = ("seed", "epochs", "lr", "batch_size", "optimizer", "momentum", "weight_decay", "device")


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
    epochs: int = 10
    lr: float = 0.05
    batch_size: int = 32
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    calib_batches: int = 4
    master_weights: str = "fp32"
    diverge_factor: float = 10.0
    device: str = "cpu"

    def __post_init__(self) -> None:
        _choice("mode", self.mode, MODES)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("master_weights", self.master_weights, MASTER_WEIGHTS)
        for key, lo in (("seed", 0), ("epochs", 1), ("batch_size", 1), ("calib_batches", 0)):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < lo:
                raise ValueError(f"{key} must be an integer >= {lo}, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if not 0 <= self.momentum < 1 or not self.weight_decay >= 0:
            raise ValueError(f"momentum must be in [0, 1) and weight_decay >= 0, "
                             f"got {self.momentum!r}, {self.weight_decay!r}")
        if not self.diverge_factor > 1:
            raise ValueError(f"diverge_factor must be > 1, got {self.diverge_factor!r}")

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

def train_baseline(task: TaskLike, options: TrialOptions, cache_dir: Path | str | None = None) -> Baseline:
    """Train the fp32 baseline, or reuse ``cache_dir/baseline.pt`` when it matches exactly.

    The file holds one entry per seed of the same task and training options; an entry
    whose key (task fingerprint, seed, training options) differs is retrained, and entries
    of another task or other options are dropped when the file is rewritten.
    """
    key = {"task": task.fingerprint(), **options.training_key()}
    key_json = json.dumps(key, sort_keys=True, default=str)
    path = Path(cache_dir) / BASELINE_FILE if cache_dir is not None else None
    entries = _load_entries(path)
    hit = entries.get(digest(key_json.encode()))
    if hit is not None and hit["key"] == key_json:
        return _baseline_from_entry(hit, key)

    with torch.random.fork_rng(devices=_rng_devices(options.device)):
        torch.manual_seed(options.seed)
        model = task.build_model(options.seed).to(options.device)
        init = _cpu_state(model)
        loss_curve, val_curve, diverged = _train(model, task, options, [])
        metrics = _evaluate(model, task, options.device)
    if diverged:
        raise RuntimeError(f"the fp32 baseline diverged (loss curve {loss_curve}); lower lr or change options")
    base = Baseline(_cpu_state(model), metrics, loss_curve, init, val_curve, key)
    if path is not None:
        same_config = {k: e for k, e in entries.items() if _same_config(e["key"], key)}
        same_config[digest(key_json.encode())] = {
            "key": key_json, "state_dict": base.state_dict, "init_state_dict": init,
            "metrics": metrics, "loss_curve": loss_curve, "val_curve": val_curve,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".pt.tmp")
        torch.save(same_config, tmp)
        os.replace(tmp, path)  # atomic: a killed run never leaves a half-written baseline
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
        for x, y in task.train_batches(options.seed, epoch, batch_size=options.batch_size):
            x, y = x.to(options.device), y.to(options.device)
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


def _evaluate(model: nn.Module, task: TaskLike, device: str) -> dict[str, float]:
    loss_fn = getattr(task, "loss_fn", TF.cross_entropy)
    return evaluate(model, task.val_batches(), loss_fn, device)
