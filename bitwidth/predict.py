"""Predict each (layer, kind)'s minimum bit width from its recorded distribution, with a calibrated model.

The default prediction is a line in the stream's dynamic range (the octaves between the
1st and 99.99th percentile of |x| on the fp32 model's recorded weights, activations or
gradients; :func:`bitwidth.histogram.histogram_stats`), rounded to the nearest candidate:
:data:`LINEAR` holds its intercept and slope per (family, kind). Where a stream has no
line, the SQNR rule decides: the fewest candidate bits whose quantization SQNR on the
recorded sample (:func:`bitwidth.stats_analysis.sweep`) reaches a threshold, taken
halfway towards the median minimum measured for the (family, kind)
(:func:`midpoint_bits`; :data:`CALIBRATION` and :data:`MEDIAN_BITS`).
None of it is assumed: every number is fitted to minima measured by search on five
models (digits MLP, CNN and ResNet, an MNIST-1D MLP, a byte-level transformer) by
``python experiments/predictor.py``, which also validates the prediction
leave-one-model-out (:data:`VALIDATION`; the variants tried, details and intervals in
``experiments/results/predictor.md``). The ``int`` calibration comes from post-training
minima (accuracy within 1 point, loss within 5%), the ``fixed`` one from training-mode
minima (training converges). A pair the calibration did not see (another family or kind)
uses the SQNR rule alone at :data:`UNCALIBRATED_SQNR_DB`, the old 30 dB rule; pass
``sqnr_db=`` for the SQNR rule alone at any threshold.

>>> threshold_db("int", "weight"), threshold_db("fixed", "gradient"), threshold_db("float", "weight")
(5.25, 0.25, 30.0)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    from .stats import Recorder

__all__ = ["CALIBRATION", "LINEAR", "MEDIAN_BITS", "UNCALIBRATED_SQNR_DB", "VALIDATION", "linear_bits",
           "midpoint_bits", "nearest_candidate", "predict_from_sweep", "predict_min_bits", "threshold_db",
           "validation_text"]

# 6.02 dB per bit: 30 dB is about five bits of a uniform quantizer on a full-range signal.
UNCALIBRATED_SQNR_DB = 30.0

# SQNR thresholds (dB) per (family, kind), fitted on every studied model by
# experiments/predictor.py (experiments/results/predictor_calibration.json).
CALIBRATION: dict[tuple[str, str], float] = {
    ("int", "activation"): 2.0,
    ("int", "weight"): 5.25,
    ("fixed", "activation"): 0.5,
    ("fixed", "gradient"): 0.25,
    ("fixed", "weight"): 1.75,
}

# Median measured minimum per (family, kind) over every studied model, on its candidate grid
# (the smallest candidate at or above the median; 17 and 13 would mean "none passed").
MEDIAN_BITS: dict[tuple[str, str], float] = {
    ("int", "activation"): 3.0,
    ("int", "weight"): 3.0,
    ("fixed", "activation"): 2.0,
    ("fixed", "gradient"): 2.0,
    ("fixed", "weight"): 2.0,
}

# Least-squares line of the measured minimum (bits) on the dynamic range (octaves) per
# (family, kind), fitted on every studied model by experiments/predictor.py: (intercept, slope).
LINEAR: dict[tuple[str, str], tuple[float, float]] = {
    ("int", "activation"): (0.0645, 0.3201),
    ("int", "weight"): (2.1579, 0.071),
    ("fixed", "activation"): (0.0447, 0.3203),
    ("fixed", "gradient"): (2.2102, 0.0568),
    ("fixed", "weight"): (1.6379, 0.123),
}

# Leave-one-model-out accuracy of the default prediction per family, from the same run
# (experiments/results/predictor.md): held-out (site, kind, seed) rows, exact and within one
# bit, the calibrated SQNR rule alone (``rule_``) and the baseline of predicting the median
# minimum of the other models (``median_``). Both families reach the target of 80% within one
# bit and beat the median; the line was chosen among eight variants on these same data, and
# choosing inside each fold instead gives 78% pooled (predictor.md).
VALIDATION: dict[str, dict[str, float]] = {
    "int": {"n": 204, "models": 5, "exact": 0.304, "within1": 0.892, "rule_exact": 0.275, "rule_within1": 0.686,
            "median_exact": 0.054, "median_within1": 0.853},
    "fixed": {"n": 306, "models": 5, "exact": 0.258, "within1": 0.859, "rule_exact": 0.229, "rule_within1": 0.696,
              "median_exact": 0.124, "median_within1": 0.673},
}


def threshold_db(family: str, kind: str) -> float:
    """The calibrated SQNR threshold of ``(family, kind)``, or :data:`UNCALIBRATED_SQNR_DB` if uncalibrated."""
    return CALIBRATION.get((family, kind), UNCALIBRATED_SQNR_DB)


def validation_text(family: str) -> str | None:
    """One sentence stating the rule's validated accuracy for ``family``, or None if it was not validated.

    >>> validation_text("float") is None
    True
    """
    v = VALIDATION.get(family)
    if not v:
        return None
    return (f"validated leave-one-model-out on {int(v['n'])} held-out (site, kind, seed) minima of {int(v['models'])} "
            f"models: {v['exact']:.0%} exact, {v['within1']:.0%} within one bit (predicting the other models' "
            f"median: {v['median_within1']:.0%} within one bit)")


def nearest_candidate(bits: float, candidates: Iterable[float]) -> float:
    """The candidate nearest ``bits``; ties go to the fewer bits. "None passed" is one above
    the largest candidate, on the grid like the others.

    >>> nearest_candidate(5.2, [2, 4, 8]), nearest_candidate(6.0, [2, 4, 8]), nearest_candidate(30, [2, 4, 8])
    (4, 4, 9)
    """
    grid = sorted(candidates)
    grid.append(grid[-1] + 1)
    return min(grid, key=lambda b: (abs(b - bits), b))


def midpoint_bits(rule_bits: float, median_bits: float, candidates: Iterable[float]) -> float:
    """The candidate nearest ``(rule_bits + median_bits) / 2`` (:func:`nearest_candidate`).

    >>> midpoint_bits(16, 4, [2, 4, 8, 16]), midpoint_bits(2, 5, [2, 3, 4, 5]), midpoint_bits(17, 8, [2, 8, 16])
    (8, 3, 16)
    """
    return nearest_candidate((rule_bits + median_bits) / 2, candidates)


def linear_bits(dynamic_range: float, line: tuple[float, float], candidates: Iterable[float]) -> float:
    """The candidate nearest ``intercept + slope * dynamic_range``; an unknown range counts as 0 octaves.

    >>> linear_bits(10.0, (2.0, 0.25), [2, 3, 4, 6, 8])
    4
    """
    dr = 0.0 if dynamic_range is None or not math.isfinite(dynamic_range) else float(dynamic_range)
    return nearest_candidate(line[0] + line[1] * dr, candidates)


def predict_from_sweep(sw: pd.DataFrame, family: str, thresholds: Mapping[str, float] | float,
                       medians: Mapping[str, float] | None = None,
                       chosen: Mapping[tuple[str, str], float] | None = None) -> pd.DataFrame:
    """Per stream of a sweep table: the fewest bits whose SQNR reaches its kind's threshold, or the midpoint.

    ``sw``: :func:`bitwidth.stats_analysis.sweep`'s table (``layer, kind[, quantized, step],
    bits, format, sqnr_db``). ``thresholds``: one threshold for all, or one per kind.
    ``medians``: a median minimum per kind; a kind with one gets :func:`midpoint_bits` of
    the SQNR rule's bits and its median instead. ``chosen``: a width per (layer, kind) that
    another model predicted, which replaces both. ``min_bits`` is ``<NA>`` (and ``format``
    None) where the prediction is "none passes"; ``sqnr_db`` is then the best one reached,
    else the SQNR at ``min_bits``.

    >>> sw = pd.DataFrame({"layer": ["a"] * 3, "kind": ["weight"] * 3, "bits": [2, 4, 8],
    ...                    "format": ["int2", "int4", "int8"], "sqnr_db": [3.0, 14.0, 38.0]})
    >>> predict_from_sweep(sw, "int", {"weight": 12.0})[["min_bits", "format", "threshold_db"]].values.tolist()
    [[4, 'int4', 12.0]]
    >>> predict_from_sweep(sw, "int", {"weight": 12.0}, {"weight": 8})[["min_bits", "sqnr_db"]].values.tolist()
    [[4, 14.0]]
    """
    keys = [c for c in ("layer", "kind", "quantized", "step") if c in sw.columns]
    rows = []
    for _, g in sw.sort_values("bits").groupby(keys, sort=False):
        kind = g["kind"].iloc[0]
        thr = float(thresholds if not isinstance(thresholds, Mapping) else thresholds.get(kind, UNCALIBRATED_SQNR_DB))
        ok = g[g["sqnr_db"] >= thr]
        hit = ok.iloc[0] if len(ok) else None
        grid = [int(b) for b in g["bits"]]
        if chosen is not None and (g["layer"].iloc[0], kind) in chosen:
            picked = g[g["bits"] == chosen[(g["layer"].iloc[0], kind)]]
            hit = picked.iloc[0] if len(picked) else None
        elif medians is not None and kind in medians:
            rule = hit["bits"] if hit is not None else grid[-1] + 1
            mid = g[g["bits"] == midpoint_bits(rule, medians[kind], grid)]
            hit = mid.iloc[0] if len(mid) else None
        rows.append({**g.iloc[0][keys].to_dict(), "family": family,
                     "min_bits": None if hit is None else int(hit["bits"]),
                     "format": None if hit is None else hit["format"],
                     "sqnr_db": float(g["sqnr_db"].max() if hit is None else hit["sqnr_db"]),
                     "threshold_db": thr})
    df = pd.DataFrame(rows, columns=keys + ["family", "min_bits", "format", "sqnr_db", "threshold_db"])
    return df.astype({"min_bits": "Int64"})


def predict_min_bits(recorder: Recorder, family: str, candidates: Iterable[int], *,
                     sqnr_db: float | None = None, **options: Any) -> pd.DataFrame:
    """Predicted minimum bits per recorded (layer, kind[, step]): the calibrated prediction.

    Formats as :func:`bitwidth.stats_analysis.sweep` makes them (``options`` are the
    family's fixed fields). Where :data:`LINEAR` has the (family, kind), the prediction is
    :func:`linear_bits` of the stream's dynamic range; else, where :data:`MEDIAN_BITS` has
    it, :func:`midpoint_bits` of the SQNR rule (at :func:`threshold_db`) and the median;
    else the SQNR rule alone. ``sqnr_db`` sets one threshold for
    all and returns the SQNR rule alone (``sqnr_db=30`` is the uncalibrated rule).
    ``min_bits`` is missing (and ``format`` None) where the prediction is "none passes";
    ``sqnr_db`` is then the best one reached, else the SQNR at ``min_bits``;
    ``threshold_db`` is the SQNR rule's threshold.

    >>> import torch
    >>> import torch.nn as nn
    >>> from bitwidth.stats import record
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(64, 8))
    >>> with record(model, kinds="weight") as rec:
    ...     _ = model(torch.randn(2, 64))
    >>> predict_min_bits(rec, "int", range(2, 9), sqnr_db=30)[["layer", "min_bits", "format"]].values.tolist()
    [['0', 6, 'int6']]
    """
    from .histogram import first_raw_step, histogram_stats
    from .stats_analysis import sweep  # stats_analysis re-exports this function: import it when called

    sw = sweep(recorder, family, candidates, **options)
    kinds = sw["kind"].unique() if len(sw) else []
    thresholds = {k: threshold_db(family, k) if sqnr_db is None else float(sqnr_db) for k in kinds}
    if sqnr_db is not None:
        return predict_from_sweep(sw, family, thresholds)
    medians = {k: MEDIAN_BITS[(family, k)] for k in kinds if (family, k) in MEDIAN_BITS}
    chosen = None
    if any((family, k) in LINEAR for k in kinds):
        grid = sorted(int(b) for b in sw["bits"].unique())
        chosen = {(r.layer, r.kind): linear_bits(r.dynamic_range, LINEAR[(family, r.kind)], grid)
                  for r in histogram_stats(first_raw_step(recorder.hist_frame())).itertuples()
                  if (family, r.kind) in LINEAR}
    return predict_from_sweep(sw, family, thresholds, medians, chosen)
