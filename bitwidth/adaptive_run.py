"""``mode: adaptive``: one training run whose formats a :class:`~bitwidth.adaptive.PrecisionController` moves.

After the fp32 baseline (trained once, cached in the run directory like a search's), the
model trains from the baseline's initial weights, in its data order, with the controller
stepping after every optimizer step. The run writes into its run directory:

- ``schedule.csv``: (stretch of steps, site, kind) → format and bits (see
  :meth:`~bitwidth.adaptive.PrecisionController.schedule`);
- ``changes.csv``: every format change with the measurement that triggered it;
- ``adaptive.yaml``: final metrics, the criterion's verdict, divergence and back-offs,
  costs (average bits per kind, training BOPs relative to fp32), curves, and the comparison
  with fp32, uniform widths and the static joint plan of a training-mode search;
- ``checkpoints/<run>.pt``: model, optimizer, controller, RNG and position in the data,
  written every ``checkpoint_every`` steps and at the end.

**Divergence** (the training-mode rule: a loss that is NaN, infinite or above
``diverge_factor`` times the first batch's) is a result: the run restores its last
checkpoint, raises every width by ``backoff_bits`` (:meth:`PrecisionController.back_off`)
and trains on, at most ``max_backoffs`` times; then it stops and reports ``diverged``.

**Resume**: rerunning the config continues each run from its last checkpoint and gives the
same schedule as an uninterrupted run (same seed, same threads); a finished run is reused.
Evaluations run in a forked RNG, so they never change what training draws.

**Costs**: at each step, each site costs ``MACs × (w·a + g·w + g·a)`` at the widths then in
force (32 for a kind left at full precision), summed over steps and divided by the same sum
at fp32. ``avg_bits`` of a kind is its width averaged over steps and sites, weighted by
each site's MACs. The first step runs at fp32 (it is measured to set the first widths).

>>> AdaptiveSettings(every=0)
Traceback (most recent call last):
...
ValueError: every must be an integer >= 1 (measure one step in every), got 0
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as TF
import yaml

from . import rundir as rd
from .adaptive import FULL_BITS, PrecisionController, make_policies
from .cost import CostModel
from .store import atomic_file
from .tasks.base import TaskLike
from .trial import (
    Baseline,
    TrialOptions,
    TrialOutcome,
    _check_finite,
    _evaluate,
    _optimizer,
    _rng_devices,
    _store,
    _stored_formats,
    epoch_lr,
    set_lr,
    train_baseline,
)
from .wrap import KINDS

__all__ = ["AdaptiveResult", "AdaptiveRun", "AdaptiveSettings", "check_sites", "load_summary", "run_adaptive",
           "schedule_costs", "settings_from_config", "train_adaptive"]

log = logging.getLogger("bitwidth")


@dataclass(frozen=True)
class AdaptiveSettings:
    """The controller and the run's robustness settings (the config's ``adaptive`` section).

    >>> AdaptiveSettings(policies={"gradient": {"max_bits": 12}}).policies["gradient"]["max_bits"]
    12
    """

    sites: str | tuple[str, ...] = "*"
    kinds: tuple[str, ...] = KINDS
    every: int = 10
    policies: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    rounding: str = "nearest"
    backoff_bits: int = 2
    max_backoffs: int = 2
    checkpoint_every: int = 50

    def __post_init__(self) -> None:
        problems = []
        for name, lo, hi in (("every", 1, None), ("checkpoint_every", 1, None), ("backoff_bits", 1, 16),
                             ("max_backoffs", 0, 100)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
                rng = f"in {lo}..{hi}" if hi is not None else f">= {lo}"
                extra = " (measure one step in every)" if name == "every" else ""
                problems.append(f"{name} must be an integer {rng}{extra}, got {v!r}")
        try:
            make_policies(self.policies)
        except ValueError as err:
            problems.append(str(err))
        if problems:
            raise ValueError("; ".join(problems))

    def key(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))


@dataclass
class AdaptiveRun:
    """One training run under a controller: outcome, schedule, change log and how many steps it trained."""

    label: str
    outcome: TrialOutcome
    schedule: pd.DataFrame
    changes: pd.DataFrame
    steps: int  # optimizer steps of the finished schedule
    steps_trained: int  # steps actually computed, replays after a back-off included
    backoffs: int
    events: list[str]


# ----------------------------------------------------------------------------- one training run


def _snapshot(model: torch.nn.Module, opt: torch.optim.Optimizer, ctl: PrecisionController,
              pos: dict[str, Any]) -> dict[str, Any]:
    return {"model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "optimizer": copy.deepcopy(opt.state_dict()), "controller": copy.deepcopy(ctl.state_dict()),
            "rng": torch.get_rng_state(), "pos": copy.deepcopy(pos)}


def _restore(snap: dict[str, Any], model: torch.nn.Module, opt: torch.optim.Optimizer,
             ctl: PrecisionController) -> dict[str, Any]:
    model.load_state_dict(snap["model"])
    opt.load_state_dict(copy.deepcopy(snap["optimizer"]))
    ctl.load_state_dict(snap["controller"])
    torch.set_rng_state(snap["rng"])
    return copy.deepcopy(snap["pos"])


def train_adaptive(
    task: TaskLike, options: TrialOptions, baseline: Baseline, settings: AdaptiveSettings, *,
    pinned: int | None = None, checkpoint: str | Path | None = None, label: str = "adaptive",
    on_step: Callable[[int], None] | None = None,
) -> AdaptiveRun:
    """Train once from the baseline's initial weights with the controller (``pinned``: every width fixed).

    ``checkpoint``: a file to resume from and write (None: in memory only, still used to back off).
    ``on_step``: called with the number of steps trained after each one (progress).
    """
    key = json.dumps({"task": task.fingerprint(), "options": options.to_dict(), "settings": settings.key(),
                      "pinned": pinned, "baseline": baseline.key}, sort_keys=True, default=str)
    path = Path(checkpoint) if checkpoint is not None else None
    saved = _load_checkpoint(path, key)
    if saved is not None and saved.get("finished"):
        return _run_from(saved["finished"], label)
    start = time.perf_counter()
    loss_fn = getattr(task, "loss_fn", TF.cross_entropy)
    with torch.random.fork_rng(devices=_rng_devices(options.device)):
        torch.manual_seed(options.seed)
        model = task.build_model(options.seed)
        model.load_state_dict(baseline.init_state_dict)
        model.to(options.device)
        ctl = PrecisionController(model, sites=list(settings.sites) if not isinstance(settings.sites, str)
                                  else settings.sites, kinds=settings.kinds, every=settings.every,
                                  policies=settings.policies, rounding=settings.rounding, pinned=pinned,
                                  seed=options.seed)
        opt = _optimizer(model, options)
        pos: dict[str, Any] = {"epoch": 0, "batch": 0, "initial": None, "total": 0.0, "count": 0,
                               "loss_curve": [], "val_curve": [], "steps_trained": 0, "events": []}
        stored = options.master_weights == "quantized"
        if saved is not None:
            pos = _restore(saved["snapshot"], model, opt, ctl)
            log.info("%s: resumed from %s at step %d", label, path, ctl.step_index)
        last = _snapshot(model, opt, ctl, pos)
        if saved is None:
            _save_checkpoint(path, key, last)
        diverged = False
        try:
            while True:
                restart = False
                for epoch in range(pos["epoch"], options.stop_epoch or options.epochs):
                    set_lr(opt, epoch_lr(options, epoch))
                    model.train()
                    batches = task.train_batches(options.seed, epoch, batch_size=options.batch_size)
                    for i, (x, y) in enumerate(batches):
                        if i < pos["batch"]:
                            continue  # resuming mid-epoch: the data order is the epoch's, skip what was trained
                        x, y = x.to(options.device), y.to(options.device)
                        _check_finite(x, y, f"training batch {i} of epoch {epoch}")
                        loss = loss_fn(model(x), y)
                        value = loss.item()
                        pos["initial"] = value if pos["initial"] is None else pos["initial"]
                        if not math.isfinite(value) or value > options.diverge_factor * pos["initial"]:
                            step = ctl.step_index
                            if ctl.backoffs >= settings.max_backoffs:
                                pos["events"].append(f"diverged at step {step} (loss {value:.4g}); "
                                                     f"{ctl.backoffs} back-off(s) used, training stopped")
                                diverged = True
                                break
                            events = pos["events"] + [
                                f"diverged at step {step} (loss {value:.4g}): back to the checkpoint of step "
                                f"{last['controller']['step']}, every width +{settings.backoff_bits} bits"]
                            trained = pos["steps_trained"]
                            pos = _restore(last, model, opt, ctl)
                            pos["events"], pos["steps_trained"] = events, trained
                            ctl.back_off(settings.backoff_bits)
                            log.info("%s: %s", label, events[-1])
                            last = _snapshot(model, opt, ctl, pos)
                            restart = True
                            break
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        ctl.step()
                        if stored:
                            _store(_stored_formats(model))
                        pos["total"] += value * len(y)
                        pos["count"] += len(y)
                        pos["batch"] = i + 1
                        pos["steps_trained"] += 1
                        if on_step is not None:
                            on_step(pos["steps_trained"])
                        if ctl.step_index % settings.checkpoint_every == 0:
                            last = _snapshot(model, opt, ctl, pos)
                            _save_checkpoint(path, key, last)
                    if diverged or restart:
                        break
                    pos["loss_curve"].append(pos["total"] / max(pos["count"], 1))
                    with ctl.paused(), torch.random.fork_rng(devices=_rng_devices(options.device)):
                        pos["val_curve"].append(_evaluate(model, task, options.device)["accuracy"])
                    pos.update(epoch=epoch + 1, batch=0, total=0.0, count=0)
                if not restart:
                    break
            ctl.close()
            with torch.random.fork_rng(devices=_rng_devices(options.device)):
                metrics = _evaluate(model, task, options.device)
        finally:
            ctl.close()
    if pos["loss_curve"]:
        metrics["train_loss"] = pos["loss_curve"][-1]
    outcome = TrialOutcome(metrics, pos["loss_curve"], pos["val_curve"], diverged,
                           time.perf_counter() - start)
    steps = ctl.step_index
    finished = {"outcome": outcome.to_dict(), "schedule": ctl.schedule(steps).to_dict(orient="list"),
                "changes": ctl.changes_frame().to_dict(orient="list"), "steps": steps,
                "steps_trained": pos["steps_trained"], "backoffs": ctl.backoffs, "events": pos["events"]}
    _save_checkpoint(path, key, None, finished)
    return _run_from(finished, label)


def _run_from(finished: Mapping[str, Any], label: str) -> AdaptiveRun:
    return AdaptiveRun(label, TrialOutcome.from_dict(finished["outcome"]), pd.DataFrame(finished["schedule"]),
                       pd.DataFrame(finished["changes"]), int(finished["steps"]), int(finished["steps_trained"]),
                       int(finished["backoffs"]), list(finished["events"]))


def _load_checkpoint(path: Path | None, key: str) -> dict[str, Any] | None:
    if path is None or not path.exists():
        return None
    try:
        saved = torch.load(path, weights_only=True)
    except Exception:  # an unreadable checkpoint is retrained, never trusted
        log.warning("checkpoint %s cannot be read: training from the start", path)
        return None
    if not isinstance(saved, dict) or saved.get("key") != key:
        log.info("checkpoint %s belongs to other settings: training from the start", path)
        return None
    return saved


def _save_checkpoint(path: Path | None, key: str, snapshot: dict[str, Any] | None,
                     finished: dict[str, Any] | None = None) -> None:
    if path is None:
        return
    with atomic_file(path, "wb") as f:
        torch.save({"key": key, "snapshot": snapshot, "finished": finished}, f)


# ----------------------------------------------------------------------------- costs


def schedule_costs(schedule: pd.DataFrame, costs: CostModel) -> dict[str, float]:
    """Training BOPs of a schedule relative to fp32 over the same steps, and each kind's MAC-weighted mean bits.

    >>> from bitwidth.cost import LayerCost
    >>> sched = pd.DataFrame({"step": [0, 0, 0], "steps": [2, 2, 2], "site": ["fc"] * 3,
    ...                       "kind": ["weight", "activation", "gradient"], "bits": [8, 8, 16]})
    >>> {k: round(v, 3) for k, v in schedule_costs(sched, CostModel({"fc": LayerCost(4, 4)})).items()}
    {'train_bops_vs_fp32': 0.104, 'avg_bits_weight': 8.0, 'avg_bits_activation': 8.0, 'avg_bits_gradient': 16.0}
    """
    total = full = 0.0
    bits_sum = dict.fromkeys(KINDS, 0.0)
    weight_sum = dict.fromkeys(KINDS, 0.0)
    steps = 0
    for _, stretch in schedule.groupby("step", sort=True):
        n = int(stretch["steps"].iloc[0])
        steps += n
        bits = {(r.site, r.kind): int(r.bits) for r in stretch.itertuples()}
        for site, size in costs.layers.items():
            w, a, g = (bits.get((site, k), FULL_BITS) for k in KINDS)
            w = a if size.weightless else w
            total += n * size.macs * (w * a + g * w + g * a)
            full += n * size.macs * 3 * FULL_BITS**2
            for kind, b in zip(KINDS, (w, a, g), strict=True):
                if (site, kind) in bits:
                    bits_sum[kind] += n * size.macs * b
                    weight_sum[kind] += n * size.macs
    out = {"train_bops_vs_fp32": total / full if full else math.nan}
    out.update({f"avg_bits_{k}": bits_sum[k] / weight_sum[k] if weight_sum[k] else math.nan for k in KINDS})
    return out


# ----------------------------------------------------------------------------- a config run


@dataclass
class AdaptiveResult:
    """What ``mode: adaptive`` found: ``summary`` (as in ``adaptive.yaml``) and the adaptive run itself."""

    summary: dict[str, Any]
    run: AdaptiveRun

    def answer_lines(self) -> list[str]:
        """The lines ``bitwidth run`` prints."""
        s, c = self.summary, self.summary["costs"]
        metric = s["metric_name"]
        verdict = "passes" if s["passed"] else ("DIVERGED" if s["diverged"] else "FAILS")
        lines = [f"adaptive run: {verdict} the {s['criterion']['name']} criterion with {metric} "
                 f"{s['metrics'].get(metric, math.nan):.4f} (fp32 {s['baseline_metrics'].get(metric, math.nan):.4f});"
                 f" training BOPs {c['train_bops_vs_fp32']:.2%} of fp32; mean bits " + ", ".join(
                     f"{k} {c[f'avg_bits_{k}']:.1f}" for k in KINDS if math.isfinite(c[f"avg_bits_{k}"]))]
        lines += [f"  {e}" for e in s["events"]]
        return lines


def settings_from_config(cfg: Any) -> AdaptiveSettings:
    """The :class:`AdaptiveSettings` of a config's ``adaptive`` section."""
    a = cfg.adaptive
    policies = {k: {f: v for f, v in getattr(a, k).model_dump().items() if v is not None} for k in KINDS}
    return AdaptiveSettings(sites=a.sites if isinstance(a.sites, str) else tuple(a.sites), kinds=tuple(a.kinds),
                            every=a.every, policies=policies, rounding=a.rounding, backoff_bits=a.backoff_bits,
                            max_backoffs=a.max_backoffs, checkpoint_every=a.checkpoint_every)


