"""Claim: each layer needs its own bit width. Minimum bits per (site, kind), five models, two modes, three seeds.

For every model (digits MLP, CNN and ResNet, an MNIST-1D MLP, the byte-level transformer)
and mode (post-training integer quantization; training with fixed-point weights,
activations and gradients), each (site, kind) is quantized alone and its candidates
searched (:func:`common.gallop_min`), on each seed's own fp32 baseline. The per-seed minima show the seed spread; a
Kruskal-Wallis test per (model, mode, kind) asks whether the sites differ by more than
the seeds do (Holm-corrected over all those tests).

    python experiments/per_layer_minima.py [--quick]

Writes ``experiments/results/per_layer_minima.md`` and ``per_layer_minima.png``. The
searches are cached under ``experiments/runs/`` and shared with the other claim scripts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from common import MODELS, collect, md_table, ranked_bits, save_figure, seed_summary, study_from_args, write_result
from inference import holm

MODES = ("ptq", "train")


def _kruskal(g: pd.DataFrame, candidates: Sequence[int]) -> float:
    from scipy.stats import kruskal

    groups = [ranked_bits(s, candidates).to_numpy() for _, s in g.groupby("layer", sort=False)]
    if len(groups) < 2 or np.unique(np.concatenate(groups)).size < 2:
        return 1.0  # every site and seed needs the same width: no difference to find
    return float(kruskal(*groups).pvalue)


def site_tests(long: pd.DataFrame, candidates: dict[str, Sequence[int]]) -> pd.DataFrame:
    """One row per (model, mode, kind): sites, spread of the sites' median minima, median seed range, test."""
    rows = []
    for (model, mode, kind), g in long.groupby(["model", "mode", "kind"], sort=False):
        summ = seed_summary(g, ["layer"], candidates[mode])
        rows.append({"model": model, "mode": mode, "kind": kind, "sites": len(summ),
                     "distinct medians": summ["median"].nunique(),
                     "site medians": f"{summ['median'].min():g}–{summ['median'].max():g}",
                     "site spread": summ["median"].max() - summ["median"].min(),
                     "median seed range": float(summ["range"].median()),
                     "p (Kruskal-Wallis)": _kruskal(g, candidates[mode])})
    table = pd.DataFrame(rows)
    table["p (Holm)"] = holm(table["p (Kruskal-Wallis)"].tolist())
    return table


def figure(long: pd.DataFrame, candidates: dict[str, Sequence[int]]) -> object:
    """Rows: models; columns: modes; each site's minimum per seed (dots) and median (bar), per kind."""
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(long["model"]))
    fig, axes = plt.subplots(len(models), len(MODES), figsize=(13, 2.6 * len(models)), squeeze=False)
    colours = {"weight": "tab:blue", "activation": "tab:orange", "gradient": "tab:green"}
    for i, model in enumerate(models):
        for j, mode in enumerate(MODES):
            ax = axes[i][j]
            g = long[(long["model"] == model) & (long["mode"] == mode)]
            sites = list(dict.fromkeys(g["layer"]))
            kinds = [k for k in colours if k in set(g["kind"])]
            top = max(candidates[mode]) + 1
            for k_i, kind in enumerate(kinds):
                part = g[g["kind"] == kind]
                offset = (k_i - (len(kinds) - 1) / 2) * 0.25
                x = np.array([sites.index(s) for s in part["layer"]]) + offset
                y = ranked_bits(part, candidates[mode]).to_numpy()
                jitter = np.random.default_rng(0).uniform(-0.06, 0.06, len(x))
                ax.scatter(x + jitter, y, s=10, color=colours[kind], alpha=0.6, label=kind)
                med = part.assign(y=y).groupby("layer", sort=False)["y"].median()
                ax.scatter([sites.index(s) + offset for s in med.index], med.to_numpy(), marker="_", s=160,
                           color=colours[kind])
            ax.axhline(top, color="grey", lw=0.6, ls=":")
            ax.set_xticks(range(len(sites)))
            ax.set_xticklabels(sites, rotation=35 if len(sites) < 12 else 75, ha="right", fontsize=6)
            ax.set_ylabel("min bits")
            ax.set_title(f"{model} · {mode} ({'int' if mode == 'ptq' else 'fixed'}); dotted: none passed",
                         fontsize=8)
            if i == 0 and j == len(MODES) - 1:
                ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return fig


