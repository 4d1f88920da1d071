"""Early-stopped evaluation: confidence bounds that end a post-training evaluation early.

A trial's validation metric is a mean over the validation samples. Evaluated in a fixed
random order, the first ``n`` of ``N`` samples are a simple random sample drawn without
replacement, so a confidence bound on their mean covers the metric of the whole set. The
evaluation looks at ``n = min_samples, 2 min_samples, 4 min_samples, ...`` samples
(:func:`looks`) and stops at the first look whose bound lies wholly on one side of the
criterion's threshold (:func:`decide`); the last look is the whole set, where the bound is
the exact metric. The chance that an early verdict differs from the full evaluation's is at
most ``error_rate`` per trial: each of the ``K`` looks spends ``error_rate / K``
(a union bound over the looks, so stopping at the best-looking moment costs nothing extra).

The bounds, all with the finite-population correction ``(N - n) / (N - 1)`` (zero width
once every sample is in):

- :func:`wilson_bound`: a share of successes (accuracy, one prediction per sample), Wilson's
  score interval;
- :func:`hoeffding_bound`: the mean of values in ``[0, 1]`` (accuracy of a language model: a
  share per sample), Hoeffding's inequality for sampling without replacement (Serfling's factor);
- :func:`mean_bound`: the mean of unbounded values (a loss), the normal approximation with
  the sample's standard deviation.

Wilson's and the normal bound are approximations (good from a few dozen samples on); the
simulation in ``tests/test_search_cost.py`` checks that their error rate holds.

>>> stop = EarlyStop("accuracy", threshold=0.8)
>>> looks(450, stop.min_samples)
[32, 64, 128, 256, 450]
>>> decide(wilson_bound(64, 64, 450, stop.delta(450)), stop)  # 64 of 64 right: clearly above 0.8
'pass'
>>> decide(wilson_bound(40, 64, 450, stop.delta(450)), stop)  # 40 of 64: clearly below
'fail'
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

__all__ = ["METRICS", "EarlyStop", "decide", "hoeffding_bound", "looks", "mean_bound", "wilson_bound"]

Bound = tuple[float, float]
METRICS = ("accuracy", "loss")  # the metrics of an evaluation (bitwidth.tasks.evaluate) a bound can stop


@dataclass(frozen=True)
class EarlyStop:
    """When to stop evaluating one trial: the criterion's ``metric`` (``accuracy`` or ``loss``) and
    ``threshold`` (the worst value that passes), the per-trial ``error_rate`` and the first
    look's ``min_samples``.

    >>> EarlyStop("accuracy", 0.5, error_rate=2)
    Traceback (most recent call last):
    ...
    ValueError: early stopping: error_rate must be in (0, 0.5], got 2
    """

    metric: str
    threshold: float
    error_rate: float = 0.01
    min_samples: int = 32

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"early stopping: metric must be one of {list(METRICS)}, got {self.metric!r}")
        if not (isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold)):
            raise ValueError(f"early stopping: threshold must be a finite number, got {self.threshold!r}")
        if not (isinstance(self.error_rate, (int, float)) and 0 < self.error_rate <= 0.5):
            raise ValueError(f"early stopping: error_rate must be in (0, 0.5], got {self.error_rate!r}")
        if isinstance(self.min_samples, bool) or not isinstance(self.min_samples, int) or self.min_samples < 1:
            raise ValueError(f"early stopping: min_samples must be an integer >= 1, got {self.min_samples!r}")

    @property
    def lower_is_better(self) -> bool:
        return self.metric == "loss"

    def delta(self, total: int) -> float:
        """The error each look may spend: ``error_rate`` shared by the looks before the last."""
        return self.error_rate / max(1, len(looks(total, self.min_samples)) - 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def looks(total: int, min_samples: int) -> list[int]:
    """The sample counts at which the evaluation looks: doubling from ``min_samples``, then ``total``.

    >>> looks(100, 32), looks(20, 32)
    ([32, 64, 100], [20])
    """
    if total < 1:
        raise ValueError(f"looks needs at least one sample, got {total}")
    out, n = [], min_samples
    while n < total:
        out.append(n)
        n *= 2
    return [*out, total]


def _fpc(n: int, total: int) -> float:
    """The finite-population correction of a variance: 0 once every sample is in."""
    return max(0.0, (total - n) / (total - 1)) if total > 1 else 0.0


def _z(delta: float) -> float:
    return NormalDist().inv_cdf(1 - delta / 2)


def wilson_bound(successes: float, n: int, total: int, delta: float) -> Bound:
    """Wilson's score interval for a share of successes, covering the share of all ``total`` samples
    with probability about ``1 - delta``.

    >>> lo, hi = wilson_bound(45, 50, 1000, 0.05)
    >>> round(lo, 3), round(hi, 3)
    (0.79, 0.956)
    >>> wilson_bound(45, 50, 50, 0.05)  # every sample seen: the share itself
    (0.9, 0.9)
    """
    p = successes / n
    z2 = _z(delta) ** 2 * _fpc(n, total)
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = math.sqrt(z2 * p * (1 - p) / n + z2 * z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, center - half), min(1.0, center + half)


def hoeffding_bound(mean: float, n: int, total: int, delta: float) -> Bound:
    """Hoeffding's bound (without replacement: Serfling's factor ``1 - (n - 1) / total``) on the
    mean of values in ``[0, 1]``; holds with probability at least ``1 - delta``.

    >>> lo, hi = hoeffding_bound(0.5, 200, 10_000, 0.05)
    >>> round(hi - lo, 3)
    0.19
    """
    half = math.sqrt(math.log(2 / delta) * max(0.0, 1 - (n - 1) / total) / (2 * n)) if n < total else 0.0
    return max(0.0, mean - half), min(1.0, mean + half)


def mean_bound(mean: float, std: float, n: int, total: int, delta: float) -> Bound:
    """Normal-approximation bound on a mean from the sample's ``std`` (e.g. a mean loss).

    >>> mean_bound(2.0, 1.0, 100, 100, 0.05)
    (2.0, 2.0)
    """
    half = _z(delta) * std / math.sqrt(n) * math.sqrt(_fpc(n, total))
    return mean - half, mean + half


def decide(bound: Bound, stop: EarlyStop) -> str | None:
    """``'pass'`` or ``'fail'`` when the bound lies wholly on one side of the threshold, else None.

    The threshold itself passes, as in the criteria.

    >>> stop = EarlyStop("loss", threshold=2.1)
    >>> decide((1.9, 2.05), stop), decide((2.0, 2.2), stop), decide((2.15, 2.3), stop)
    ('pass', None, 'fail')
    """
    lo, hi = bound
    worst, best = (hi, lo) if stop.lower_is_better else (lo, hi)
    beyond = (lambda v: v > stop.threshold) if stop.lower_is_better else (lambda v: v < stop.threshold)
    if not beyond(worst):
        return "pass"
    if beyond(best):
        return "fail"
    return None
