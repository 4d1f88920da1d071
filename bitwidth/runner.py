"""The search loop: baseline, trial store, strategy, joint and uniform steps, result files.

Only this module knows the whole loop. It trains (or loads) the fp32 baseline of every
seed, builds the ``evaluate`` callable the strategies use (each plan's trials are looked
up in the store and otherwise run through the executor, and stored the moment each one
finishes), runs the per-layer strategy, the joint step and the uniform search, and
writes the result into the run directory.

Trials run through an executor of :mod:`bitwidth.executors` (``map_unordered(fn,
context, items)`` yielding ``Done`` results as they finish): serial by default, a
process pool or Ray when given. Only this process writes the store. A trial that raised
is stored as failed with its error text; a trial whose worker died is retried once in
the same round and, if lost again, fails this round without being stored, so a rerun
tries it again.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch.nn.functional as TF
from torch import nn

from . import rundir as rd
from . import trial as _trial
from .config import check_search_inputs
from .cost import COST_MEASURES, CostModel
from .coverage import coverage, weigh
from .early_stop import METRICS as EARLY_METRICS
from .early_stop import EarlyStop
from .executors import Executor, make_executor
from .families import make_format, needs_absmax
from .formats import Format
from .search import (
    Pair,
    SearchResult,
    SearchSpace,
    Verdict,
    bisect,
    grid,
    joint,
    ordered_joint,
    predict,
    together,
    uniform,
)
from .stats import record
from .store import TrialStore, trial_key
from .wrap import QuantSpec, plan_from_dict, plan_to_dict, resolve_plan

__all__ = ["select_layers", "select_pairs", "STORE_FILE", "ProgressEvent", "TrialContext", "run_search",
           "run_trial_item"]

STORE_FILE = rd.TRIALS
# Above this many (site, kind) pairs the post-training joint step is lazy (see _search).
EXHAUSTIVE_JOINT_PAIRS = 16
# The chance that an early-stopped trial's verdict differs from its full evaluation's (per trial).
DEFAULT_EARLY_STOP_ERROR = 0.01


@dataclass(frozen=True)
class ProgressEvent:
    """Sent to ``progress`` when a phase starts and after every trial that finishes."""

    phase: str
    trials_run: int
    trials_reused: int
    message: str = ""
    planned: int = 0  # trials expected by the end of this phase (an estimate for adaptive strategies)


@dataclass
class TrialContext:
    """What every trial of a search shares: shipped to each worker once, not once per trial.

    ``cache`` travels empty: each worker fills its own (a wrapped model per seed, the data).
    """

    task: Any
    options: _trial.TrialOptions
    baselines: dict[int, _trial.Baseline]
    cache: _trial.TrialCache = dataclasses.field(default_factory=_trial.TrialCache)


def run_trial_item(context: TrialContext, item: tuple) -> tuple[str, dict[str, Any]]:
    """Run one ``(key, plan dict, seed[, early stop dict or None])`` item; returns ``(key, outcome dict)``.

    A top-level function so process pools can pickle it by name.

    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> from bitwidth.tasks import Task
    >>> data = TensorDataset(torch.randn(16, 4), torch.arange(16) % 2)
    >>> task = Task("toy", lambda: torch.nn.Sequential(torch.nn.Linear(4, 2)), data, data)
    >>> options = _trial.TrialOptions(epochs=1)
    >>> baseline = _trial.train_baseline(task, options, allow_chance=True)  # random labels: chance is all there is
    >>> context = TrialContext(task, options, {0: baseline})
    >>> key, outcome = run_trial_item(context, ("k1", {"0": {"weight": "int4"}}, 0))
    >>> key, sorted(outcome["metrics"])
    ('k1', ['accuracy', 'loss'])
    """
    key, plan, seed, *rest = item
    options = dataclasses.replace(context.options, seed=seed)
    stop = EarlyStop(**rest[0]) if rest and rest[0] else None
    cache = context.cache if options.mode == "ptq" else None
    outcome = _trial.run_trial(context.task, plan_from_dict(plan), options, context.baselines[seed],
                               early_stop=stop, cache=cache)
    return key, outcome.to_dict()


def _canonical_plan(plan: Mapping[str, QuantSpec]) -> dict[str, dict]:
    # Full-precision layers and key order do not change a trial, so they do not change its key.
    return {name: spec for name, spec in sorted(plan_to_dict(plan).items()) if any(spec.values())}


class _Evaluator:
    """The ``evaluate`` callable: store first, then the executor; a verdict per plan over all seeds.

    With ``early_stop`` (an error rate; post-training, one seed, an ``accuracy`` or ``loss``
    metric) trials stop as soon as a confidence bound decides them. Their keys name the early
    stop (threshold, error rate), so a full evaluation is never mistaken for one nor one for
    a full evaluation; one that no bound decided ran to the end and is stored as the full
    evaluation it is, and a plan already fully evaluated in the store is reused either way.
    ``full(plans)`` always evaluates fully (the final joint and uniform plans).
    """

    def __init__(self, task: Any, options: _trial.TrialOptions, baselines: dict[int, _trial.Baseline],
                 criterion: Any, store: TrialStore, executor: Executor,
                 progress: Callable[[ProgressEvent], None] | None, early_stop: float | None = None) -> None:
        self.task, self.options, self.baselines = task, options, baselines
        self.context = TrialContext(task, options, baselines)
        self.criterion, self.store, self.executor, self.progress = criterion, store, executor, progress
        self.fingerprint = task.fingerprint()
        self.run = self.reused = 0
        self.samples = 0  # validation samples the trials run here evaluated
        self.alias: dict[str, str] = {}  # early-stop key -> full key, for early trials that ran to the end
        self.phase = ""
        self.planned = 0
        self.stops = _early_stops(options, baselines, criterion, early_stop)

    def key(self, plan: dict[str, dict], seed: int, early: bool = False) -> str:
        opts = dataclasses.replace(self.options, seed=seed).to_dict()
        extra = {"early_stop": self.stops[seed].to_dict()} if early else {}
        return trial_key(task=self.fingerprint, mode=self.options.mode, plan=plan, seed=seed, options=opts, **extra)

    def notify(self, message: str = "") -> None:
        if self.progress is not None:
            self.progress(ProgressEvent(self.phase, self.run, self.reused, message, max(self.planned, self.done)))

    @property
    def done(self) -> int:
        return self.run + self.reused

    def start(self, phase: str, message: str, plans: int = 0) -> None:
        """A new phase expecting about ``plans`` more plans (each on every seed)."""
        self.phase = phase
        self.planned = self.done + plans * len(self.baselines)
        self.notify(message)

    def _keys(self, d: dict[str, dict], early: bool) -> list[tuple[str, int, bool]]:
        """(key, seed, early) per seed: the full evaluation's key when stored, else the one to use."""
        out = []
        for s in self.baselines:
            full = self.key(d, s)
            use_early = early and full not in self.store
            out.append((self.key(d, s, True) if use_early else full, s, use_early))
        return out

    def __call__(self, plans: list[dict[str, QuantSpec]], *, full: bool = False) -> list[Verdict]:
        dicts = [_canonical_plan(p) for p in plans]
        keys = [self._keys(d, bool(self.stops) and not full) for d in dicts]
        stored_before = {k for ks in keys for k, _, _ in ks if k in self.store}
        self.reused += len(stored_before)
        todo: dict[str, tuple] = {}
        for d, ks in zip(dicts, keys, strict=True):
            for k, s, early in ks:
                if k not in self.store:  # the same plan twice in a round runs once
                    todo.setdefault(k, (k, d, s, self.stops[s].to_dict() if early else None))
        lost: dict[str, str] = {}
        for _attempt in range(2):
            items = [todo[k] for k in todo if k not in self.store]
            lost = {}
            for done in self.executor.map_unordered(run_trial_item, self.context, items):
                key, plan, seed, early = items[done.index]
                if done.lost:
                    lost[key] = done.error or "worker lost"
                    continue
                outcome = done.value[1] if done.error is None else _failed(done.error)
                if early and outcome["error"] is None and not (outcome.get("early_stop") or {}).get("decision"):
                    self.alias[key] = key = self.key(plan, seed)  # it ran to the end: a full evaluation
                self.store.put(key, {"mode": self.options.mode, "seed": seed, "plan": plan, "outcome": outcome})
                self.run += 1
                self.samples += outcome.get("samples") or 0
                self.notify(f"trial {key[:12]} {self.criterion.metric}="
                            f"{outcome['metrics'].get(self.criterion.metric)}")
            if not lost:
                break
        self.store.sync()
        return [self.verdict([k for k, _, _ in ks], all(k in stored_before for k, _, _ in ks), lost) for ks in keys]

    def val_size(self) -> int | None:
        """Samples in one full evaluation of one seed (post-training); None in training mode."""
        if self.options.mode != "ptq":
            return None
        return sum(len(y) for _, y in self.task.val_batches())

    def full(self, plans: list[dict[str, QuantSpec]]) -> list[Verdict]:
        """Verdicts from full evaluations, whatever the early stop."""
        return self(plans, full=True)

    def lookup(self, plan: dict[str, QuantSpec]) -> Verdict | None:
        """The verdict of ``plan`` if every seed's trial is already stored, else None."""
        keys = [k for k, _, _ in self._keys(_canonical_plan(plan), bool(self.stops))]
        return self.verdict(keys, True) if all(k in self.store for k in keys) else None

    def verdict(self, keys: list[str], reused: bool, lost: Mapping[str, str] | None = None) -> Verdict:
        lost = lost or {}
        outcomes = [_trial.TrialOutcome.from_dict(
            _failed(lost[k]) if k in lost else self.store.get(self.alias.get(k, k))["outcome"]) for k in keys]
        bases = list(self.baselines.values())
        decisions = [(o.early_stop or {}).get("decision") for o in outcomes]
        if len(outcomes) == 1 and decisions[0] is not None:  # stopped early: the bound decided
            passed = outcomes[0].error is None and decisions[0] == "pass"
        elif hasattr(self.criterion, "passes_seeds"):  # the mean over seeds against the baselines' mean
            passed = bool(self.criterion.passes_seeds(outcomes, bases))
        else:  # a criterion of one seed at a time: the plan must pass on every seed
            passed = all(bool(self.criterion.passes(o, b.metrics, b.loss_curve))
                         for o, b in zip(outcomes, bases, strict=True))
        metric_name = self.criterion.metric
        values = [float(o.metrics.get(metric_name, math.nan)) for o in outcomes]
        errors = [o.error for o in outcomes if o.error]
        samples = [o.samples for o in outcomes]
        detail = {
            "metrics": _mean_metrics([o.metrics for o in outcomes]),
            "metric_std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "diverged": any(o.diverged for o in outcomes),
            "wall_time": sum(o.wall_time for o in outcomes),
            "error": errors[0] if errors else None,
            "keys": " ".join(keys),
            "samples": None if None in samples else sum(samples),
            "early_stopped": any(d is not None for d in decisions),
        }
        return Verdict(passed, statistics.fmean(values), detail, reused)