def check_sites(cfg: Any, task: TaskLike) -> None:
    """``ValueError`` naming every ``adaptive.sites`` pattern that matches no site of the task's model."""
    a = cfg.adaptive
    PrecisionController(task.build_model(cfg.seeds[0]), sites=a.sites, kinds=a.kinds).close()


def run_adaptive(cfg: Any, task: TaskLike, run_dir: Path, *, fresh: bool = False,
                 progress: Callable[[Any], None] | None = None) -> AdaptiveResult:
    """``mode: adaptive`` into ``run_dir``: baseline, the adaptive run, the uniform runs asked for, the files."""
    from .runner import ProgressEvent

    check_sites(cfg, task)  # a typo fails now, not after the baseline trained
    options = TrialOptions(mode="train", seed=cfg.seeds[0], **cfg.train.model_dump())
    settings = settings_from_config(cfg)
    ckpt_dir = run_dir / rd.CHECKPOINTS
    if fresh and ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    widths = list(dict.fromkeys(cfg.adaptive.uniform))
    runs_planned = 1 + len(widths)

    def say(phase: str, done: int, message: str = "") -> None:
        if progress is not None:
            progress(ProgressEvent(phase, done, 0, message, runs_planned))

    say("baseline", 0, "the fp32 baseline (trained once, then reused from the run directory)")
    baseline = train_baseline(task, options, cache_dir=run_dir)
    criterion = cfg.criterion.build()
    say("adaptive", 0, f"1 adaptive training run and {len(widths)} uniform one(s)")
    runs = {"adaptive": train_adaptive(task, options, baseline, settings, checkpoint=ckpt_dir / "adaptive.pt")}
    for i, bits in enumerate(widths):
        say("adaptive", i + 1)
        label = f"uniform{bits}"
        runs[label] = train_adaptive(task, options, baseline, settings, pinned=bits,
                                     checkpoint=ckpt_dir / f"{label}.pt", label=label)
    say("adaptive", runs_planned, "done")
    costs = CostModel.measure(task.build_model(options.seed), task.example_input())
    steps_per_run = options.epochs * sum(1 for _ in task.train_batches(options.seed, 0, options.batch_size))
    static = _static_plan(cfg, run_dir, task, steps_per_run)
    summary = _summary(cfg, runs, baseline, criterion, costs, steps_per_run, static, settings)
    main = runs["adaptive"]
    main.schedule.to_csv(run_dir / rd.SCHEDULE, index=False)
    main.changes.to_csv(run_dir / rd.CHANGES, index=False)
    with atomic_file(run_dir / rd.ADAPTIVE, "w", encoding="utf-8") as f:
        yaml.safe_dump(summary, f, sort_keys=False)
    return AdaptiveResult(summary, main)


