"""Claim: minimum bits can be predicted from the fp32 distribution. Calibrate predictors, validate them per model.

The SQNR rule: the fewest candidate bits whose quantization SQNR on the recorded fp32
sample reaches a threshold. Here the threshold is fitted per (family, kind) to the
measured minima (every seed's own search), choosing the one that maximises the fraction
of pairs predicted within one bit (ties: more exact, then the middle of the tied
thresholds). Validation is leave-one-model-out: fit on four models, predict the fifth,
over every held-out (site, kind, seed). The naive baseline predicts the median minimum of
the four other models for that (mode, kind); the old uncalibrated rule uses 30 dB.
Intervals: 95% bootstrap over (model, site, kind) clusters, so a pair's seeds are
resampled together.

Variants, all fitted per (mode, kind) on the other models only (:data:`VARIANTS`): a
least-squares line of the minimum on the dynamic range (the default since these
measurements); the midpoint of the SQNR rule and the median (the previous default); the rule plus
the median residual of the training models; a weighted mix of rule and median (weight
fitted on a 0.1 grid); least-squares lines on the rule's bits, on rule, dynamic range
and log2 kurtosis together, and on the SQNR at 4 and 8 bits. Regressions are rounded to
the nearest candidate. A nested run chooses the variant inside each fold, which is what
choosing is worth on an unseen model. :func:`bitwidth.predict_min_bits` ships the line on
dynamic range fitted on all five models (``linear_dynamic_range`` in the JSON).

    python experiments/predictor.py [--quick]

Writes ``experiments/results/predictor.md``, ``predictor.png`` and
``predictor_calibration.json`` (the thresholds fitted on every model and the validation
figures that ``bitwidth/predict.py`` ships); reuses the searches of ``per_layer_minima.py``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from common import FAMILY_OF_MODE, collect, md_table, ranked_bits, save_figure, sqnr_bits, study_from_args, write_result
from inference import BOOT

from bitwidth.predict import midpoint_bits, nearest_candidate

MODES = ("ptq", "train")
THRESHOLDS = np.arange(0.0, 60.25, 0.25)  # dB
TARGET = 0.80  # the target: within one bit for 80% of held-out pairs
WEIGHTS = np.round(np.arange(0.0, 1.01, 0.1), 1)  # the rule's weight in the fitted mix of rule and median
# Every predictor validated: column of the held-out table -> its description. ``pred`` is the shipped default.
VARIANTS = {
    "pred": "linear on dynamic range (default)",
    "nested": "variant chosen by inner leave-one-model-out",
    "midpoint": "midpoint of SQNR rule and median (the previous default)",
    "rule": "calibrated SQNR rule",
    "median": "median of the other models (baseline)",
    "rule30": "30 dB SQNR rule (uncalibrated)",
    "offset": "SQNR rule + median residual",
    "mix": "fitted mix w·rule + (1−w)·median",
    "ols_rule": "linear on rule bits",
    "ols_three": "linear on rule bits, dynamic range, log2 kurtosis",
    "ols_sqnr": "linear on SQNR at 4 and 8 bits",
}


def _scores(pred: pd.Series, true: pd.Series) -> tuple[float, float]:
    d = (pred - true).abs()
    return float((d <= 1).mean()), float((d == 0).mean())


def fit_threshold(rows: pd.DataFrame, candidates: Sequence[int]) -> float:
    """The threshold maximising within-one-bit, then exact; the middle of the tied best ones."""
    best, tied = (-1.0, -1.0), []
    for t in THRESHOLDS:
        score = _scores(sqnr_bits(rows, candidates, t), rows["bits"])
        if score > best:
            best, tied = score, [t]
        elif score == best:
            tied.append(t)
    return float(tied[len(tied) // 2])


def fit(rows: pd.DataFrame, candidates: dict[str, Sequence[int]]) -> dict[tuple[str, str], float]:
    """A threshold per (mode, kind) fitted on ``rows``."""
    return {(mode, kind): fit_threshold(g, candidates[mode]) for (mode, kind), g in rows.groupby(["mode", "kind"])}


def _median_prediction(train: pd.Series, candidates: Sequence[int]) -> float:
    med = float(np.median(train))
    return float(next((c for c in sorted(candidates) if c >= med), max(candidates) + 1))


def _step_distance(pred: pd.Series, true: pd.Series, candidates: Sequence[int]) -> pd.Series:
    grid = sorted(candidates) + [max(candidates) + 1]
    return (pred.map(grid.index) - true.map(grid.index)).abs()


def _snap(x: np.ndarray, candidates: Sequence[int]) -> np.ndarray:
    """Each value's nearest candidate, "none passed" (one above the largest) included; ties to fewer bits."""
    return np.array([float(nearest_candidate(v, candidates)) for v in x])


