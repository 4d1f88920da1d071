"""Criteria: the rule a trial must pass against its fp32 baseline.

``accuracy`` (post-training): no error, and the metric is at least the baseline's minus
``max_drop`` (an absolute drop, or a fraction of the baseline with ``relative=True``).
``converge`` (training): additionally not diverged, and the final training loss is at most
the baseline's final training loss times ``1 + loss_tol``, plus ``loss_abs_tol``.
``loss`` (either mode, for language models): no error, not diverged, and the validation
loss is at most the baseline's plus ``max_rise``, by default a fraction of the baseline's
loss (``relative=True``): a cross-entropy has no natural absolute scale.

For a metric where lower is better (any name containing ``loss``) the comparison flips:
the metric may rise by at most ``max_drop``.

Judged on several seeds (:meth:`passes_seeds`), the mean over seeds of the trial is
compared with the mean over seeds of the baseline; any error or divergence fails.
:func:`baseline_spread` reports how much the baseline itself varies across seeds, which is
the noise floor a ``max_drop`` should stay above.

>>> from bitwidth.trial import TrialOutcome
>>> crit = make_criterion("accuracy", max_drop=0.02)
>>> crit.passes(TrialOutcome({"accuracy": 0.95, "loss": 0.2}), {"accuracy": 0.96})
True
>>> crit.passes(TrialOutcome({"accuracy": 0.90, "loss": 0.4}), {"accuracy": 0.96})
False
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

from .trial import TrialOutcome

__all__ = [
    "CRITERIA",
    "AccuracyCriterion",
    "ConvergeCriterion",
    "Criterion",
    "LossCriterion",
    "baseline_spread",
    "criterion_from_dict",
    "lower_is_better",
    "make_criterion",
]


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of ``metric`` is better: any name containing ``loss``.

    >>> lower_is_better("loss"), lower_is_better("train_loss"), lower_is_better("accuracy")
    (True, True, False)
    """
    return "loss" in metric


def _parts(baseline: Any) -> tuple[Mapping[str, float], Sequence[float] | None]:
    """(metrics, loss curve) of a Baseline, or of a plain metrics dict (no curve)."""
    if isinstance(baseline, Mapping):
        return baseline, None
    return baseline.metrics, getattr(baseline, "loss_curve", None)


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


class _Judge:
    """What every criterion shares: the metric threshold, the seed-mean rule, serialisation.

    ``margin`` names the field holding how far the metric may move the wrong way.
    """

    name: ClassVar[str]
    margin: ClassVar[str] = "max_drop"
    relative: bool
    metric: str

    def _check(self) -> None:
        value = getattr(self, self.margin)
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0):
            raise ValueError(f"{self.margin} must be a number >= 0, got {value!r}")
        if not isinstance(self.metric, str) or not self.metric:
            raise ValueError(f"metric must be a metric name such as 'accuracy', got {self.metric!r}")

    def threshold(self, baseline_metrics: Mapping[str, float]) -> float:
        """The worst metric value that still passes.

        >>> AccuracyCriterion(max_drop=0.1, relative=True).threshold({"accuracy": 0.9})
        0.81
        """
        if self.metric not in baseline_metrics:
            raise ValueError(f"the baseline has no metric {self.metric!r}; it has {sorted(baseline_metrics)}")
        base = float(baseline_metrics[self.metric])
        margin = getattr(self, self.margin)
        drop = margin * abs(base) if self.relative else margin
        return round(base + drop if lower_is_better(self.metric) else base - drop, 12)

    def _metric_ok(self, outcome: TrialOutcome, baseline_metrics: Mapping[str, float]) -> bool:
        if outcome.error is not None or outcome.diverged:
            return False
        value = float(outcome.metrics.get(self.metric, math.nan))
        if not math.isfinite(value):
            return False
        limit = self.threshold(baseline_metrics)
        return value <= limit if lower_is_better(self.metric) else value >= limit

    def passes(
        self, outcome: TrialOutcome, baseline_metrics: Mapping[str, float],
        baseline_loss_curve: Sequence[float] | None = None,
    ) -> bool:
        raise NotImplementedError

    def passes_seeds(self, outcomes: Sequence[TrialOutcome], baselines: Sequence[Any]) -> bool:
        """Mean of the trials over seeds against the mean of the baselines (Baselines or metric dicts).

        >>> c = AccuracyCriterion(max_drop=0.01)
        >>> outs = [TrialOutcome({"accuracy": a, "loss": 0.1}) for a in (0.94, 0.97)]
        >>> c.passes_seeds(outs, [{"accuracy": 0.95}, {"accuracy": 0.96}])
        True
        """
        mean = _mean_outcome(outcomes, baselines)
        if mean is None:
            return False
        outcome, base_metrics, base_curve = mean
        return self.passes(outcome, base_metrics, base_curve)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}  # type: ignore[call-overload]


