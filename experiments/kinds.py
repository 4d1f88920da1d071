"""Claim: gradients need more bits than weights (and activations) when training in fixed point.

Reads the training-mode searches of ``per_layer_minima.py``: each (site, kind) quantized
alone in fixed point (binary point from the tensor's measured range) while the model
trains, three seeds. Per model it compares the kinds site by site: the difference of the
seed-median minima of a site's gradient and its weight (and its activation), with a
two-sided sign test per model, Holm-corrected over all models and comparisons.

    python experiments/kinds.py [--quick]

Writes ``experiments/results/kinds.md`` and ``kinds.png``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from common import collect, md_table, ranked_bits, save_figure, study_from_args, write_result
from inference import holm, sign_test

KINDS = ("weight", "activation", "gradient")
COMPARISONS = (("gradient", "weight"), ("gradient", "activation"), ("activation", "weight"))


def per_kind(long: pd.DataFrame) -> pd.DataFrame:
    """Per (model, kind): the mean over sites of the minimum, as mean ± sd over seeds, and the sites' median."""
    rows = []
    for (model, kind), g in long.groupby(["model", "kind"], sort=False):
        per_seed = g.groupby("seed")["bits"].mean()
        rows.append({"model": model, "kind": kind, "sites": g["layer"].nunique(),
                     "mean over sites": per_seed.mean(), "sd over seeds": per_seed.std(ddof=1),
                     "median over sites": g.groupby("layer")["bits"].median().median()})
    return pd.DataFrame(rows)


def paired(long: pd.DataFrame) -> pd.DataFrame:
    """Per (model, comparison), then pooled over models: site-by-site differences of seed medians,
    sign test, Holm over the table."""
    med = long.groupby(["model", "layer", "kind"], sort=False)["bits"].median().unstack("kind")
    rows = []
    for model in [*dict.fromkeys(long["model"]), "all models"]:
        m = med if model == "all models" else med.loc[model]
        for a, b in COMPARISONS:
            d = (m[a] - m[b]).dropna()
            pos, neg, p = sign_test(d.tolist())
            rows.append({"model": model, "comparison": f"{a} − {b}", "sites": len(d),
                         "mean difference": d.mean(), "more": pos, "fewer": neg, "equal": len(d) - pos - neg,
                         "p (sign test)": p})
    table = pd.DataFrame(rows)
    table["p (Holm)"] = holm(table["p (sign test)"].tolist())
    return table


def figure(summary: pd.DataFrame) -> object:
    """Bars: mean minimum per kind and model, error bars the sd over seeds."""
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(summary["model"]))
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.26
    for i, kind in enumerate(KINDS):
        g = summary[summary["kind"] == kind].set_index("model").reindex(models)
        ax.bar(np.arange(len(models)) + (i - 1) * width, g["mean over sites"], width,
               yerr=g["sd over seeds"].fillna(0), capsize=3, label=kind)
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels(models, fontsize=8)
    ax.set_ylabel("fixed-point word bits (mean over sites)")
    ax.set_title("training-mode minimum per kind; error bars: sd over seeds", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def main(argv: Sequence[str] | None = None) -> Path:
    """Compare the kinds, write the result file and figure; returns the result file's path."""
    start = time.perf_counter()
    study, _ = study_from_args(argv, __doc__)
    long = collect(study, ["train"])
    long["bits"] = ranked_bits(long, study.candidates["train"])
    summary = per_kind(long)
    tests = paired(long)
    fig = save_figure(study, figure(summary), "kinds")
    sections = [
        "## Answer", "", _answer(tests), "",
        "## Minimum per kind", "",
        "Fixed-point word bits; 'no candidate passed' counts as one above the largest candidate "
        f"({max(study.candidates['train']) + 1}).", "",
        md_table(summary, {"mean over sites": ".2f", "sd over seeds": ".2f", "median over sites": "g"}), "",
        f"![minimum per kind]({fig})", "",
        "## Site by site", "",
        "Differences of seed-median minima at the same site; `more`/`fewer`: sites where the first kind needs "
        "more/fewer bits. Holm's correction runs over every row.", "",
        md_table(tests, {"mean difference": "+.2f", "p (sign test)": ".2g", "p (Holm)": ".2g"}), "",
    ]
    return write_result(study, "kinds", "Do gradients need more bits than weights?", sections,
                        time.perf_counter() - start)


def _answer(tests: pd.DataFrame) -> str:
    parts = []
    for r in tests[tests["comparison"] == "gradient − weight"].to_dict("records"):
        if r["sites"] == 0:
            continue
        sig = f"Holm p = {r['p (Holm)']:.2g}" + ("" if r["p (Holm)"] < 0.05 else ", not significant")
        parts.append(f"{r['model']}: more at {r['more']} of {r['sites']} sites, fewer at {r['fewer']} (mean "
                     f"{r['mean difference']:+.1f} bits; {sig})")
    return "Gradient minus weight minimum (seed medians, site by site): " + "; ".join(parts) + "."


if __name__ == "__main__":
    print(main())
