"""Claim behind adaptive precision: bit needs change as training proceeds, following the distributions' drift.

For the four image models, the fp32 baseline of each seed is checkpointed after epoch 1,
at mid-training (epoch 5) and at the end (epoch 10). The schedule has no decay and the
data order depends only on seed and epoch, so these are checkpoints of one run. At each
checkpoint every (site, kind)'s post-training minimum (integer bits, accuracy within 1
point of *that checkpoint's* fp32 accuracy) is searched and its distribution recorded.
The change of each pair's seed-median minimum from the first to the last checkpoint is
set against the change of each statistic (Spearman, bootstrap CI, Holm over statistics).

Gradients are not covered: a gradient's minimum is a property of training, not of a
checkpoint, and would need a training segment per checkpoint; the transformer is left out
for time.

    python experiments/drift.py [--quick]

Writes ``experiments/results/drift.md`` and ``drift.png``; the end checkpoint is the
post-training search of ``per_layer_minima.py``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from common import collect, md_table, ranked_bits, save_figure, sqnr_bits, study_from_args, write_result
from inference import holm, spearman_ci

MODELS = ("digits_mlp", "digits_cnn", "digits_resnet", "mnist1d_mlp")
CHECKPOINTS = (1, 5, None)  # epochs; None: the model's full schedule (10 epochs)
QUICK_CHECKPOINTS = (1, None)  # quick mode trains 2 epochs in all
STATISTICS = ("dynamic_range", "octaves_below_max", "absmax_std", "kurtosis", "absmax", "sqnr30_bits")


def checkpoints(study: object, epochs: Sequence[int | None]) -> pd.DataFrame:
    """Long table of every checkpoint's runs, with an ``epoch`` column and ranked ``bits``."""
    frames = []
    for e in epochs:
        df = collect(study, ["ptq"], epochs=e)  # type: ignore[arg-type]
        cands = study.candidates["ptq"]  # type: ignore[attr-defined]
        df["bits"] = ranked_bits(df, cands)
        df["sqnr30_bits"] = sqnr_bits(df, cands, 30.0)
        df["epoch"] = e if e is not None else (study.epochs or 10)  # type: ignore[attr-defined]
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def changes(long: pd.DataFrame) -> pd.DataFrame:
    """Per (model, site, kind): seed medians at each checkpoint, first-to-last change, seed range at the end."""
    med = long.groupby(["model", "layer", "kind", "epoch"], sort=False)[["bits", *STATISTICS]].median()
    first, last = long["epoch"].min(), long["epoch"].max()
    a, b = med.xs(first, level="epoch"), med.xs(last, level="epoch")
    out = pd.DataFrame({f"bits e{e}": med["bits"].xs(e, level="epoch") for e in sorted(long["epoch"].unique())})
    out["Δ bits"] = b["bits"] - a["bits"]
    for s in STATISTICS:
        out[f"Δ {s}"] = b[s] - a[s]
    out["seed range (end)"] = long[long["epoch"] == last].groupby(["model", "layer", "kind"], sort=False)[
        "bits"].agg(lambda v: v.max() - v.min())
    return out.reset_index()


def figure(long: pd.DataFrame) -> object:
    """Per model: each (site, kind)'s seed-median minimum against the checkpoint epoch."""
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(long["model"]))
    fig, axes = plt.subplots(1, len(models), figsize=(3.6 * len(models), 3.4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        g = long[long["model"] == model].groupby(["layer", "kind", "epoch"], sort=False)["bits"].median()
        for (layer, kind), s in g.groupby(level=["layer", "kind"], sort=False):
            ax.plot(s.index.get_level_values("epoch"), s.to_numpy() + np.random.default_rng(len(layer)).uniform(
                -0.08, 0.08), marker="o", ms=3, ls="-" if kind == "weight" else "--", lw=0.9, label=f"{layer} {kind}")
        ax.set_xlabel("epoch of the checkpoint")
        ax.set_title(model, fontsize=9)
        ax.set_ylabel("ptq minimum (int bits)")
        if len(g) <= 40:
            ax.legend(fontsize=5)
    fig.tight_layout()
    return fig


def main(argv: Sequence[str] | None = None) -> Path:
    """Search every checkpoint, relate the changes, write the result file and figure; returns its path."""
    start = time.perf_counter()
    study, _ = study_from_args(argv, __doc__, models=MODELS)
    long = checkpoints(study, QUICK_CHECKPOINTS if study.quick else CHECKPOINTS)
    ch = changes(long)
    rows = []
    for s in STATISTICS:
        rho, p, lo, hi, n = spearman_ci(ch[f"Δ {s}"], ch["Δ bits"])
        rows.append({"statistic": f"Δ {s}", "n": n, "rho": rho, "95% CI": "–" if not np.isfinite(lo)
                     else f"[{lo:+.2f}, {hi:+.2f}]", "p": p})
    corr = pd.DataFrame(rows)
    corr["p (Holm)"] = holm(corr["p"].tolist())
    acc = long.groupby(["model", "epoch", "seed"])["layer"].first().reset_index()[["model", "epoch", "seed"]]
    fig = save_figure(study, figure(long), "drift")
    fmt = {c: "+.3g" for c in ch.columns if c.startswith("Δ")}
    sections = [
        "## Answer", "", _answer(ch, corr), "",
        "## Does the change follow the distributions' drift?", "",
        "Spearman rho between the first-to-last change of each pair's minimum and the change of each statistic "
        "(both seed medians); Holm over the rows.", "",
        md_table(corr, {"rho": "+.2f", "p": ".2g", "p (Holm)": ".2g"}), "",
        f"![minimum against checkpoint]({fig})", "",
        "## Minimum per checkpoint", "",
        "Seed-median integer bits at each checkpoint epoch; `seed range (end)`: max − min over seeds at the last.",
        "", md_table(ch, fmt), "",
        f"Checkpoints searched: {len(acc)} (model, epoch, seed) runs.", "",
    ]
    return write_result(study, "drift", "Do bit needs drift during training?", sections, time.perf_counter() - start)


def _answer(ch: pd.DataFrame, corr: pd.DataFrame) -> str:
    moved = ch[ch["Δ bits"] != 0]
    beyond = ch[ch["Δ bits"].abs() > ch["seed range (end)"]]
    up, down = int((ch["Δ bits"] > 0).sum()), int((ch["Δ bits"] < 0).sum())
    defined = corr[corr["rho"].notna()]
    best = defined.loc[defined["rho"].abs().idxmax()] if len(defined) else None
    link = ("no statistic's change could be ranked" if best is None else
            f"the change that best matches is {best['statistic']} (ρ = {best['rho']:+.2f}, 95% CI {best['95% CI']}, "
            f"Holm p = {best['p (Holm)']:.2g})")
    return (f"From the first to the last checkpoint the seed-median minimum changes for {len(moved)} of {len(ch)} "
            f"(site, kind) pairs ({up} up, {down} down), by more than the seeds' range at the end for {len(beyond)}; "
            f"{link}.")


if __name__ == "__main__":
    print(main())
