"""Predict each (layer, kind)'s minimum bit width from its recorded distribution, with a calibrated rule.

The SQNR rule: the fewest candidate bits whose quantization SQNR on the recorded sample
(the fp32 model's weights, activations or gradients; :func:`bitwidth.stats_analysis.sweep`)
reaches a threshold. The default prediction is the candidate nearest the midpoint of that
rule's bits and the median minimum measured for the (family, kind) (:func:`midpoint_bits`).
Neither is assumed: :data:`CALIBRATION` holds a threshold per (family, kind) and
:data:`MEDIAN_BITS` a median, both fitted to minima measured by search on five models
(digits MLP, CNN and ResNet, an MNIST-1D MLP, a byte-level transformer) by
``python experiments/predictor.py``, which also validates the prediction
leave-one-model-out (:data:`VALIDATION`; the variants tried, details and intervals in
``experiments/results/predictor.md``). The ``int`` calibration comes from post-training
minima (accuracy within 1 point, loss within 5%), the ``fixed`` one from training-mode
minima (training converges). A pair the calibration did not see (another family or kind)
uses the SQNR rule alone at :data:`UNCALIBRATED_SQNR_DB`, the old 30 dB rule; pass
``sqnr_db=`` for the SQNR rule alone at any threshold.

>>> threshold_db("int", "weight"), threshold_db("fixed", "gradient"), threshold_db("float", "weight")
(4.25, 20.75, 30.0)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    from .stats import Recorder

__all__ = ["CALIBRATION", "MEDIAN_BITS", "UNCALIBRATED_SQNR_DB", "VALIDATION", "midpoint_bits", "predict_from_sweep",
           "predict_min_bits", "threshold_db", "validation_text"]

# 6.02 dB per bit: 30 dB is about five bits of a uniform quantizer on a full-range signal.
UNCALIBRATED_SQNR_DB = 30.0

# SQNR thresholds (dB) per (family, kind), fitted on every studied model by
# experiments/predictor.py (experiments/results/predictor_calibration.json).
CALIBRATION: dict[tuple[str, str], float] = {
    ("int", "activation"): 4.25,
    ("int", "weight"): 4.25,
    ("fixed", "activation"): 3.75,
    ("fixed", "gradient"): 20.75,
    ("fixed", "weight"): 3.25,
}

# Median measured minimum per (family, kind) over every studied model, on its candidate grid
# (the smallest candidate at or above the median; 17 and 13 would mean "none passed").
MEDIAN_BITS: dict[tuple[str, str], float] = {
    ("int", "activation"): 3.0,
    ("int", "weight"): 3.0,
    ("fixed", "activation"): 4.0,
    ("fixed", "gradient"): 6.0,
    ("fixed", "weight"): 4.0,
}

# Leave-one-model-out accuracy of the default prediction per family, from the same run
# (experiments/results/predictor.md): held-out (site, kind, seed) rows, exact and within one
# bit, the calibrated SQNR rule alone (``rule_``) and the baseline of predicting the median
# minimum of the other models (``median_``). Neither family meets the target of 80% within
# one bit and beating the median; pooled the default beats both (70% vs 64% and 67%).
VALIDATION: dict[str, dict[str, float]] = {
    "int": {"n": 204, "models": 5, "exact": 0.142, "within1": 0.853, "rule_exact": 0.304, "rule_within1": 0.76,
            "median_exact": 0.142, "median_within1": 0.863},
    "fixed": {"n": 162, "models": 5, "exact": 0.296, "within1": 0.5, "rule_exact": 0.272, "rule_within1": 0.494,
              "median_exact": 0.278, "median_within1": 0.438},
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


def midpoint_bits(rule_bits: float, median_bits: float, candidates: Iterable[float]) -> float:
    """The candidate nearest ``(rule_bits + median_bits) / 2``; ties go to the fewer bits.

    "None passed" is one above the largest candidate, on the grid like the others.

    >>> midpoint_bits(16, 4, [2, 4, 8, 16]), midpoint_bits(2, 5, [2, 3, 4, 5]), midpoint_bits(17, 8, [2, 8, 16])
    (8, 3, 16)
    """
    grid = sorted(candidates)
    grid.append(grid[-1] + 1)
    target = (rule_bits + median_bits) / 2
    return min(grid, key=lambda b: (abs(b - target), b))


def predict_from_sweep(sw: pd.DataFrame, family: str, thresholds: Mapping[str, float] | float,
                       medians: Mapping[str, float] | None = None) -> pd.DataFrame:
    """Per stream of a sweep table: the fewest bits whose SQNR reaches its kind's threshold, or the midpoint.

    ``sw``: :func:`bitwidth.stats_analysis.sweep`'s table (``layer, kind[, quantized, step],
    bits, format, sqnr_db``). ``thresholds``: one threshold for all, or one per kind.
    ``medians``: a median minimum per kind; a kind with one gets :func:`midpoint_bits` of
    the SQNR rule's bits and its median instead. ``min_bits`` is ``<NA>`` (and ``format``
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
        if medians is not None and kind in medians:
            grid = [int(b) for b in g["bits"]]
            rule = hit["bits"] if hit is not None else grid[-1] + 1
            chosen = g[g["bits"] == midpoint_bits(rule, medians[kind], grid)]
            hit = chosen.iloc[0] if len(chosen) else None
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
    family's fixed fields). Each stream's SQNR rule uses :func:`threshold_db` of its family
    and kind; where :data:`MEDIAN_BITS` has the (family, kind), the prediction is
    :func:`midpoint_bits` of that rule and the median. ``sqnr_db`` sets one threshold for
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
    from .stats_analysis import sweep  # stats_analysis re-exports this function: import it when called

    sw = sweep(recorder, family, candidates, **options)
    kinds = sw["kind"].unique() if len(sw) else []
    thresholds = {k: threshold_db(family, k) if sqnr_db is None else float(sqnr_db) for k in kinds}
    medians = None if sqnr_db is not None else {
        k: MEDIAN_BITS[(family, k)] for k in kinds if (family, k) in MEDIAN_BITS}
    return predict_from_sweep(sw, family, thresholds, medians)