def main(argv: Sequence[str] | None = None) -> Path:
    """Run (or reuse) the searches, write the result file and figure; returns the result file's path."""
    start = time.perf_counter()
    study, _ = study_from_args(argv, __doc__)
    long = collect(study, MODES)
    tests = site_tests(long, study.candidates)
    sections = [
        "## Answer", "",
        _answer(tests, long), "",
        "## Do sites differ by more than seeds do?", "",
        "Per (model, mode, kind): the sites' median minima over seeds, their spread, the median over sites "
        "of the seed range, and a Kruskal-Wallis test of the per-seed minima grouped by site "
        "(p = 1 where every value is equal), Holm-corrected over every row.", "",
        md_table(tests, {"site spread": "g", "median seed range": "g", "p (Kruskal-Wallis)": ".3g",
                         "p (Holm)": ".3g"}), "",
        "## Minimum bits per site and seed", "",
        "`seeds` lists each seed's minimum in seed order (`–`: no candidate passed, counted as one above the "
        "largest candidate in `median` and `range`). Post-training: integer bits (per-tensor max scale), accuracy "
        "within 1 point of that seed's fp32 baseline (loss within 5% for tiny_lm). Training: fixed-point word "
        "bits (binary point from the tensor's measured range), training converges (accuracy within 3 points, "
        "5 for mnist1d_mlp; loss within 5% for tiny_lm).", "",
    ]
    for model in study.models:
        for mode in MODES:
            part = long[(long["model"] == model) & (long["mode"] == mode)]
            base = _baseline_text(study, model, mode)
            sections += [f"### {model} · {mode}", "", base, "",
                         md_table(seed_summary(part, ["layer", "kind"], study.candidates[mode]),
                                  {"median": "g", "range": "g"}), ""]
    fig = save_figure(study, figure(long, study.candidates), "per_layer_minima")
    sections += [f"![per-site minima]({fig})", "", _wall_text(long)]
    return write_result(study, "per_layer_minima", "Per-layer minima differ?", sections,
                        time.perf_counter() - start)


def _answer(tests: pd.DataFrame, long: pd.DataFrame) -> str:
    sig = tests[tests["p (Holm)"] < 0.05]
    varied = tests[tests["site spread"] > tests["median seed range"]]
    train = long[long["mode"] == "train"]
    fails = train.groupby("model", sort=False)["min_bits"].apply(lambda v: f"{int(v.isna().sum())}/{len(v)}")
    none = int(train["min_bits"].isna().sum())
    floor = (f" In training mode {none} of {len(train)} (site, kind, seed) searches fail even at the largest "
             f"candidate ({', '.join(f'{m} {v}' for m, v in fails.items())})"
             + (": a retrained run with one tensor at 16 bits can miss the criterion by chance, which limits how "
                "precisely training-mode minima are measured." if none else ".") if len(train) else "")
    return (f"In {len(varied)} of {len(tests)} (model, mode, kind) groups the sites' median minima spread wider "
            f"than the median seed range; {len(sig)} of {len(tests)} groups differ between sites at Holm-corrected "
            f"p < 0.05 (Kruskal-Wallis over the seeds' minima). Groups where they differ: "
            + (", ".join(f"{r.model} {r.mode} {r.kind}" for r in sig.itertuples()) or "none") + "." + floor)


def _baseline_text(study: object, model: str, mode: str) -> str:
    from common import ensure_run

    metas = [ensure_run(study, model, mode, s)["meta"] for s in study.seeds]  # type: ignore[arg-type]
    metric = "loss" if MODELS[model].kind == "transformer" else "accuracy"
    vals = [m["baseline"][metric] for m in metas]
    return (f"fp32 baseline {metric} per seed: {', '.join(f'{v:.3f}' for v in vals)} "
            f"(mean {np.mean(vals):.3f} ± {np.std(vals, ddof=1) if len(vals) > 1 else math.nan:.3f} sd); "
            f"{metas[0]['epochs']} epochs; {sum(m['trials'] for m in metas)} trials.")


def _wall_text(long: pd.DataFrame) -> str:
    wall, cpu = long.attrs["wall"], long.attrs["cpu"]
    per = pd.DataFrame({"wall": pd.Series(wall), "cpu": pd.Series(cpu)}).groupby(level=[0, 1], sort=False).sum()
    return ("Search time when first run, summed over seeds (CPU seconds of each run's process on one torch "
            "thread; wall seconds; runs go two at a time on the 2-core machine): "
            + ", ".join(f"{m} {mode} {r.cpu:.0f} s CPU / {r.wall:.0f} s wall" for (m, mode), r in per.iterrows())
            + f"; in all {per['cpu'].sum() / 60:.1f} CPU minutes.")


if __name__ == "__main__":
    print(main())
