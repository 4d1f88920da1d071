"""Claim: a site's minimum bits follow its distribution. Spearman rho of statistics against measured minima.

Every statistic is computed on the fp32 model *before* any search (calibration batches
of the trained baseline, forward and, in training mode, backward), so it could serve as a
predictor. For each (model, mode, site, kind) the minimum and each statistic are the
medians over seeds. Spearman's rho is given per model and pooled over models, with a 95%
bootstrap interval over (site, kind) pairs and Holm-corrected p-values (one family for the
pooled rows, one for the per-model rows). A pair where no candidate passed ranks above
the largest candidate.

    python experiments/minima_vs_distributions.py [--quick]

Writes ``experiments/results/minima_vs_distributions.md`` and its figure; reuses the
searches of ``per_layer_minima.py`` (cached under ``experiments/runs/``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from common import collect, md_table, ranked_bits, save_figure, sqnr_bits, study_from_args, write_result
from inference import holm, spearman_ci

MODES = ("ptq", "train")
# The statistics of the report (bitwidth.report.tables.STATISTICS), and the uncalibrated 30 dB rule.
STATISTICS = {
    "absmax_std": "absmax / std",
    "kurtosis": "excess kurtosis",
    "octaves_below_max": "log2(absmax / median |x|)",
    "dynamic_range": "log2(p99.99 / p1 of |x|)",
    "sqnr30_bits": "fewest bits with SQNR >= 30 dB",
}


def pair_table(study: object, long: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, mode, site, kind): the seed medians of the minimum and of every statistic."""
    frames = []
    for mode in MODES:
        part = long[long["mode"] == mode].copy()
        cands = study.candidates[mode]  # type: ignore[attr-defined]
        part["bits"] = ranked_bits(part, cands)
        part["sqnr30_bits"] = sqnr_bits(part, cands, 30.0)
        frames.append(part)
    both = pd.concat(frames, ignore_index=True)
    cols = ["bits", *STATISTICS]
    return both.groupby(["model", "family", "mode", "layer", "kind"], sort=False)[cols].median().reset_index()


def correlations(pairs: pd.DataFrame, scopes: list[tuple[str, pd.Series]]) -> pd.DataFrame:
    """Spearman rho, p, bootstrap CI per (scope, statistic); Holm over the whole table."""
    rows = []
    for scope, mask in scopes:
        sub = pairs[mask]
        for stat in STATISTICS:
            rho, p, lo, hi, n = spearman_ci(sub[stat], sub["bits"])
            rows.append({"scope": scope, "statistic": stat, "n": n, "rho": rho, "95% CI": _ci(lo, hi), "p": p})
    table = pd.DataFrame(rows)
    table["p (Holm)"] = holm(table["p"].tolist())
    return table


def _ci(lo: float, hi: float) -> str:
    return "–" if not np.isfinite(lo) else f"[{lo:+.2f}, {hi:+.2f}]"


def figure(pairs: pd.DataFrame, pooled: pd.DataFrame) -> object:
    """Per mode: the pooled best statistic against the minimum, one colour per model."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(MODES), figsize=(11, 4), squeeze=False)
    models = list(dict.fromkeys(pairs["model"]))
    for ax, mode in zip(axes[0], MODES, strict=True):
        rows = pooled[(pooled["scope"] == f"pooled {mode}") & pooled["rho"].notna()]
        if rows.empty:
            continue
        best = rows.loc[rows["rho"].abs().idxmax()]
        for m in models:
            sub = pairs[(pairs["mode"] == mode) & (pairs["model"] == m)]
            jitter = np.random.default_rng(0).uniform(-0.15, 0.15, len(sub))
            ax.scatter(sub[best["statistic"]], sub["bits"] + jitter, s=14, label=m, alpha=0.75)
        ax.set_xlabel(STATISTICS[best["statistic"]])
        ax.set_ylabel("minimum bits (median over seeds)")
        ax.set_title(f"{mode}: ρ = {best['rho']:+.2f} {best['95% CI']}, n = {int(best['n'])}", fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def main(argv: Sequence[str] | None = None) -> Path:
    """Compute the correlations, write the result file and figure; returns the result file's path."""
    start = time.perf_counter()
    study, _ = study_from_args(argv, __doc__)
    long = collect(study, MODES)
    pairs = pair_table(study, long)
    pooled_scopes = [(f"pooled {mode}", pairs["mode"] == mode) for mode in MODES]
    pooled_scopes += [(f"pooled {mode} {kind}", (pairs["mode"] == mode) & (pairs["kind"] == kind))
                      for mode in MODES for kind in dict.fromkeys(pairs.loc[pairs["mode"] == mode, "kind"])]
    pooled_scopes.append(("pooled, both modes", pd.Series(True, index=pairs.index)))
    pooled = correlations(pairs, pooled_scopes)
    per_model = correlations(pairs, [(f"{m} {mode}", (pairs["model"] == m) & (pairs["mode"] == mode))
                                     for m in dict.fromkeys(pairs["model"]) for mode in MODES])
    fmt = {"rho": "+.2f", "p": ".2g", "p (Holm)": ".2g"}
    fig = save_figure(study, figure(pairs, pooled), "minima_vs_distributions")
    sections = [
        "## Answer", "", _answer(pooled, per_model), "",
        "## Pooled over models", "",
        "Holm's correction runs over every row of this table.", "",
        md_table(pooled, fmt), "",
        f"![best statistic against minima]({fig})", "",
        "## Per model", "",
        "Holm's correction runs over every row of this table. rho is undefined (–) where all minima are equal.", "",
        md_table(per_model, fmt), "",
        "## The pairs", "",
        "Medians over seeds; `bits` counts 'no candidate passed' as one above the largest candidate.", "",
        md_table(pairs.drop(columns=["family"]), {s: ".3g" for s in ["bits", *STATISTICS]}), "",
    ]
    return write_result(study, "minima_vs_distributions", "Do minima follow distributions?", sections,
                        time.perf_counter() - start)


def _answer(pooled: pd.DataFrame, per_model: pd.DataFrame) -> str:
    parts = []
    for mode in MODES:
        rows = pooled[(pooled["scope"] == f"pooled {mode}") & pooled["rho"].notna()]
        if rows.empty:
            continue
        best = rows.loc[rows["rho"].abs().idxmax()]
        sig = rows[rows["p (Holm)"] < 0.05]
        parts.append(f"{mode}, pooled over {int(best['n'])} (site, kind) pairs: the strongest statistic is "
                     f"{best['statistic']} (ρ = {best['rho']:+.2f}, 95% CI {best['95% CI']}, Holm p = "
                     f"{best['p (Holm)']:.2g}); {len(sig)} of {len(rows)} statistics are significant after Holm")
    ok = per_model[(per_model["p (Holm)"] < 0.05)]
    parts.append(f"per model, {len(ok)} of {int(per_model['rho'].notna().sum())} defined correlations survive "
                 "Holm's correction" + (f" ({', '.join(sorted(set(ok['scope'])))})" if len(ok) else ""))
    return "; ".join(parts) + "."


if __name__ == "__main__":
    print(main())