def _features(rows: pd.DataFrame, candidates: Sequence[int], threshold: float) -> dict[str, np.ndarray]:
    """Design matrices of the linear variants (without the intercept)."""
    rule = sqnr_bits(rows, candidates, threshold).to_numpy()
    dyn = rows["dynamic_range"].fillna(0.0).to_numpy(dtype=float)
    kurt = np.log2(rows["kurtosis"].fillna(0.0).to_numpy(dtype=float) + 3.0)  # excess kurtosis + 3 > 0
    sq = rows[["sqnr_4", "sqnr_8"]].fillna(0.0).to_numpy(dtype=float)
    return {"ols_rule": rule[:, None], "ols_range": dyn[:, None], "ols_three": np.c_[rule, dyn, kurt],
            "ols_sqnr": sq}


def _fit_mix(rule: np.ndarray, median: float, bits: np.ndarray, candidates: Sequence[int]) -> float:
    """The weight of the rule maximising within-one-bit, then exact, on the training rows (first of ties)."""
    def score(w: float) -> tuple[float, float]:
        d = np.abs(_snap(w * rule + (1 - w) * median, candidates) - bits)
        return float((d <= 1).mean()), float((d == 0).mean())

    return float(max(WEIGHTS, key=score))


def _variants(train: pd.DataFrame, test: pd.DataFrame, candidates: Sequence[int], threshold: float,
              median: float) -> dict[str, np.ndarray]:
    """Every variant's predictions for ``test``, fitted on ``train`` (one mode and kind)."""
    y = train["bits"].to_numpy(dtype=float)
    rule_tr = sqnr_bits(train, candidates, threshold).to_numpy()
    rule = sqnr_bits(test, candidates, threshold).to_numpy()
    w = _fit_mix(rule_tr, median, y, candidates)
    out = {"midpoint": np.array([float(midpoint_bits(r, median, candidates)) for r in rule]),
           "rule": rule, "median": np.full(len(test), median),
           "rule30": sqnr_bits(test, candidates, 30.0).to_numpy(),
           "offset": _snap(rule + float(np.median(y - rule_tr)), candidates),
           "mix": _snap(w * rule + (1 - w) * median, candidates)}
    f_tr, f_te = _features(train, candidates, threshold), _features(test, candidates, threshold)
    for name, x in f_tr.items():
        beta = np.linalg.lstsq(np.c_[np.ones(len(x)), x], y, rcond=None)[0]
        out[name] = _snap(np.c_[np.ones(len(f_te[name])), f_te[name]] @ beta, candidates)
    out["pred"] = out.pop("ols_range")
    return out


def line_on_dynamic_range(rows: pd.DataFrame) -> tuple[float, float]:
    """(intercept, slope): least squares of the minimum on the dynamic range, as the ``pred`` variant fits it."""
    x = rows["dynamic_range"].fillna(0.0).to_numpy(dtype=float)
    beta = np.linalg.lstsq(np.c_[np.ones(len(x)), x], rows["bits"].to_numpy(dtype=float), rcond=None)[0]
    return round(float(beta[0]), 4), round(float(beta[1]), 4)


def nested_selection(rows: pd.DataFrame, held: pd.DataFrame,
                     candidates: dict[str, Sequence[int]]) -> tuple[np.ndarray, dict[str, str]]:
    """The ``nested`` column: per held-out model, the variant that scored best within one bit in a
    leave-one-model-out run on the *other* models only, and that variant's predictions for it.

    This is what choosing the best variant is worth on a model none of the choice saw; the
    pooled table's best variant was chosen on all of them, so its own figure is optimistic.
    """
    pool = [c for c in VARIANTS if c not in ("nested", "rule30")]
    out, chosen = np.full(len(held), np.nan), {}
    for model in dict.fromkeys(held["model"]):
        others = rows[rows["model"] != model]
        if others["model"].nunique() < 2:  # nothing to hold out inside the fold: no choice to make
            chosen[model] = "none (fewer than two other models)"
            continue
        inner = leave_one_model_out(others, candidates)
        best = max(pool, key=lambda c: float(((inner[c] - inner["bits"]).abs() <= 1).mean()))
        chosen[model] = VARIANTS[best]
        mask = (held["model"] == model).to_numpy()
        out[mask] = held.loc[mask, best].to_numpy(dtype=float)
    return out, chosen