def _early_stops(options: _trial.TrialOptions, baselines: Mapping[int, _trial.Baseline], criterion: Any,
                 error_rate: float | None) -> dict[int, EarlyStop]:
    """Each seed's early stop, or none: only one post-training seed judged on accuracy or loss stops early
    (several seeds are judged on their mean, which no single trial's bound decides)."""
    metric = getattr(criterion, "metric", None)
    if (error_rate is None or options.mode != "ptq" or len(baselines) != 1 or metric not in EARLY_METRICS
            or not hasattr(criterion, "threshold") or getattr(criterion, "name", "") == "converge"):
        return {}
    return {s: EarlyStop(metric, criterion.threshold(b.metrics), error_rate) for s, b in baselines.items()}


def _failed(error: str) -> dict[str, Any]:
    return _trial.TrialOutcome({"accuracy": math.nan, "loss": math.nan}, error=error).to_dict()


def _mean_metrics(metrics: list[Mapping[str, float]]) -> dict[str, float]:
    names = sorted({n for m in metrics for n in m})
    return {n: statistics.fmean(float(m.get(n, math.nan)) for m in metrics) for n in names}


def select_layers(model: nn.Module, layers: str | Sequence[str], example_input: Any = None) -> list[str]:
    """The sites that names or glob patterns select, in model order.

    Without ``example_input`` only weight sites (and op sites the model has already run)
    are known; with it, one forward finds every op site too. Every name and pattern must
    select something: one that does not is a typo, and the ``ValueError`` names the
    closest real sites.

    >>> select_layers(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)), ["2", "0*"])
    ['0', '2']
    """
    patterns = [layers] if isinstance(layers, str) else list(layers)
    if example_input is None:  # both raise for a pattern that selects nothing, naming the closest sites
        return _selected(resolve_plan(model, dict.fromkeys(patterns, QuantSpec())), patterns)
    return _selected(coverage(model, dict.fromkeys(patterns, QuantSpec()), example_input).table["site"], patterns)


