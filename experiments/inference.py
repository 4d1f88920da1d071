"""Statistics of the experiments: rank correlation with bootstrap intervals, Holm's correction, sign tests.

>>> holm([0.01, 0.04, 0.03])
[0.03, 0.06, 0.06]
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["BOOT", "bootstrap_ci", "holm", "sign_test", "spearman_ci"]

BOOT = 2000  # bootstrap resamples


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down; NaN stays NaN and does not count as a test)."""
    p = np.asarray(p_values, dtype=float)
    ok = np.flatnonzero(np.isfinite(p))
    out = np.full(p.shape, math.nan)
    order = ok[np.argsort(p[ok], kind="stable")]
    m, running = len(order), 0.0
    for i, idx in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[idx]))
        out[idx] = running
    return [round(float(v), 12) for v in out]


def _spearman(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    from scipy.stats import spearmanr

    if len(x) < 3 or np.unique(x).size < 2 or np.unique(y).size < 2:
        return math.nan, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = spearmanr(x, y)
    return float(r.statistic), float(r.pvalue)


EXACT_MAX_N = 8  # up to here the p-value enumerates every permutation (8! = 40,320)


def _exact_p(x: np.ndarray, y: np.ndarray, rho: float) -> float:
    """Two-sided permutation p-value of Spearman's rho: scipy's t approximation says p = 0 for a
    perfect rank order of three points, where one in three orders of three points is as extreme.

    >>> _exact_p(np.array([1., 2, 3]), np.array([1., 2, 3]), 1.0)
    0.3333333333333333
    """
    from itertools import permutations

    from scipy.stats import rankdata

    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt((rx @ rx) * (ry @ ry))
    perms = np.array(list(permutations(ry)))
    rhos = perms @ rx / denom
    return float(np.mean(np.abs(rhos) >= abs(rho) - 1e-12))


def spearman_ci(x: Sequence[float], y: Sequence[float], *, seed: int = 0,
                boot: int = BOOT) -> tuple[float, float, float, float, int]:
    """``(rho, p, lo, hi, n)``: Spearman's rho, its p-value and a 95% percentile bootstrap interval over pairs.

    Pairs where either value is not finite are dropped; resamples with a constant side are skipped.

    >>> rho, p, lo, hi, n = spearman_ci([1, 2, 3, 4, 5, 6], [1, 3, 2, 4, 6, 5])
    >>> round(rho, 3), n, lo <= rho <= hi
    (0.886, 6, True)
    """
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(xs) & np.isfinite(ys)
    xs, ys = xs[ok], ys[ok]
    rho, p = _spearman(xs, ys)
    if not math.isfinite(rho):
        return rho, p, math.nan, math.nan, len(xs)
    if len(xs) <= EXACT_MAX_N:
        p = _exact_p(xs, ys, rho)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(boot):
        i = rng.integers(0, len(xs), len(xs))
        r, _p = _spearman(xs[i], ys[i])
        if math.isfinite(r):
            draws.append(r)
    lo, hi = np.percentile(draws, [2.5, 97.5]) if draws else (math.nan, math.nan)
    return rho, p, float(lo), float(hi), len(xs)


def bootstrap_ci(values: Sequence[float], stat: Callable[[np.ndarray], float] = np.mean, *, seed: int = 0,
                 boot: int = BOOT) -> tuple[float, float]:
    """95% percentile bootstrap interval of ``stat`` over ``values`` (resampled with replacement).

    >>> lo, hi = bootstrap_ci([0, 1, 1, 1])
    >>> 0.0 <= lo <= 0.75 <= hi <= 1.0
    True
    """
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    draws = [stat(v[rng.integers(0, len(v), len(v))]) for _ in range(boot)]
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return float(lo), float(hi)


def sign_test(differences: Sequence[float]) -> tuple[int, int, float]:
    """``(positive, negative, p)``: two-sided exact sign test of paired differences (zeros dropped).

    >>> sign_test([1, 2, 1, 0, 3, 1, 2])
    (6, 0, 0.03125)
    """
    from scipy.stats import binomtest

    d = np.asarray(differences, dtype=float)
    pos, neg = int((d > 0).sum()), int((d < 0).sum())
    if pos + neg == 0:
        return 0, 0, 1.0
    return pos, neg, float(binomtest(pos, pos + neg, 0.5).pvalue)
