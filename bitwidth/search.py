"""Search strategies: which plans to evaluate to find each layer's minimum bit width.

Strategies never touch tensors or trials. They see a :class:`SearchSpace` (the (layer,
kind) pairs, the sorted candidate integers, and a function from an integer to a format)
and an ``evaluate`` callable that takes a *round* of plans and returns one
:class:`Verdict` per plan. Plans of one round are independent, so an executor may run
them in parallel; the runner behind ``evaluate`` looks each one up in the trial store.

- :func:`grid`: every candidate for every pair, one pair quantized at a time.
- :func:`bisect`: binary search per pair over the sorted candidates, assuming more bits
  never hurts; all pairs advance one step per round.
- :func:`predict`: certifies a predicted minimum per pair (the predicted width passes, the
  next lower one fails), searching only where the prediction missed; bisection where
  there is no prediction.
- :func:`joint`: every pair at its isolated minimum together; while that fails, raise
  the pair whose next candidate recovers the most metric per added cost, measured on
  the joint plan (all raises in the first round, then lazily).
- :func:`ordered_joint`: the same plan's cheaper cousin: the first passing point of a path
  of repairs ordered by the per-pair sensitivities, found by bisection.
- :func:`uniform`: the fewest bits that pass with every pair at the same width.

Metrics are "higher is better" (accuracy) unless a strategy is told otherwise.

>>> from bitwidth.formats import IntFormat
>>> space = SearchSpace([("fc", "weight")], (2, 4, 8), lambda layer, kind, bits: IntFormat(bits))
>>> def evaluate(plans):  # passes from 4 bits on
...     return [Verdict(p["fc"].weight.bits >= 4, float(p["fc"].weight.bits)) for p in plans]
>>> bisect(evaluate, space).min_bits[["layer", "kind", "min_bits", "evaluations"]].values.tolist()
[['fc', 'weight', 4, 2]]
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from .formats import Format
from .result import MIN_BITS_COLUMNS, SearchResult
from .wrap import KINDS, QuantSpec

__all__ = [
    "together",
    "STRATEGIES",
    "Evaluate",
    "JointResult",
    "Pair",
    "PairResult",
    "SearchResult",
    "SearchSpace",
    "UniformResult",
    "Verdict",
    "bisect",
    "grid",
    "joint",
    "ordered_joint",
    "plan_label",
    "predict",
    "uniform",
]

Pair = tuple[str, str]  # (layer, kind)
STRATEGIES = ("grid", "bisect", "predict")


@dataclass(frozen=True)
class Verdict:
    """The judged outcome of one plan: did it pass, its metric, details, and whether it came from the store."""

    passed: bool
    metric: float
    outcome: dict[str, Any] = field(default_factory=dict)
    reused: bool = False


Evaluate = Callable[[list[dict[str, QuantSpec]]], list[Verdict]]


@dataclass(frozen=True)
class SearchSpace:
    """What is searched: ``pairs`` of (layer, kind), sorted ``candidates``, and ``build(layer, kind, n) -> Format``."""

    pairs: Sequence[Pair]
    candidates: Sequence[int]
    build: Callable[[str, str, int], Format]

    def __post_init__(self) -> None:
        pairs = tuple((str(layer), str(kind)) for layer, kind in self.pairs)
        bad = sorted({k for _, k in pairs if k not in KINDS})
        if bad:
            raise ValueError(f"unknown kind(s) {bad}; allowed: {list(KINDS)}")
        if not pairs or len(set(pairs)) != len(pairs):
            raise ValueError(f"pairs must be a non-empty list of distinct (layer, kind), got {list(self.pairs)}")
        cands = tuple(self.candidates)
        if not cands or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in cands):
            raise ValueError(f"candidates must be a non-empty list of integers >= 0, got {list(cands)}")
        object.__setattr__(self, "pairs", pairs)
        object.__setattr__(self, "candidates", tuple(sorted(set(cands))))

    def plan(self, bits: Mapping[Pair, int | None]) -> dict[str, QuantSpec]:
        """The plan with each given pair at its integer (``None``: full precision), the rest full precision."""
        formats: dict[str, dict[str, Format]] = {}
        for (layer, kind), n in bits.items():
            if n is not None:
                formats.setdefault(layer, {})[kind] = self.build(layer, kind, n)
        return {layer: QuantSpec(**fmts) for layer, fmts in formats.items()}


@dataclass
class PairResult:
    """Per-pair minima (``min_bits`` table) and the trials that found them."""

    min_bits: pd.DataFrame
    trials: pd.DataFrame

    def as_dict(self) -> dict[Pair, int | None]:
        """``{(layer, kind): min_bits or None}``."""
        return {(r.layer, r.kind): (None if pd.isna(r.min_bits) else int(r.min_bits))
                for r in self.min_bits.itertuples()}


@dataclass
class JointResult:
    """The joint plan: each pair's integer, whether it passed, its metric, and the trials on the way."""

    bits: dict[Pair, int | None]
    plan: dict[str, QuantSpec]
    passed: bool
    metric: float
    outcome: dict[str, Any]
    steps: int
    trials: pd.DataFrame