def leave_one_model_out(rows: pd.DataFrame, candidates: dict[str, Sequence[int]]) -> pd.DataFrame:
    """Every row predicted by every variant fitted without its model (columns named as in :data:`VARIANTS`)."""
    out = []
    for model in dict.fromkeys(rows["model"]):
        train, test = rows[rows["model"] != model], rows[rows["model"] == model].copy()
        thresholds = fit(train, candidates)
        for (mode, kind), g in test.groupby(["mode", "kind"]):
            cands = candidates[mode]
            others = train[(train["mode"] == mode) & (train["kind"] == kind)]
            if others.empty:
                continue  # no other model has this (mode, kind): nothing to calibrate on
            g = g.copy()
            g["threshold"] = thresholds[(mode, kind)]
            preds = _variants(others, g, cands, thresholds[(mode, kind)], _median_prediction(others["bits"], cands))
            for col, values in preds.items():
                g[col] = values
            for col in ("pred", "rule", "median"):
                g[f"{col}_step"] = _step_distance(g[col], g["bits"], cands)
            out.append(g)
    return pd.concat(out, ignore_index=True)


def _cluster_boot(held: pd.DataFrame, values: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean of per-row ``values``, resampling (model, mode, site, kind) clusters.

    Vectorised: each cluster's sum and row count once, then every resample at once, so a
    table of a hundred intervals takes seconds, not minutes.
    """
    codes = held.groupby(["model", "mode", "layer", "kind"], sort=False).ngroup().to_numpy()
    k = int(codes.max()) + 1
    sums = np.bincount(codes, weights=np.asarray(values, dtype=float), minlength=k)
    counts = np.bincount(codes, minlength=k).astype(float)
    pick = np.random.default_rng(seed).integers(0, k, (BOOT, k))
    draws = sums[pick].sum(axis=1) / counts[pick].sum(axis=1)
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return float(lo), float(hi)


def _within1(held: pd.DataFrame, col: str) -> np.ndarray:
    return ((held[col] - held["bits"]).abs() <= 1).to_numpy(dtype=float)


def accuracy_table(held: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Exact and within-one-bit fractions of the default, the SQNR rule, the median and the 30 dB rule."""
    rows = []
    groups = held.groupby(by, sort=False) if by else [("all", held)]
    for key, g in groups:
        row = dict(zip(by, key if isinstance(key, tuple) else (key,), strict=False)) if by else {"scope": "all"}
        row["n"] = len(g)
        row["pairs"] = g.groupby(["model", "mode", "layer", "kind"]).ngroups
        for col, name in (("pred", "default"), ("rule", "SQNR rule"), ("median", "median"), ("rule30", "30 dB")):
            d = (g[col] - g["bits"]).abs()
            row[f"{name} exact"] = float((d == 0).mean())
            row[f"{name} ±1"] = float((d <= 1).mean())
        for col, name in (("pred", "default"), ("rule", "SQNR rule"), ("median", "median")):
            row[f"{name} ±1 step"] = float((g[f"{col}_step"] <= 1).mean())
        lo, hi = _cluster_boot(g, _within1(g, "pred"))
        row["default ±1 95% CI"] = f"[{lo:.0%}, {hi:.0%}]"
        lo, hi = _cluster_boot(g, _within1(g, "pred") - _within1(g, "median"))
        row["±1: default − median, 95% CI"] = f"[{lo:+.0%}, {hi:+.0%}]"
        rows.append(row)
    return pd.DataFrame(rows)


def variants_table(held: pd.DataFrame) -> pd.DataFrame:
    """Every variant's exact and within-one-bit fractions pooled and per mode, with bootstrap intervals."""
    rows = []
    for scope, rows_ in [("all", held)] + [(m, held[held["mode"] == m]) for m in MODES]:
        for col, name in VARIANTS.items():
            g = rows_[rows_[col].notna()]  # the nested choice is undefined in a fold with one other model
            if g.empty:
                continue
            d = (g[col] - g["bits"]).abs()
            exact, within = float((d == 0).mean()), float((d <= 1).mean())
            elo, ehi = _cluster_boot(g, (g[col] == g["bits"]).to_numpy(dtype=float))
            lo, hi = _cluster_boot(g, _within1(g, col))
            row = {"scope": scope, "variant": name, "n": len(g), "exact": exact,
                   "exact 95% CI": f"[{elo:.0%}, {ehi:.0%}]", "±1": within, "±1 95% CI": f"[{lo:.0%}, {hi:.0%}]"}
            if col != "median":
                dlo, dhi = _cluster_boot(g, _within1(g, col) - _within1(g, "median"))
                row["±1 − median, 95% CI"] = f"[{dlo:+.0%}, {dhi:+.0%}]"
            rows.append(row)
    return pd.DataFrame(rows).fillna("—")


def figure(held: pd.DataFrame) -> object:
    """Held-out predicted against measured minima per mode, point size = count."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(MODES), figsize=(10, 4.2), squeeze=False)
    for ax, mode in zip(axes[0], MODES, strict=True):
        g = held[held["mode"] == mode]
        if g.empty:
            continue
        for col, colour, label in (("pred", "tab:blue", "linear on dynamic range (default)"),
                                   ("rule", "tab:green", "calibrated SQNR rule"), ("rule30", "tab:red", "30 dB")):
            counts = g.groupby(["bits", col]).size().reset_index(name="n")
            ax.scatter(counts["bits"], counts[col], s=12 * counts["n"], alpha=0.5, color=colour, label=label)
        lim = [1, g[["bits", "pred", "rule", "rule30"]].to_numpy().max() + 1]
        ax.plot(lim, lim, color="grey", lw=0.8)
        ax.fill_between(lim, [lim[0] - 1, lim[1] - 1], [lim[0] + 1, lim[1] + 1], color="grey", alpha=0.12)
        ax.set_xlabel("measured minimum (held-out model)")
        ax.set_ylabel("predicted")
        ax.set_title(f"{mode} ({FAMILY_OF_MODE[mode]}), leave-one-model-out; band: ±1 bit", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def main(argv: Sequence[str] | None = None) -> Path:
    """Calibrate, validate, write the result file, figure and calibration JSON; returns the result file's path."""
    start = time.perf_counter()
    study, _ = study_from_args(argv, __doc__, quick_models=("digits_mlp", "mnist1d_mlp"))
    long = collect(study, MODES)
    long["bits"] = pd.concat([ranked_bits(long[long["mode"] == m], study.candidates[m]) for m in MODES])
    held = leave_one_model_out(long, study.candidates)
    held["nested"], chosen = nested_selection(long, held, study.candidates)
    overall = accuracy_table(held, [])
    per_mode = accuracy_table(held, ["mode"])
    per_model = accuracy_table(held, ["mode", "model"])
    variants = variants_table(held)
    final = fit(long, study.candidates)
    medians = {(mode, kind): _median_prediction(g["bits"], study.candidates[mode])
               for (mode, kind), g in long.groupby(["mode", "kind"])}
    calib = {
        "thresholds_db": {FAMILY_OF_MODE[mode]: {kind: t for (m, kind), t in final.items() if m == mode}
                          for mode in MODES},
        "median_bits": {FAMILY_OF_MODE[mode]: {kind: b for (m, kind), b in medians.items() if m == mode}
                        for mode in MODES},
        "linear_dynamic_range": {FAMILY_OF_MODE[mode]: {kind: list(line_on_dynamic_range(g))
                                                        for (m, kind), g in long.groupby(["mode", "kind"]) if m == mode}
                                 for mode in MODES},
        "validation": {FAMILY_OF_MODE[r["mode"]]: {
            "n": r["n"], "models": int(held.loc[held["mode"] == r["mode"], "model"].nunique()),
            "exact": round(r["default exact"], 3), "within1": round(r["default ±1"], 3),
            "rule_exact": round(r["SQNR rule exact"], 3), "rule_within1": round(r["SQNR rule ±1"], 3),
            "median_exact": round(r["median exact"], 3), "median_within1": round(r["median ±1"], 3)}
            for r in per_mode.to_dict("records")},
        "source": "experiments/results/predictor.md",
    }
    study.out.mkdir(parents=True, exist_ok=True)
    (study.out / "predictor_calibration.json").write_text(json.dumps(calib, indent=1) + "\n")
    pct = {c: ".0%" for c in overall.columns if c.endswith(("exact", "±1", "step"))}
    fig = save_figure(study, figure(held), "predictor")
    thr = pd.DataFrame([{"family": FAMILY_OF_MODE[m], "mode": m, "kind": k, "threshold (dB)": t,
                         "median (bits)": medians[(m, k)]} for (m, k), t in final.items()])
    lomo_thr = held.groupby(["model", "mode", "kind"], sort=False)["threshold"].first().reset_index()
    sections = [
        "## Answer", "", _answer(overall, per_mode, variants), "",
        "## Variants tried", "",
        "All fitted per (mode, kind) on the four other models only. Every variant was specified in an earlier "
        "round, on earlier measurements (a constant learning rate, fewer training-mode sites), where the midpoint "
        "won with 70% within one bit and the line on dynamic range reached 54%; on these measurements the line "
        "wins and is the default. Picking the best of eight on the same data is optimistic, so the `nested` row "
        "makes the choice inside each fold: the variant that scores best in a leave-one-model-out run on the "
        "four training models alone predicts the fifth (chosen per held-out model: "
        + "; ".join(f"{m}: {v}" for m, v in chosen.items()) + "). Regressions and mixes are rounded to the "
        "nearest candidate (ties: fewer bits). `±1 − median`: difference in within-one-bit from the median "
        "baseline.", "",
        md_table(variants, {"exact": ".0%", "±1": ".0%"}), "",
        "## Leave-one-model-out accuracy", "",
        "`n`: held-out (site, kind, seed) rows; `pairs`: distinct (model, mode, site, kind). `±1`: predicted "
        "within one bit of the measured minimum; `±1 step`: within one step of the candidate grid (training "
        "mode's grid skips 5, 7, 9–11 and 13–15 bits, where ±1 bit can only be met exactly). "
        "A measured 'none passed' counts as one above the largest candidate; a prediction of none is then exact.",
        "", md_table(overall.drop(columns=[]), pct), "", md_table(per_mode, pct), "",
        "### Per held-out model", "", md_table(per_model, pct), "",
        f"![held-out predictions]({fig})", "",
        "## Thresholds", "",
        "Fitted on every model (these ship as `bitwidth.predict.CALIBRATION` and `MEDIAN_BITS`, from "
        "`predictor_calibration.json`):", "", md_table(thr, {"threshold (dB)": ".2f", "median (bits)": ".0f"}), "",
        "Fitted without each held-out model (the thresholds the validation used):", "",
        md_table(lomo_thr, {"threshold": ".2f"}), "",
    ]
    return write_result(study, "predictor", "A validated predictor of minimum bits?", sections,
                        time.perf_counter() - start)


def _answer(overall: pd.DataFrame, per_mode: pd.DataFrame, variants: pd.DataFrame) -> str:
    r = overall.iloc[0]
    if math.isnan(r["default ±1"]):
        return "No held-out rows."
    meets = r["default ±1"] >= TARGET and r["default ±1"] > r["median ±1"]
    modes = "; ".join(f"{m['mode']}: {m['default ±1']:.0%} within one bit ({m['default exact']:.0%} exact) "
                      f"against {m['median ±1']:.0%} ({m['median exact']:.0%}) for the median and "
                      f"{m['SQNR rule ±1']:.0%} for the SQNR rule"
                      for m in per_mode.to_dict("records"))
    pooled = variants[variants["scope"] == "all"].set_index("variant")
    mid = pooled.loc[VARIANTS["midpoint"]]
    nested = (f"{pooled.loc[VARIANTS['nested'], '±1']:.0%} within one bit (95% CI "
              f"{pooled.loc[VARIANTS['nested'], '±1 95% CI']})" if VARIANTS["nested"] in pooled.index
              else "undefined (fewer than three models)")
    verdict = "meets" if meets else "does not meet"
    return (f"Held out one model at a time, a line in each stream's dynamic range (fitted per mode and kind on "
            f"the other models) predicts {r['default ±1']:.0%} of {int(r['n'])} (site, kind, seed) rows within "
            f"one bit (95% CI {r['default ±1 95% CI']}) and {r['default exact']:.0%} exactly; predicting the median "
            f"of the other models {r['median ±1']:.0%} and {r['median exact']:.0%}; the calibrated SQNR rule "
            f"{r['SQNR rule ±1']:.0%} and {r['SQNR rule exact']:.0%}; the uncalibrated 30 dB rule "
            f"{r['30 dB ±1']:.0%} and {r['30 dB exact']:.0%}. Difference in within-one-bit, default − median: "
            f"{r['±1: default − median, 95% CI']} (95% CI). By mode: {modes}. The default was chosen among eight "
            f"variants on these data; chosen inside each fold instead (nested), the procedure reaches "
            f"{nested}; the previous default, the midpoint "
            f"of rule and median, {mid['±1']:.0%}. It {verdict} the target (≥ {TARGET:.0%} within one bit and "
            "better than the median baseline).")


if __name__ == "__main__":
    print(main())
