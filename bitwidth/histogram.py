"""Statistics of recorded log2 histograms: how many octaves a distribution spans.

The recorder keeps each stream's |x| in log2-spaced bins (:meth:`bitwidth.stats.Recorder.hist_frame`);
these read quantiles off them. The report shows them; :func:`bitwidth.predict_min_bits`
predicts from ``dynamic_range``.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

__all__ = ["first_raw_step", "hist_quantile", "histogram_stats"]


def hist_quantile(lo: np.ndarray, hi: np.ndarray, n: np.ndarray, q: float) -> float:
    """The q-quantile of |x| from log2 histogram bins, interpolated geometrically inside the bin."""
    total = n.sum()
    if total == 0:
        return math.nan
    cum = np.cumsum(n)
    i = int(np.searchsorted(cum, q * total))
    i = min(i, len(n) - 1)
    before = cum[i] - n[i]
    frac = (q * total - before) / n[i]
    return float(lo[i] * (hi[i] / lo[i]) ** frac) if lo[i] > 0 else float(hi[i] * frac)


def histogram_stats(hist: pd.DataFrame) -> pd.DataFrame:
    """Per (layer, kind) of a recorder's log2 histogram table (:meth:`Recorder.hist_frame`):
    ``octaves_below_max`` (log2 of the largest |x| over the median |x|) and ``dynamic_range``
    (log2 of the 99.99th over the 1st percentile of |x|: the octaves the bulk spans).

    >>> h = pd.DataFrame({"layer": "fc", "kind": "weight", "lo": [0.25, 0.5], "hi": [0.5, 1.0], "n": [50, 50],
    ...                   "min": -1.0, "max": 1.0})
    >>> histogram_stats(h).round(2).values.tolist()
    [['fc', 'weight', 1.0, 1.98]]
    """
    rows = []
    for (layer, kind), h in hist.groupby(["layer", "kind"], sort=False):
        lo, hi, n = (h[c].to_numpy(dtype=float) for c in ("lo", "hi", "n"))
        med, p1, p9999 = (hist_quantile(lo, hi, n, q) for q in (0.5, 0.01, 0.9999))
        absmax = max(abs(float(h["min"].iloc[0])), abs(float(h["max"].iloc[0])))
        rows.append({"layer": layer, "kind": kind,
                     "octaves_below_max": math.log2(absmax / med) if med > 0 else math.nan,
                     "dynamic_range": math.log2(p9999 / p1) if p1 > 0 else math.nan})
    return pd.DataFrame(rows, columns=["layer", "kind", "octaves_below_max", "dynamic_range"])


def first_raw_step(frame: pd.DataFrame) -> pd.DataFrame:
    """Raw (not quantized) rows of the first recorded step: the distribution a search starts from.

    >>> f = pd.DataFrame({"step": [0, 0, 1], "quantized": [False, True, False], "n": [1, 2, 3]})
    >>> first_raw_step(f)["n"].tolist()
    [1]
    """
    if "quantized" in frame.columns:
        frame = frame[~frame["quantized"].astype(bool)]
    if "step" in frame.columns and len(frame):
        frame = frame[frame["step"] == frame["step"].min()]
    return frame