def _passes(criterion: Any, outcome: TrialOutcome, baseline: Baseline) -> bool:
    return bool(criterion.passes(outcome, baseline.metrics, baseline.loss_curve))


def _summary(cfg: Any, runs: dict[str, AdaptiveRun], baseline: Baseline, criterion: Any, costs: CostModel,
             steps_per_run: int, static: dict[str, Any] | None, settings: AdaptiveSettings) -> dict[str, Any]:
    metric = criterion.metric
    main = runs["adaptive"]
    rows = [{"plan": "fp32", "passed": True, metric: baseline.metrics.get(metric), "train_bops_vs_fp32": 1.0,
             **{f"avg_bits_{k}": float(FULL_BITS) for k in KINDS}, "training_runs": 1,
             "training_steps": steps_per_run}]
    for label, run in runs.items():
        rows.append({"plan": label, "passed": _passes(criterion, run.outcome, baseline),
                     metric: run.outcome.metrics.get(metric), **schedule_costs(run.schedule, costs),
                     "training_runs": 2, "training_steps": steps_per_run + run.steps_trained})
    if static is not None:
        rows += static["rows"]
    adaptive_costs = schedule_costs(main.schedule, costs)
    return _plain({
        "metric_name": metric, "criterion": criterion.to_dict(),
        "passed": _passes(criterion, main.outcome, baseline), "diverged": main.outcome.diverged,
        "backoffs": main.backoffs, "events": main.events, "metrics": main.outcome.metrics,
        "baseline_metrics": baseline.metrics, "costs": adaptive_costs,
        "steps": main.steps, "steps_trained": main.steps_trained, "steps_per_run": steps_per_run,
        "changes": int(len(main.changes)), "wall_time_s": round(main.outcome.wall_time, 2),
        "curves": {label: {"loss": r.outcome.loss_curve, "accuracy": r.outcome.val_curve} for label, r in runs.items()}
        | {"fp32": {"loss": baseline.loss_curve, "accuracy": baseline.val_curve}},
        "comparison": rows, "static_plan": None if static is None else static["source"],
        "static_note": None if static is None else static["note"],
        "settings": {**settings.key(), "policies": {k: dataclasses.asdict(p) for k, p in
                                                    make_policies(settings.policies).items()}},
        "config": {"task": dict(cfg.task.model_dump()), "seed": cfg.seeds[0], "train": cfg.train.model_dump()},
    })