@dataclass
class UniformResult:
    """The fewest bits that pass with every pair at the same width (``None``: none does)."""

    bits: int | None
    plan: dict[str, QuantSpec]
    passed: bool
    metric: float
    trials: pd.DataFrame


def plan_label(plan: Mapping[str, QuantSpec]) -> str:
    """A compact one-line plan for tables.

    >>> plan_label({"fc1": QuantSpec(weight="int4"), "fc2": QuantSpec(activation="int8")})
    'fc1 w=int4; fc2 a=int8'
    """
    parts = []
    for layer, spec in plan.items():
        kinds = " ".join(f"{k[0]}={getattr(spec, k).name}" for k in KINDS if getattr(spec, k) is not None)
        parts.append(f"{layer} {kinds}")
    return "; ".join(parts) or "fp32"


class _Trace:
    """Calls ``evaluate`` one round at a time and keeps one table row per plan."""

    def __init__(self, evaluate: Evaluate, strategy: str) -> None:
        self.evaluate, self.strategy = evaluate, strategy
        self.rows: list[dict[str, Any]] = []
        self.round = 0

    def __call__(self, labeled: list[tuple[dict[str, Any], dict[str, QuantSpec]]],
                 prefetch: Sequence[dict[str, QuantSpec]] = (), evaluate: Evaluate | None = None) -> list[Verdict]:
        """Evaluate ``labeled`` plans in one round; ``prefetch`` plans ride along unrecorded
        (idle workers run trials a later round will likely ask for; the store keeps them).
        ``evaluate`` replaces the trace's own for this round (e.g. a full evaluation)."""
        if not labeled:
            return []
        verdicts = list((evaluate or self.evaluate)([plan for _, plan in labeled] + list(prefetch)))
        if len(verdicts) != len(labeled) + len(prefetch):
            raise ValueError(f"evaluate returned {len(verdicts)} verdicts for {len(labeled)} plans")
        verdicts = verdicts[:len(labeled)]
        for (label, plan), v in zip(labeled, verdicts, strict=True):
            extra = {k: x for k, x in v.outcome.items() if x is None or isinstance(x, (bool, int, float, str))}
            self.rows.append({"strategy": self.strategy, "round": self.round, "layer": None, "kind": None,
                              "bits": None, **label, "plan": plan_label(plan), "passed": bool(v.passed),
                              "metric": float(v.metric), "reused": bool(v.reused), **extra})
        self.round += 1
        return verdicts

    def frame(self) -> pd.DataFrame:
        return _trials_frame(self.rows)


def _trials_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=None if rows else ["strategy", "round", "layer", "kind", "bits", "plan",
                                                          "passed", "metric", "reused"])
    frame["bits"] = frame["bits"].astype("Int64")
    return frame


def _monotone(observed: Mapping[int, bool], candidates: Sequence[int]) -> bool | None:
    """False if some width passes while a larger one fails; True if every candidate was seen; else unknown."""
    widths = sorted(observed)
    for i, low in enumerate(widths):
        if observed[low] and any(not observed[high] for high in widths[i + 1:]):
            return False
    return True if set(candidates) <= set(observed) else None


def _row(pair: Pair, min_bits: int | None, metric: float, evaluations: int, monotone: bool | None) -> dict[str, Any]:
    return dict(zip(MIN_BITS_COLUMNS, (pair[0], pair[1], min_bits, metric, evaluations, monotone), strict=True))


def _min_bits_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=list(MIN_BITS_COLUMNS))
    return frame.astype({"min_bits": "Int64", "metric_at_min": float, "evaluations": int, "monotone": "boolean"})


def _isolated(space: SearchSpace, pair: Pair, n: int) -> tuple[dict[str, Any], dict[str, QuantSpec]]:
    return {"layer": pair[0], "kind": pair[1], "bits": n}, space.plan({pair: n})