@dataclass(frozen=True)
class AccuracyCriterion(_Judge):
    """Pass when the trial ran cleanly and ``metric`` is within ``max_drop`` of the baseline."""

    max_drop: float = 0.01
    relative: bool = False
    metric: str = "accuracy"
    name: ClassVar[str] = "accuracy"

    def __post_init__(self) -> None:
        self._check()

    def passes(
        self, outcome: TrialOutcome, baseline_metrics: Mapping[str, float],
        baseline_loss_curve: Sequence[float] | None = None,
    ) -> bool:
        """``True`` when the trial had no error or divergence and its metric is within the drop."""
        return self._metric_ok(outcome, baseline_metrics)


@dataclass(frozen=True)
class ConvergeCriterion(_Judge):
    """Pass when training converged: not diverged, final metric within ``max_drop`` of the
    baseline, final training loss at most ``(1 + loss_tol)`` times the baseline's plus
    ``loss_abs_tol``.

    The absolute slack matters when the baseline fits its training set: a final loss of
    0.001 doubles to 0.002 by chance alone, and a ratio would call that not converging.
    Without a baseline loss curve only the metric is judged.

    >>> out = TrialOutcome({"accuracy": 0.95, "loss": 0.2}, loss_curve=[1.0, 0.30])
    >>> ConvergeCriterion().passes(out, {"accuracy": 0.96}, [1.0, 0.25])
    True
    >>> ConvergeCriterion(loss_tol=0.1).passes(out, {"accuracy": 0.96}, [1.0, 0.25])
    False
    >>> ConvergeCriterion().passes(TrialOutcome({"accuracy": 0.96}, loss_curve=[1.0, 0.004]),
    ...                            {"accuracy": 0.96}, [1.0, 0.001])
    True
    """

    max_drop: float = 0.02
    loss_tol: float = 0.5
    metric: str = "accuracy"
    relative: bool = False
    loss_abs_tol: float = 0.01
    name: ClassVar[str] = "converge"

    def __post_init__(self) -> None:
        self._check()
        for name in ("loss_tol", "loss_abs_tol"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {v!r}")

    def passes(
        self, outcome: TrialOutcome, baseline_metrics: Mapping[str, float],
        baseline_loss_curve: Sequence[float] | None = None,
    ) -> bool:
        """``True`` when the trial converged (see the class docstring)."""
        if not self._metric_ok(outcome, baseline_metrics):
            return False
        if not baseline_loss_curve:
            return True
        if not outcome.loss_curve:
            raise ValueError("the converge criterion judges training trials; this outcome has no loss curve")
        final = float(outcome.loss_curve[-1])
        limit = float(baseline_loss_curve[-1]) * (1 + self.loss_tol) + self.loss_abs_tol
        return math.isfinite(final) and final <= limit


@dataclass(frozen=True)
class LossCriterion(_Judge):
    """Pass when the trial ran cleanly (no error, in train mode not diverged) and the validation
    ``metric``, a loss, rose by at most ``max_rise`` over the baseline's: a fraction of it
    (``relative=True``, the default) or an absolute amount.

    >>> from bitwidth.trial import TrialOutcome
    >>> crit = LossCriterion(max_rise=0.05)  # at most 5% above the baseline's loss
    >>> crit.threshold({"loss": 2.0})
    2.1
    >>> crit.passes(TrialOutcome({"accuracy": 0.4, "loss": 2.08}), {"loss": 2.0})
    True
    """

    max_rise: float = 0.05
    relative: bool = True
    metric: str = "loss"
    name: ClassVar[str] = "loss"
    margin: ClassVar[str] = "max_rise"

    def __post_init__(self) -> None:
        self._check()
        if not lower_is_better(self.metric):
            raise ValueError(f"the loss criterion judges a loss (a metric named like 'loss'), got {self.metric!r}; "
                             "for a metric where higher is better use criterion 'accuracy'")

    def passes(
        self, outcome: TrialOutcome, baseline_metrics: Mapping[str, float],
        baseline_loss_curve: Sequence[float] | None = None,
    ) -> bool:
        """``True`` when the trial had no error or divergence and its loss is within the rise."""
        return self._metric_ok(outcome, baseline_metrics)


Criterion = AccuracyCriterion | ConvergeCriterion | LossCriterion
CRITERIA: dict[str, type[Criterion]] = {
    "accuracy": AccuracyCriterion, "converge": ConvergeCriterion, "loss": LossCriterion,
}


def _mean_outcome(
    outcomes: Sequence[TrialOutcome], baselines: Sequence[Any]
) -> tuple[TrialOutcome, dict[str, float], list[float] | None] | None:
    """One outcome and one baseline holding the per-seed means; ``None`` if any seed failed to run."""
    if not outcomes or len(outcomes) != len(baselines):
        raise ValueError(f"need one outcome per baseline seed, got {len(outcomes)} outcomes "
                         f"and {len(baselines)} baselines")
    if any(o.error is not None or o.diverged for o in outcomes):
        return None
    metrics = {k: _mean([float(o.metrics[k]) for o in outcomes]) for k in outcomes[0].metrics
               if all(k in o.metrics for o in outcomes)}
    # Only the final training loss is judged, so the mean curve is the mean final loss.
    finals = [o.loss_curve[-1] for o in outcomes if o.loss_curve]
    outcome = TrialOutcome(metrics, [_mean(finals)] if len(finals) == len(outcomes) else [])
    parts = [_parts(b) for b in baselines]
    base_metrics = {k: _mean([float(m[k]) for m, _ in parts]) for k in parts[0][0] if all(k in m for m, _ in parts)}
    curves = [c for _, c in parts if c]
    base_curve = [_mean([c[-1] for c in curves])] if len(curves) == len(parts) else None
    return outcome, base_metrics, base_curve


def baseline_spread(baselines: Sequence[Any], metric: str = "accuracy") -> dict[str, float]:
    """Mean, sample standard deviation, min and max of a baseline metric across seeds.

    >>> baseline_spread([{"accuracy": 0.95}, {"accuracy": 0.97}])["std"]
    0.01414213562373...
    """
    values = [float(_parts(b)[0][metric]) for b in baselines]
    if not values:
        raise ValueError("baseline_spread needs at least one baseline")
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "min": min(values), "max": max(values), "n": len(values)}