def _static_plan(cfg: Any, run_dir: Path, task: TaskLike, steps_per_run: int) -> dict[str, Any] | None:
    """Rows for the static joint plan (and best uniform width) of a training-mode search, when one is found.

    Looked for in ``adaptive.static_plan`` (a run directory) or in ``run_dir`` itself.
    """
    from .result import SearchResult

    places = [Path(cfg.adaptive.static_plan)] if cfg.adaptive.static_plan else [run_dir]
    for place in places:
        try:
            res = SearchResult.load(place)
        except (ValueError, OSError):
            continue
        conf = res.summary.get("config", {})
        if conf.get("mode") != "train":
            continue
        counts = res.summary.get("counts", {})
        trials = int(counts.get("trials_run", 0) or 0) + int(counts.get("trials_reused", 0) or 0)
        seeds = len(conf.get("seeds", [0])) or 1
        same = json.dumps(conf.get("task"), sort_keys=True, default=str) == json.dumps(
            task.fingerprint(), sort_keys=True, default=str)
        trained = conf.get("trial_options", {})
        same_train = all(trained.get(k) == getattr(cfg.train, k) for k in ("epochs", "lr", "batch_size", "optimizer")
                         if k in trained)
        note = "" if same and same_train else (
            "the search ran on another task or training settings: its costs and steps are not comparable")
        rows = []
        costs = res.costs
        metric = res.summary.get("baseline", {}).get("metric_name", "accuracy")
        steps = (trials + seeds) * steps_per_run  # every trial trains once, each seed's baseline once
        for label, part, plan_row in (("static joint plan", "joint", "joint"), ("uniform (search)", "uniform",
                                                                              "uniform")):
            info = res.summary.get(part, {})
            if plan_row not in costs.index or not costs.loc[plan_row].notna().any():
                continue
            bits = f" {info.get('bits')}" if part == "uniform" else ""
            rows.append({"plan": label + bits, "passed": bool(info.get("passed")), metric: info.get("metric"),
                         "train_bops_vs_fp32": float(costs.loc[plan_row, "train_bops_vs_fp32"]),
                         "training_runs": trials + seeds, "training_steps": steps})
        return {"source": str(place), "rows": rows, "note": note}
    return None


def _plain(x: Any) -> Any:
    """YAML-ready: numpy scalars as Python numbers, NaN kept as .nan, tuples as lists."""
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        return x.item()
    return x


def load_summary(run_dir: str | Path) -> dict[str, Any] | None:
    """``adaptive.yaml`` of a run directory, or None."""
    path = Path(run_dir) / rd.ADAPTIVE
    if not path.exists():
        return None
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    return data if isinstance(data, dict) else None