def grid(evaluate: Evaluate, space: SearchSpace) -> PairResult:
    """Evaluate every candidate for every pair in one round; the minimum is the smallest
    width from which every larger candidate passes too (a lone lucky pass below a
    failure is not a safe minimum), and ``monotone`` says whether such a pass occurred.

    >>> from bitwidth.formats import IntFormat
    >>> space = SearchSpace([("fc", "weight")], (2, 3, 4), lambda layer, kind, n: IntFormat(n))
    >>> res = grid(lambda plans: [Verdict(p["fc"].weight.bits != 3, 0.0) for p in plans], space)
    >>> res.min_bits[["min_bits", "evaluations", "monotone"]].values.tolist()
    [[4, 3, False]]
    """
    trace = _Trace(evaluate, "grid")
    cands = space.candidates
    labeled = [_isolated(space, pair, n) for pair in space.pairs for n in cands]
    verdicts = iter(trace(labeled))
    rows = []
    for pair in space.pairs:
        seen = {n: next(verdicts) for n in cands}
        best: int | None = None
        for n in reversed(cands):
            if not seen[n].passed:
                break
            best = n
        metric = seen[best].metric if best is not None else float("nan")
        rows.append(_row(pair, best, metric, len(cands), _monotone({n: v.passed for n, v in seen.items()}, cands)))
    return PairResult(_min_bits_frame(rows), trace.frame())