def _selected(names: Iterable[str], patterns: Sequence[str]) -> list[str]:
    return [n for n in dict.fromkeys(names) if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def select_pairs(table: pd.DataFrame, names: Sequence[str], kinds: Sequence[str]) -> list[Pair]:
    """(site, kind) pairs a search can quantize: the kinds each selected site has.

    An op site between activations has no weight; an embedding has no float input.
    """
    have = set(zip(table.loc[table["quantizable"], "site"], table.loc[table["quantizable"], "kind"], strict=True))
    return [(n, k) for n in names for k in kinds if (n, k) in have]


def _baseline_stats(task: Any, baseline: _trial.Baseline, layers: Sequence[str], kinds: Sequence[str], *,
                    mode: str, calib_batches: int = 4, seed: int = 0) -> tuple[Any, dict[Pair, float]]:
    """Statistics of the fp32 baseline over calibration batches, recorded once per search: the
    recorder (what ``predict`` estimates from) and the max |x| of each (layer, kind), for
    families that place the binary point.

    In ``train`` mode the max |x| is also taken on the initial weights, because gradients
    are largest early in training.
    """
    loss_fn = getattr(task, "loss_fn", TF.cross_entropy)
    batches = task.calib_batches(max(1, calib_batches))
    found: dict[Pair, float] = {}
    recorders = []
    for state in [baseline.state_dict] + ([baseline.init_state_dict] if mode == "train" else []):
        model = task.build_model(0)
        model.load_state_dict(state)
        model.eval()
        with record(model, layers=list(layers), kinds=kinds, seed=seed) as rec:
            for x, y in batches:
                model.zero_grad(set_to_none=True)
                out = model(x)
                if "gradient" in kinds:
                    loss_fn(out, y).backward()
        recorders.append(rec)
        frame = rec.to_frame()
        for row in frame[~frame["quantized"]].itertuples():
            pair = (row.layer, row.kind)
            found[pair] = max(found.get(pair, 0.0), float(row.absmax))
    return recorders[0], found


def _predicted(recorder: Any, space: SearchSpace, family: str, options: Mapping[str, Any]) -> dict[Pair, int | None]:
    """:func:`bitwidth.predict_min_bits` on the baseline's statistics: each pair's estimate or None."""
    import bitwidth  # the public function, whatever rule it currently implements

    table = bitwidth.predict_min_bits(recorder, family, list(space.candidates), **options)
    if "quantized" in table.columns:
        table = table[~table["quantized"].astype(bool)]
    found = {(r.layer, r.kind): None if pd.isna(r.min_bits) else int(r.min_bits) for r in table.itertuples()}
    return {pair: found.get(pair) for pair in space.pairs}


def _check(name: str, values: Iterable[Any], allowed: Sequence[Any]) -> None:
    bad = [v for v in values if v not in allowed]
    if bad:
        raise ValueError(f"{name} {bad} not allowed; allowed: {list(allowed)}")


def _criterion(criterion: Any, mode: str) -> Any:
    if criterion is not None and not isinstance(criterion, str):
        return criterion
    from .criteria import make_criterion

    return make_criterion(criterion or ("accuracy" if mode == "ptq" else "converge"))


def run_search(
    task: Any,
    *,
    mode: str,
    layers: str | Sequence[str] = "*",
    kinds: Sequence[str] = ("weight", "activation"),
    family: str = "int",
    family_options: Mapping[str, Any] | None = None,
    candidates: Sequence[int] = (2, 3, 4, 5, 6, 8),
    criterion: Any = None,
    strategy: str = "bisect",
    trial_options: _trial.TrialOptions | None = None,
    seeds: Sequence[int] = (0,),
    run_dir: str | Path,
    executor: Executor | str | None = None,
    progress: Callable[[ProgressEvent], None] | None = None,
    early_stop: bool = False,
    early_stop_error: float = DEFAULT_EARLY_STOP_ERROR,
) -> SearchResult:
    """Find each (layer, kind)'s minimum, the joint plan and the best uniform width; save into ``run_dir``.

    ``task``: a Task or a model name for :func:`bitwidth.tasks.make_task`. ``layers``:
    glob pattern(s) over the quantizable layers. ``criterion``: a criterion or its name
    (default ``accuracy`` for ptq, ``converge`` for train). ``trial_options``: mode and
    seed are set by the search. ``executor``: an executor, or its name for
    :func:`bitwidth.executors.make_executor` (default ``local``; one made here is closed
    here). Rerunning into the same ``run_dir`` reuses every stored trial. ``min_bits``
    counts the family's searched integer (e.g. mantissa bits for ``float``); costs
    count total bits.

    ``strategy``: ``grid``, ``bisect`` or ``predict`` (each pair starts from
    :func:`bitwidth.predict_min_bits` on statistics of the fp32 baseline, recorded once over
    the calibration batches; see :func:`bitwidth.search.predict`). ``early_stop``: post-training
    trials (one seed, an accuracy or loss criterion) stop as soon as a confidence bound
    decides them, each wrong with probability at most ``early_stop_error`` (see
    :mod:`bitwidth.early_stop`); the final joint and uniform plans are always evaluated
    fully, and training runs always train fully.

    Order: baseline(s), the per-pair strategy, the best uniform width, then the joint
    step (:func:`bitwidth.search.joint`): in ptq every raise is measured at every step
    (lazily, as in train mode, beyond ``EXHAUSTIVE_JOINT_PAIRS`` pairs);
    in train mode the greedy is lazy and capped per pair at the larger of its minimum
    and the uniform width. With several seeds a plan is judged by the mean over
    seeds against the baselines' mean (the criterion's ``passes_seeds``).

    >>> run_search("digits_cnn", mode="ptq", kinds=("gradient",), run_dir="/nonexistent")
    Traceback (most recent call last):
    ...
    ValueError: search.kinds: 'gradient' exists only in mode 'train' (the backward pass); use mode: train, or \
kinds weight and activation
    """
    check_search_inputs(mode, seeds, layers=layers, kinds=kinds, family=family, options=dict(family_options or {}),
                        candidates=candidates, strategy=strategy, early_stop=early_stop,
                        early_stop_error=early_stop_error)
    if isinstance(task, str):
        from .tasks import make_task

        task = make_task(task)
    criterion = _criterion(criterion, mode)
    options = dataclasses.replace(trial_options or _trial.TrialOptions(), mode=mode, seed=seeds[0])
    fam_opts = dict(family_options or {})
    if "absmax" in fam_opts:
        raise ValueError("family_options cannot set absmax: it is measured per layer from the data")
    model = task.build_model(seeds[0])
    patterns = [layers] if isinstance(layers, str) else list(layers)
    table = coverage(model, dict.fromkeys(patterns, QuantSpec()), task.example_input()).table  # one forward
    names = _selected(table["site"], patterns)
    costs = CostModel.from_sites(table)
    pairs = select_pairs(table, names, kinds)
    if not pairs:
        raise ValueError(f"the selected sites have none of the kinds {list(kinds)}")
    searched = set(pairs)
    covered = weigh(table, lambda site: QuantSpec(**{k: "int8" for k in kinds if (site, k) in searched}))
    logging.getLogger("bitwidth").info("the search %s", covered)
    # Bad family options fail here, before any training.
    make_format(family, max(candidates, default=8), **fam_opts, **({"absmax": 1.0} if needs_absmax(family) else {}))
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    if progress is not None:  # training the baselines can take a while: say so before it starts
        progress(ProgressEvent("baseline", 0, 0, f"the fp32 baseline of seed(s) {list(dict.fromkeys(seeds))} "
                                                 "(trained once, then reused from the run directory)"))
    baselines = {s: _trial.train_baseline(task, dataclasses.replace(options, seed=s), cache_dir=run_dir)
                 for s in dict.fromkeys(seeds)}
    recorder, absmax = (_baseline_stats(task, baselines[seeds[0]], names, kinds, mode=mode, seed=seeds[0],
                                        calib_batches=options.calib_batches)
                        if needs_absmax(family) or strategy == "predict" else (None, {}))
    absmax = absmax if needs_absmax(family) else {}

    def build(layer: str, kind: str, n: int) -> Format:
        return make_format(family, n, **fam_opts, **({"absmax": absmax[(layer, kind)]} if absmax else {}))

    space = SearchSpace(pairs, tuple(candidates), build)
    own_executor = not hasattr(executor, "map_unordered")
    ex = make_executor(executor or "local") if own_executor else executor
    store = TrialStore(run_dir / STORE_FILE)
    evaluate = _Evaluator(task, options, baselines, criterion, store, ex, progress,
                          early_stop_error if early_stop else None)
    try:
        predicted = _predicted(recorder, space, family, fam_opts) if strategy == "predict" else None
        result = _search(evaluate, space, strategy, costs, kinds, predicted)
    finally:
        store.close()
        if own_executor:
            ex.close()
    result.summary["config"] = {
        "task": task.fingerprint(), "mode": mode, "layers": names, "kinds": list(kinds), "family": family,
        "family_options": fam_opts, "candidates": list(space.candidates), "criterion": criterion.to_dict(),
        "strategy": strategy, "seeds": list(baselines), "trial_options": options.to_dict(),
        "early_stop": {"enabled": bool(evaluate.stops), "requested": early_stop, "error_rate": early_stop_error},
    }
    result.summary["coverage"] = {"text": str(covered), "mac_fraction": covered.mac_fraction,
                                  "weight_fraction": covered.weight_fraction,
                                  "left_out": covered.left_out.to_dict(orient="records")}
    result.save(run_dir)
    return result


def _search(evaluate: _Evaluator, space: SearchSpace, strategy: str, costs: CostModel,
            kinds: Sequence[str], predicted: Mapping[Pair, int | None] | None = None) -> SearchResult:
    """The strategy, then the joint step and the uniform search, into one result."""
    n = len(space.candidates)
    per_pair = {"grid": n, "predict": 2}.get(strategy, max(1, math.ceil(math.log2(n + 1))))  # bisection: ~log2
    evaluate.start(strategy, f"{len(space.pairs)} (site, kind) pairs x {n} candidates (and the best uniform width)",
                   plans=len(space.pairs) * per_pair + per_pair)
    if strategy == "grid":
        strategy_fn: Callable[[Any], Any] = lambda ev: grid(ev, space)  # noqa: E731
    else:
        reference = {pair: {n: v.passed for n in space.candidates
                            if (v := evaluate.lookup(space.plan({pair: n}))) is not None} for pair in space.pairs}
        strategy_fn = lambda ev: bisect(ev, space, reference=reference)  # noqa: E731
    full = evaluate.full if evaluate.stops else None
    cheap_fails = bool(evaluate.stops)  # a failing trial stops early: a few batches, not the whole set
    if strategy == "predict":
        # The per-pair minima decide the uniform widths below the largest one: search it afterwards.
        pairs = predict(evaluate, space, predicted or {}, reference=reference, ascend=cheap_fails)
        same = uniform(evaluate, space, confirm=full, minima=pairs.as_dict(), ascend=cheap_fails)
    else:  # the uniform search is independent of the per-pair one: its trials share their rounds
        pairs, same = together(evaluate, strategy_fn, lambda ev: uniform(ev, space, confirm=full))
    metric_name = evaluate.criterion.metric
    # The joint step ranks raises by the costs the searched kinds move.
    needed = ("weight" in kinds, "weight" in kinds or "activation" in kinds, "gradient" in kinds)
    measures = tuple(m for m, use in zip(COST_MEASURES, needed, strict=True) if use)
    minima = pairs.as_dict()
    # Training runs are expensive and noisy: a lazy greedy, and no pair raised past the uniform
    # width that passes (or its own minimum) while others can still rise, so noise cannot lure
    # it into raising cheap layers for nothing. Post-training trials are cheap and exact: every
    # raise is measured at every step, uncapped, unless there are so many pairs (every site of a
    # transformer) that a round per step costs pairs x steps trials: then the lazy greedy too.
    noisy = evaluate.options.mode == "train"
    # With predict, the per-pair trials' measured sensitivities order the repairs and a bisection along
    # them finds the joint plan (ordered_joint: about log2(repairs) trials instead of one or more per repair).
    sensitivity = _sensitivity(pairs.min_bits, evaluate, "loss" not in metric_name) if strategy == "predict" else None
    lazy = noisy or len(minima) > EXHAUSTIVE_JOINT_PAIRS or sensitivity is not None
    # The lazy greedy judges raises by scores that may be stale: capped at the uniform width
    # that passes, it cannot wander past a plan the uniform search already found.
    ceiling = None if same.bits is None or not lazy else {
        p: None if n is None else max(n, same.bits) for p, n in minima.items()}
    steps = max(1, len(minima) // 4) + sum(1 for n_ in minima.values() if n_ is None)
    evaluate.start("joint", "joint plan", plans=1 + steps * (1 if lazy else len(minima)))
    # Idle workers prefetch the lazy greedy's likely next trials (same result, fewer rounds).
    if sensitivity is not None:
        combined = ordered_joint(evaluate, space, minima, sensitivity=sensitivity, confirm=full,
                                 cost=lambda p: costs.relative(p, measures), ceiling=ceiling)
    else:
        combined = joint(evaluate, space, minima, cost=lambda p: costs.relative(p, measures), ceiling=ceiling,
                         lazy=lazy, higher_is_better="loss" not in metric_name,
                         prefetch=max(0, getattr(evaluate.executor, "workers", 1) - 1), confirm=full)
    trials = pd.concat([pairs.trials, same.trials, combined.trials], ignore_index=True)
    val_size = evaluate.val_size()
    evaluate.start("done", f"{evaluate.run} trials run, {evaluate.reused} reused")
    return SearchResult(
        trials=trials,
        min_bits=pairs.min_bits,
        joint_plan=combined.plan,
        costs=_cost_table(costs, combined.plan, same.plan if same.bits is not None else None),
        summary={
            "joint": {"passed": combined.passed, "metric": combined.metric, "steps": combined.steps,
                      "metrics": combined.outcome.get("metrics", {}),
                      "bits": {f"{layer}.{kind}": n for (layer, kind), n in combined.bits.items()}},
            "uniform": {"bits": same.bits, "passed": same.passed, "metric": same.metric},
            "baseline": {"metric_name": metric_name,
                         "metric": statistics.fmean(float(b.metrics[metric_name]) for b in evaluate.baselines.values()),
                         "per_seed": {s: b.metrics for s, b in evaluate.baselines.items()}},
            "layer_costs": {name: dataclasses.asdict(size) for name, size in costs.layers.items()},
            "counts": {"trials_run": evaluate.run, "trials_reused": evaluate.reused,
                       "evaluations": {k: int(v) for k, v in trials.groupby("strategy").size().items()},
                       "pairs": len(space.pairs),
                       "trials_per_pair": round(len(trials) / len(space.pairs), 3),
                       "samples_run": evaluate.samples, "validation_size": val_size,
                       # samples the trials run here evaluated / validation size / pairs: 1 = one full pass per pair
                       "full_evaluations_per_pair": (round(evaluate.samples / val_size / len(space.pairs), 3)
                                                     if val_size else None)},
        },
    )


def _sensitivity(min_bits: pd.DataFrame, evaluate: _Evaluator, higher_is_better: bool) -> dict[Pair, float]:
    """Per pair, how much of the baseline's metric its minimum loses alone (0 when none)."""
    base = statistics.fmean(float(b.metrics[evaluate.criterion.metric]) for b in evaluate.baselines.values())
    sign = 1.0 if higher_is_better else -1.0
    return {(r.layer, r.kind): max(0.0, sign * (base - float(r.metric_at_min)))
            for r in min_bits.itertuples() if not math.isnan(float(r.metric_at_min))}


def _cost_table(costs: CostModel, joint_plan: dict[str, QuantSpec],
                uniform_plan: dict[str, QuantSpec] | None) -> pd.DataFrame:
    rows = {"fp32": costs.of({}), "uniform": costs.of(uniform_plan) if uniform_plan is not None else {},
            "joint": costs.of(joint_plan)}
    table = pd.DataFrame.from_dict(rows, orient="index", columns=list(COST_MEASURES), dtype=float)
    for m in COST_MEASURES:
        table[f"{m}_vs_fp32"] = table[m] / table.loc["fp32", m]
        table[f"{m}_vs_uniform"] = table[m] / table.loc["uniform", m]
    table.index.name = "plan"
    return table