def make_criterion(name: str, **kw: Any) -> Criterion:
    """A criterion by name (``accuracy``, ``converge`` or ``loss``) with its options.

    >>> make_criterion("converge", loss_tol=0.25).to_dict()  # doctest: +NORMALIZE_WHITESPACE
    {'name': 'converge', 'max_drop': 0.02, 'loss_tol': 0.25, 'metric': 'accuracy', 'relative': False,
     'loss_abs_tol': 0.01}
    >>> make_criterion("loss", max_rise=0.1).to_dict()
    {'name': 'loss', 'max_rise': 0.1, 'relative': True, 'metric': 'loss'}
    >>> make_criterion("f1")
    Traceback (most recent call last):
    ...
    ValueError: unknown criterion 'f1'; allowed: accuracy, converge, loss
    """
    if name not in CRITERIA:
        raise ValueError(f"unknown criterion {name!r}; allowed: {', '.join(CRITERIA)}")
    cls = CRITERIA[name]
    allowed = sorted(f.name for f in fields(cls))
    unknown = sorted(set(kw) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for criterion {name!r}; allowed: {allowed}")
    return cls(**kw)


def criterion_from_dict(d: Mapping[str, Any]) -> Criterion:
    """Inverse of ``to_dict``."""
    d = dict(d)
    return make_criterion(d.pop("name"), **d)