def bisect(evaluate: Evaluate, space: SearchSpace, *,
           reference: Mapping[Pair, Mapping[int, bool]] | None = None) -> PairResult:
    """Binary search for each pair's smallest passing candidate, all pairs one step per round.

    Uses at most ``ceil(log2(len(candidates) + 1))`` evaluations per pair, which is at
    most ``ceil(log2(len(candidates))) + 1``. Bisection cannot see non-monotone
    behaviour by itself; ``reference`` (earlier pass/fail per pair and width, e.g. a grid
    run found in the trial store) lets ``monotone`` say False where it was seen.
    ``min_bits`` is ``<NA>`` when even the largest candidate fails.
    """
    trace = _Trace(evaluate, "bisect")
    cands = space.candidates
    bounds = {pair: [0, len(cands)] for pair in space.pairs}  # answer index in [lo, hi]; len = none passes
    seen: dict[Pair, dict[int, Verdict]] = {pair: {} for pair in space.pairs}
    while active := [pair for pair in space.pairs if bounds[pair][0] < bounds[pair][1]]:
        mids = {pair: (bounds[pair][0] + bounds[pair][1]) // 2 for pair in active}
        verdicts = trace([_isolated(space, pair, cands[mids[pair]]) for pair in active])
        for pair, v in zip(active, verdicts, strict=True):
            seen[pair][cands[mids[pair]]] = v
            if v.passed:
                bounds[pair][1] = mids[pair]
            else:
                bounds[pair][0] = mids[pair] + 1
    rows = []
    for pair in space.pairs:
        idx = bounds[pair][0]
        best = cands[idx] if idx < len(cands) else None
        metric = seen[pair][best].metric if best is not None else float("nan")
        observed = {**(reference or {}).get(pair, {}), **{n: v.passed for n, v in seen[pair].items()}}
        rows.append(_row(pair, best, metric, len(seen[pair]), _monotone(observed, cands)))
    return PairResult(_min_bits_frame(rows), trace.frame())


def _certify(m: int, start: int | None, ascend: bool) -> Generator[list[int], dict[int, bool], int]:
    """One pair's search over candidate indices ``0 .. m - 1``: yields the indices to evaluate
    next, receives whether each passed, returns the smallest passing index (``m``: none).

    From ``start``: evaluate it and the index below at once; a pass and a fail end it.
    Otherwise the answer lies below (both passed) or above (``start`` failed), and is
    searched there: with ``ascend`` (failures are cheap, e.g. stopped early) one index at a
    time upwards from the bottom of that range, so the only passing evaluation is the
    answer's; else by galloping away from ``start`` (1, 2, 4, ... steps) and bisecting the
    bracket. Without ``start``: the whole range, the same two ways.
    """
    lo, hi = 0, m  # the answer lies in [lo, hi]
    if start is not None:
        got = yield [start, start - 1] if start > 0 else [start]
        if got[start] and (start == 0 or not got[start - 1]):
            return start
        if got[start]:  # too high: the answer is at most start - 1
            hi = start - 1
            step = 2
            while not ascend and (probe := start - step) >= 0:
                got = yield [probe]
                if not got[probe]:
                    lo = probe + 1
                    break
                hi, step = probe, step * 2
        else:  # too low
            lo, step = start + 1, 1
            while not ascend and lo < hi:
                probe = min(start + step, m - 1)
                got = yield [probe]
                if got[probe]:
                    hi = probe
                    break
                lo, step = probe + 1, step * 2
    while ascend and lo < hi:
        got = yield [lo]
        if got[lo]:
            return lo
        lo += 1
    while lo < hi:
        mid = (lo + hi) // 2
        got = yield [mid]
        lo, hi = (lo, mid) if got[mid] else (mid + 1, hi)
    return lo


def predict(evaluate: Evaluate, space: SearchSpace, predicted: Mapping[Pair, int | None], *,
            reference: Mapping[Pair, Mapping[int, bool]] | None = None, ascend: bool = False,
            correct: bool = True) -> PairResult:
    """Certify each pair's predicted minimum; search only where the prediction missed.

    ``predicted`` gives each pair an estimated minimum (e.g. :func:`bitwidth.predict_min_bits`
    on statistics of the fp32 model; ``None``: no estimate). A width between candidates
    starts at the next candidate up. The first round evaluates the predicted width and the
    next lower candidate: a pass and a fail certify the minimum in two evaluations (one at
    the lowest candidate). Where both pass the search gallops down, where the predicted
    width fails it gallops up, then bisects; a pair without an estimate is bisected. With
    ``ascend`` (failing trials are cheap because they stop early) the misses and the pairs
    without an estimate are searched upwards one candidate at a time instead, so that the
    only passing (full) evaluation below the prediction is the minimum's. All pairs advance
    one step per round. As :func:`bisect`, it assumes more bits never hurt, and
    ``reference`` lets ``monotone`` say False where earlier trials saw otherwise.

    ``correct`` (with 4 or more estimates): a predictor calibrated on other models may be
    off by the same amount everywhere. A first wave of about ``sqrt(estimates)`` pairs,
    spread over the model, is certified first; the median of their misses (in candidates)
    then moves the estimates of the others, whose first evaluations are then the moved
    estimate and the candidate below it.

    >>> from bitwidth.formats import IntFormat
    >>> space = SearchSpace([("a", "weight"), ("b", "weight"), ("c", "weight")], (2, 3, 4, 5, 6, 8),
    ...                     lambda layer, kind, n: IntFormat(n))
    >>> need = {"a": 4, "b": 5, "c": 3}
    >>> def evaluate(plans):
    ...     return [Verdict(all(s.weight.bits >= need[k] for k, s in p.items()), 1.0) for p in plans]
    >>> res = predict(evaluate, space, {("a", "weight"): 4, ("b", "weight"): 3, ("c", "weight"): None})
    >>> res.min_bits[["layer", "min_bits", "evaluations"]].values.tolist()
    [['a', 4, 2], ['b', 5, 4], ['c', 3, 3]]
    >>> # Estimates one candidate too high everywhere: the first wave (a, c) learns it, the rest start lower.
    >>> space = SearchSpace([(k, "weight") for k in "abcd"], (2, 3, 4, 5, 6, 8), lambda layer, kind, n: IntFormat(n))
    >>> need = {"a": 3, "b": 4, "c": 4, "d": 5}
    >>> res = predict(evaluate, space, {(k, "weight"): need[k] + 1 for k in "abcd"})
    >>> res.min_bits[["layer", "min_bits", "evaluations"]].values.tolist()
    [['a', 3, 3], ['b', 4, 2], ['c', 4, 3], ['d', 5, 2]]
    """
    cands = space.candidates
    bad = set(predicted) - set(space.pairs)
    if bad:
        raise ValueError(f"predicted names pairs that are not searched: {sorted(bad)}; pairs: {list(space.pairs)}")
    trace = _Trace(evaluate, "predict")
    starts: dict[Pair, int | None] = {}
    for pair in space.pairs:
        n = predicted.get(pair)
        starts[pair] = None if n is None or pd.isna(n) else min(sum(c < int(n) for c in cands), len(cands) - 1)
    answers: dict[Pair, int] = {}
    seen: dict[Pair, dict[int, Verdict]] = {pair: {} for pair in space.pairs}

    def search(pairs: list[Pair], shift: int) -> None:
        """Certify ``pairs``, their estimates moved by ``shift`` candidates, all in the same rounds."""
        searches, asks = {}, {}
        for pair in pairs:
            start = starts[pair] if starts[pair] is None else min(max(starts[pair] + shift, 0), len(cands) - 1)
            searches[pair] = _certify(len(cands), start, ascend)
            asks[pair] = next(searches[pair])
        while asks:
            round_ = [(pair, i) for pair, idx in asks.items() for i in idx]
            verdicts = trace([_isolated(space, pair, cands[i]) for pair, i in round_])
            for (pair, i), v in zip(round_, verdicts, strict=True):
                seen[pair][cands[i]] = v
            for pair in list(asks):
                try:
                    asks[pair] = searches[pair].send({i: seen[pair][cands[i]].passed for i in asks[pair]})
                except StopIteration as done:
                    answers[pair] = done.value
                    del asks[pair]

    estimated = [pair for pair in space.pairs if starts[pair] is not None]
    first = estimated[::max(1, round(math.sqrt(len(estimated))))] if correct and len(estimated) >= 4 else []
    search(first, 0)
    misses = sorted(answers[p] - starts[p] for p in first if answers[p] < len(cands))  # type: ignore[operator]
    search([p for p in space.pairs if p not in first], misses[len(misses) // 2] if misses else 0)
    rows = []
    for pair in space.pairs:
        idx = answers[pair]
        best = cands[idx] if idx < len(cands) else None
        metric = seen[pair][best].metric if best is not None else float("nan")
        observed = {**(reference or {}).get(pair, {}), **{n: v.passed for n, v in seen[pair].items()}}
        rows.append(_row(pair, best, metric, len(seen[pair]), _monotone(observed, cands)))
    return PairResult(_min_bits_frame(rows), trace.frame())


def joint(evaluate: Evaluate, space: SearchSpace, min_bits: Mapping[Pair, int | None], *,
          cost: Callable[[dict[str, QuantSpec]], float], ceiling: Mapping[Pair, int | None] | None = None,
          lazy: bool = True, higher_is_better: bool = True, prefetch: int = 0,
          confirm: Evaluate | None = None) -> JointResult:
    """Every pair at its isolated minimum together; repair greedily while that fails.

    Errors of separately harmless pairs add up. A repair raises one pair by one
    candidate (above the largest: full precision), chosen by the metric it recovers
    *in the joint plan* per added ``cost(plan)``, so interactions are measured, not
    assumed. A round that tries every raise at once ends the search if some pass: the
    cheapest wins. ``lazy=False`` runs such a round at every step. ``lazy=True`` runs it
    at the first step only; after that a pair's last measured score stands for its next
    one until it is the best candidate, and only then is it measured again on the
    current plan: exact when what a raise recovers does not grow with the bits already
    added, and about one trial per step instead of one per pair (for expensive trials).

    ``ceiling`` (e.g. each pair's larger of its minimum and the best uniform width) caps
    the raises until every pair has reached it: noisy metrics (short training runs)
    otherwise lure the greedy into raising cheap layers far past any need.
    ``higher_is_better=False`` for a metric such as a loss. ``prefetch`` (lazy only; e.g.
    idle workers) adds that many speculative plans to each one-trial round: the next
    raises the greedy will probably measure, assuming it accepts the current best. The
    result is the same with any ``prefetch``; a right guess saves a round, a wrong one a trial.

    ``confirm`` (e.g. a full evaluation where ``evaluate``
    stops early) re-evaluates a passing plan before it is accepted; if it then fails, the
    repairs go on.

    >>> from bitwidth.formats import IntFormat
    >>> space = SearchSpace([("a", "weight"), ("b", "weight")], (2, 4, 8), lambda layer, kind, n: IntFormat(n))
    >>> def evaluate(plans):  # each pair at 2 bits costs 0.6: one alone passes, both fail
    ...     drops = [sum(0.6 for s in p.values() if s.weight.bits == 2) for p in plans]
    ...     return [Verdict(d <= 0.6, 1 - d) for d in drops]
    >>> res = joint(evaluate, space, {("a", "weight"): 2, ("b", "weight"): 2}, cost=lambda p: len(p))
    >>> res.passed, res.bits
    (True, {('a', 'weight'): 4, ('b', 'weight'): 2})
    """
    trace = _Trace(evaluate, "joint")
    cands = space.candidates
    levels: list[int | None] = [*cands, None]
    for name, given in (("min_bits", min_bits), ("ceiling", ceiling)):
        bad = given is not None and (set(given) != set(space.pairs) or any(n not in levels for n in given.values()))
        if bad:
            raise ValueError(f"{name} must give every pair a candidate {list(cands)} or None; got {dict(given)}")
    sign = 1.0 if higher_is_better else -1.0
    bits: dict[Pair, int | None] = {pair: min_bits[pair] for pair in space.pairs}
    (verdict,) = trace([({"layer": "*", "kind": "*", "step": 0}, space.plan(bits))])
    steps = 0
    scores: dict[Pair, tuple[bool, float]] = {}  # the last measured score of raising each pair
    measured: dict[Pair, tuple[dict[Pair, int | None], Verdict]] = {}  # raises measured on the current plan

    def raise_one(pair: Pair, base: dict[Pair, int | None] | None = None) -> dict[Pair, int | None]:
        base = bits if base is None else base
        return {**base, pair: levels[levels.index(base[pair]) + 1]}

    guessed: set[str] = set()

    def score(p: Pair) -> tuple[bool, float]:
        return scores.get(p, (True, math.inf))

    def guesses(pair: Pair) -> list[dict[str, QuantSpec]]:
        """Plans the next rounds will likely measure: alternately, raises after ``pair`` is
        accepted (chained), and runners-up on this plan (in case its fresh score drops)."""
        chain, base = [], bits
        for _ in range(prefetch):
            base = raise_one(chain[-1][0] if chain else pair, base)
            options = movable_pairs(base)
            if not options:
                break
            chain.append((max(options, key=score), base))
        runners_up = [(p, bits) for p in sorted((p for p in movable_pairs() if p != pair), key=score, reverse=True)]
        mixed = [x for two in zip(chain, runners_up, strict=False) for x in two]
        mixed += chain[len(runners_up):] + runners_up[len(chain):]
        return [space.plan(raise_one(p, base)) for p, base in mixed[:prefetch]]

    def measure(pairs: list[Pair]) -> None:
        raised = [raise_one(pair) for pair in pairs]
        labeled = [({"layer": p[0], "kind": p[1], "bits": b[p], "step": steps + 1}, space.plan(b))
                   for p, b in zip(pairs, raised, strict=True)]
        base_cost = cost(space.plan(bits))
        # A round whose plan an earlier guess already ran costs nothing: keep it free of new guesses.
        ahead = guesses(pairs[0]) if len(pairs) == 1 and plan_label(labeled[0][1]) not in guessed else []
        guessed.update(plan_label(plan) for plan in ahead)
        for pair, b, v in zip(pairs, raised, trace(labeled, prefetch=ahead), strict=True):
            gain, added = sign * (v.metric - verdict.metric), max(cost(space.plan(b)) - base_cost, 1e-12)
            # A failed trial (NaN) never wins; with no gain anywhere, the least harmful raise.
            scores[pair] = (False, -math.inf) if math.isnan(gain) else (gain > 0, gain / added if gain > 0 else gain)
            measured[pair] = (b, v)

    def below(pair: Pair, top: int | None, base: dict[Pair, int | None]) -> bool:
        return levels.index(base[pair]) < levels.index(top)

    def movable_pairs(base: dict[Pair, int | None] | None = None) -> list[Pair]:
        base = bits if base is None else base
        capped = [p for p in space.pairs if ceiling is not None and below(p, ceiling[p], base)]
        return capped if ceiling is not None and capped else [p for p in space.pairs if below(p, None, base)]

    def confirmed(v: Verdict) -> Verdict:
        """``v``, or a full re-evaluation of the current plan when ``v`` passed by an early stop."""
        if confirm is None or not v.passed or not v.outcome.get("early_stopped"):
            return v
        (full,) = trace([({"layer": "*", "kind": "*", "step": steps, "confirm": True}, space.plan(bits))],
                        evaluate=confirm)
        measured.clear()  # measured against the early metric
        return full

    verdict = confirmed(verdict)
    while not verdict.passed and (movable := movable_pairs()):
        if not measured and (steps == 0 or not lazy):
            measure(movable)
            passing = [p for p in movable if measured[p][1].passed]
            if passing:  # the cheapest raise that passes; the first of equals, in pair order
                best = min(passing, key=lambda p: cost(space.plan(measured[p][0])))
                bits, verdict = measured[best]
                measured.clear()
                steps += 1
                verdict = confirmed(verdict)
                continue
        best = max(movable, key=lambda p: scores.get(p, (True, math.inf)))  # unmeasured pairs go first
        if best not in measured:
            measure([best])
            continue  # its fresh score may no longer be the best
        bits, verdict = measured[best]
        measured.clear()  # every other measurement was of the plan before this raise
        steps += 1
        verdict = confirmed(verdict)
    return JointResult(bits, space.plan(bits), verdict.passed, verdict.metric, dict(verdict.outcome), steps,
                       trace.frame())


def ordered_joint(evaluate: Evaluate, space: SearchSpace, min_bits: Mapping[Pair, int | None], *,
                  sensitivity: Mapping[Pair, float], cost: Callable[[dict[str, QuantSpec]], float],
                  ceiling: Mapping[Pair, int | None] | None = None, confirm: Evaluate | None = None) -> JointResult:
    """The joint plan by bisection along a path of repairs ordered by measured sensitivity.

    The path starts with every pair at its isolated minimum and raises one pair by one
    candidate per step: in rounds, each pair still below its ``ceiling`` (default: full
    precision) once, the pairs in order of ``sensitivity`` (the metric the pair's minimum
    loses alone, from the per-pair trials) per added ``cost``; pairs that lose nothing
    alone come last. Its end, every pair at its ceiling, is decided without a trial: with
    the ceiling at least the best passing uniform width, or full precision, it passes
    (more bits never hurt). More bits along the path never hurt either, so the plan is
    the first passing point of the path, found by bisection in about ``log2(steps)``
    trials instead of a trial or more per repair (:func:`joint` measures every repair on
    the plan it changes; this one trusts the isolated measurements for the order).
    ``confirm`` (e.g. a full evaluation where ``evaluate`` stops early) re-evaluates the
    plan found, and the end of the path if the search lands there, before it is accepted;
    if it then fails, the search goes on above it.

    >>> from bitwidth.formats import IntFormat
    >>> space = SearchSpace([("a", "weight"), ("b", "weight")], (2, 4, 8), lambda layer, kind, n: IntFormat(n))
    >>> def evaluate(plans):  # each pair at 2 bits costs 0.6: one alone passes, both fail
    ...     drops = [sum(0.6 for s in p.values() if s.weight.bits == 2) for p in plans]
    ...     return [Verdict(d <= 0.6, 1 - d) for d in drops]
    >>> res = ordered_joint(evaluate, space, {("a", "weight"): 2, ("b", "weight"): 2},
    ...                     sensitivity={("a", "weight"): 0.1, ("b", "weight"): 0.6}, cost=lambda p: len(p),
    ...                     ceiling={("a", "weight"): 4, ("b", "weight"): 4})  # 4 bits pass uniformly
    >>> res.passed, res.bits, len(res.trials)
    (True, {('a', 'weight'): 2, ('b', 'weight'): 4}, 2)
    """
    trace = _Trace(evaluate, "joint")
    levels: list[int | None] = [*space.candidates, None]
    tops = ceiling or dict.fromkeys(space.pairs)
    for name, given in (("min_bits", min_bits), ("ceiling", tops)):
        if set(given) != set(space.pairs) or any(n not in levels for n in given.values()):
            raise ValueError(f"{name} must give every pair a candidate {list(space.candidates)} or None; "
                             f"got {dict(given)}")
    start = {p: min_bits[p] for p in space.pairs}
    base_cost = cost(space.plan(start))

    def priority(p: Pair) -> tuple[bool, float]:
        raised = {**start, p: levels[levels.index(start[p]) + 1]}
        gain = max(0.0, float(sensitivity.get(p, 0.0)))
        return gain > 0, gain / max(cost(space.plan(raised)) - base_cost, 1e-12)

    order = sorted((p for p in space.pairs if levels.index(start[p]) < levels.index(tops[p])),
                   key=priority, reverse=True)
    path, bits = [dict(start)], dict(start)
    while order:
        for p in order:
            bits = {**bits, p: levels[levels.index(bits[p]) + 1]}
            path.append(bits)
        order = [p for p in order if levels.index(bits[p]) < levels.index(tops[p])]
    seen: dict[int, Verdict] = {}

    def run(k: int, check: Evaluate | None = None) -> Verdict:
        label = {"layer": "*", "kind": "*", "step": k, **({"confirm": True} if check else {})}
        (seen[k],) = trace([(label, space.plan(path[k]))], evaluate=check)
        return seen[k]

    lo, hi = 0, len(path) - 1  # the first passing point lies in [lo, hi]; the end passes
    while True:
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if run(mid).passed else (mid + 1, hi)
        v = seen.get(lo)
        if v is None or (confirm is not None and v.outcome.get("early_stopped")):
            v = run(lo, confirm)  # the final plan gets a full evaluation
        if v.passed or lo == len(path) - 1:
            break
        lo, hi = lo + 1, len(path) - 1
    return JointResult(path[lo], space.plan(path[lo]), v.passed, v.metric, dict(v.outcome), lo, trace.frame())


def uniform(evaluate: Evaluate, space: SearchSpace, *, confirm: Evaluate | None = None,
            minima: Mapping[Pair, int | None] | None = None, ascend: bool = False) -> UniformResult:
    """Binary search for the fewest bits that pass with every pair at that same width.

    ``minima`` (each pair's minimum alone, ``None``: no candidate passes) skips the widths
    they decide: a width below some pair's minimum fails (that pair alone already fails
    there), and with a pair that passes at no width no uniform width passes. ``ascend``
    (failures are cheap) tries the widths left upwards one at a time instead of bisecting.

    ``confirm`` (e.g. a full evaluation where ``evaluate`` stops early) re-evaluates the width
    found when it passed by an early stop; if it then fails, the search goes on above it.

    >>> from bitwidth.formats import IntFormat
    >>> space = SearchSpace([("a", "weight"), ("b", "weight")], (2, 4, 8), lambda layer, kind, n: IntFormat(n))
    >>> uniform(lambda plans: [Verdict(p["a"].weight.bits >= 4, 0.9) for p in plans], space).bits
    4
    """
    trace = _Trace(evaluate, "uniform")
    cands = space.candidates
    lo, hi = 0, len(cands)
    if minima is not None:
        lo = len(cands) if None in minima.values() else cands.index(max(minima.values(), default=cands[0]))
    seen: dict[int, Verdict] = {}
    while True:
        while lo < hi:
            mid = lo if ascend else (lo + hi) // 2
            n = cands[mid]
            (v,) = trace([({"layer": "*", "kind": "*", "bits": n}, space.plan({pair: n for pair in space.pairs}))])
            seen[n] = v
            lo, hi = (lo, mid) if v.passed else (mid + 1, hi)
        if lo == len(cands) or confirm is None or not seen[cands[lo]].outcome.get("early_stopped"):
            break
        n = cands[lo]
        (v,) = trace([({"layer": "*", "kind": "*", "bits": n, "confirm": True},
                       space.plan({pair: n for pair in space.pairs}))], evaluate=confirm)
        seen[n] = v
        if v.passed:
            break
        lo, hi = lo + 1, len(cands)
    if lo == len(cands):
        return UniformResult(None, {}, False, float("nan"), trace.frame())
    n = cands[lo]
    return UniformResult(n, space.plan({pair: n for pair in space.pairs}), True, seen[n].metric, trace.frame())


class _RoundMerger:
    """The ``evaluate`` that strategies running in threads call: it queues their plans and
    waits; :func:`together` runs each round in the calling (main) thread, so Ctrl-C and
    errors in trials land there, never in a strategy thread."""

    def __init__(self, n: int) -> None:
        self.alive = n
        self.cv = threading.Condition()
        self.pending: list[dict[str, Any]] = []

    def __call__(self, plans: list[dict[str, QuantSpec]]) -> list[Verdict]:
        slot: dict[str, Any] = {"plans": plans}
        with self.cv:
            self.pending.append(slot)
            self.cv.notify_all()
            while "verdicts" not in slot and "error" not in slot:
                self.cv.wait()
        if "error" in slot:
            raise slot["error"]
        return slot["verdicts"]

    def finished(self) -> None:
        with self.cv:
            self.alive -= 1
            self.cv.notify_all()

    def next_round(self) -> list[dict[str, Any]] | None:
        """Block until every live strategy waits for verdicts; their requests, or None when all are done."""
        with self.cv:
            while self.alive and len(self.pending) < self.alive:
                self.cv.wait()
            if not self.alive:
                return None
            slots, self.pending = self.pending, []
            return slots

    def answer(self, slots: list[dict[str, Any]], key: str, values: list[Any]) -> None:
        with self.cv:
            for slot, value in zip(slots, values, strict=True):
                slot[key] = value
            self.cv.notify_all()


def together(evaluate: Evaluate, *strategies: Callable[[Evaluate], Any]) -> list[Any]:
    """Run independent strategies at once, merging their rounds; returns their results in order.

    Each strategy is a function of an ``evaluate``; whenever all of them wait for verdicts,
    their plans go out as one round, so e.g. the uniform search rides along with the
    per-layer bisection instead of adding rounds of its own after it.

    >>> from bitwidth.formats import IntFormat
    >>> space = SearchSpace([("a", "weight")], (2, 4, 8), lambda layer, kind, n: IntFormat(n))
    >>> rounds = []
    >>> def evaluate(plans):
    ...     rounds.append(len(plans))
    ...     return [Verdict(p["a"].weight.bits >= 4, 1.0) for p in plans]
    >>> pairs, same = together(evaluate, lambda ev: bisect(ev, space), lambda ev: uniform(ev, space))
    >>> same.bits, int(pairs.min_bits["min_bits"][0]), rounds
    (4, 4, [2, 2])
    """
    merger = _RoundMerger(len(strategies))
    results: list[Any] = [None] * len(strategies)
    errors: list[BaseException] = []

    def run(i: int, strategy: Callable[[Evaluate], Any]) -> None:
        try:
            results[i] = strategy(merger)
        except BaseException as err:
            errors.append(err)
        finally:
            merger.finished()

    threads = [threading.Thread(target=run, args=(i, s), daemon=True) for i, s in enumerate(strategies)]
    for t in threads:
        t.start()
    while (slots := merger.next_round()) is not None:
        try:
            verdicts = list(evaluate([plan for slot in slots for plan in slot["plans"]]))
        except BaseException as err:  # Ctrl-C or a failing evaluate: stop every strategy, then raise
            merger.answer(slots, "error", [err] * len(slots))
            for t in threads:
                t.join()
            raise
        sizes = [len(slot["plans"]) for slot in slots]
        merger.answer(slots, "verdicts", [verdicts[sum(sizes[:i]):sum(sizes[:i + 1])] for i in range(len(slots))])
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results
