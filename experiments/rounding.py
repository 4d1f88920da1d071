"""Claim (Gupta et al., ICML 2015): stochastic rounding trains with fewer fraction bits than round-to-nearest.

``digits_mlp`` trains with every weight (and bias) *stored* in 16-bit fixed point: after
every SGD step each parameter is rounded back to ``fixed16_<frac>``, so an update smaller
than half a step vanishes under round-to-nearest and survives in expectation under
stochastic rounding. The whole curve is measured: validation accuracy against fraction
bits for both roundings, five seeds each, plus each seed's minimum fraction bits (the
fewest from which every larger width on the grid converges: accuracy within 3 points of
the fp32 run of the same seed, final training loss within 1.5x). Settings of
``configs/rounding_study.yaml``: SGD, lr 0.005, momentum 0.9, 4 epochs, batch 32.

    python experiments/rounding.py [--quick]

Writes ``experiments/results/rounding.md`` and ``rounding.png``; trials are cached under
``experiments/runs/rounding/``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from common import TrialCache, md_table, save_figure, study_from_args, write_result
from inference import bootstrap_ci, sign_test

from bitwidth.criteria import make_criterion
from bitwidth.families import make_format
from bitwidth.tasks import make_task
from bitwidth.trial import TrialOptions, TrialOutcome, run_trial, train_baseline
from bitwidth.wrap import QuantSpec

FRACS = (2, 4, 6, 8, 10, 12, 14)
QUICK_FRACS = (4, 8, 12)
ROUNDINGS = ("nearest", "stochastic")
WORD = 16
OPTIONS = {"epochs": 4, "lr": 0.005, "master_weights": "quantized"}
CRITERION = {"max_drop": 0.03, "loss_tol": 0.5}


def curves(study: object, fracs: Sequence[int], epochs: int) -> tuple[pd.DataFrame, dict[int, dict]]:
    """One row per (rounding, frac, seed): accuracy, loss, pass; and each seed's fp32 baseline metrics."""
    task = make_task("digits_mlp")
    criterion = make_criterion("converge", **CRITERION)
    rows, baselines = [], {}
    for seed in study.seeds:  # type: ignore[attr-defined]
        d = study.runs / "rounding" / f"seed{seed}"  # type: ignore[attr-defined]
        d.mkdir(parents=True, exist_ok=True)
        options = TrialOptions(mode="train", seed=seed, **{**OPTIONS, "epochs": epochs})
        base = train_baseline(task, options, cache_dir=d)
        baselines[seed] = base.metrics
        cache = TrialCache(d / "trials.jsonl")
        for rounding in ROUNDINGS:
            for frac in fracs:
                fmt = make_format("fixed_frac", frac, word=WORD, rounding=rounding)
                key = f"{fmt.name}|{rounding}|e{epochs}"
                if key not in cache:
                    out = run_trial(task, {"*": QuantSpec(weight=fmt)}, options, base)
                    cache.put(key, {"metrics": out.metrics, "diverged": out.diverged, "loss_curve": out.loss_curve,
                                    "error": out.error})
                got = cache.get(key)
                outcome = TrialOutcome(got["metrics"], got["loss_curve"], [], got["diverged"], got["error"])
                rows.append({"rounding": rounding, "frac": frac, "seed": seed,
                             "accuracy": got["metrics"]["accuracy"], "train_loss": got["metrics"].get("train_loss"),
                             "passed": bool(criterion.passes(outcome, base.metrics, base.loss_curve))})
    return pd.DataFrame(rows), baselines


def minima(df: pd.DataFrame, fracs: Sequence[int]) -> pd.DataFrame:
    """Per (rounding, seed): the fewest fraction bits from which every larger one on the grid passes."""
    rows = []
    for (rounding, seed), g in df.groupby(["rounding", "seed"], sort=False):
        passed = dict(zip(g["frac"], g["passed"], strict=True))
        best = None
        for f in sorted(fracs, reverse=True):
            if not passed[f]:
                break
            best = f
        rows.append({"rounding": rounding, "seed": seed, "min_frac": best})
    return pd.DataFrame(rows).astype({"min_frac": "Int64"})


def figure(df: pd.DataFrame, baselines: dict[int, dict]) -> object:
    """Accuracy against fraction bits, mean and standard deviation over seeds, per rounding."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for rounding, colour in zip(ROUNDINGS, ("tab:red", "tab:blue"), strict=True):
        g = df[df["rounding"] == rounding].groupby("frac")["accuracy"]
        ax.errorbar(g.mean().index, g.mean(), yerr=g.std(ddof=1).fillna(0), marker="o", capsize=3, color=colour,
                    label=f"{rounding} rounding")
    fp32 = np.mean([b["accuracy"] for b in baselines.values()])
    ax.axhline(fp32, color="grey", ls="--", lw=0.8, label=f"fp32 ({fp32:.3f})")
    ax.set_xlabel(f"fraction bits (weights stored in fixed{WORD}_<frac>)")
    ax.set_ylabel("validation accuracy (mean ± sd over seeds)")
    ax.set_title(f"digits_mlp, weights stored in {WORD}-bit fixed point after every step", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def main(argv: Sequence[str] | None = None) -> Path:
    """Train every (rounding, frac, seed), write the result file and figure; returns the result file's path."""
    start = time.perf_counter()
    study, _ = study_from_args(argv, __doc__, models=("digits_mlp",), default_seeds=(0, 1, 2, 3, 4))
    fracs = QUICK_FRACS if study.quick else FRACS
    df, baselines = curves(study, fracs, study.epochs or OPTIONS["epochs"])
    mins = minima(df, fracs)
    summary = df.groupby(["frac", "rounding"])["accuracy"].agg(["mean", "std"]).unstack("rounding")
    summary.columns = [f"{r} {s}" for s, r in summary.columns]
    summary = summary.reset_index()
    passed = df.groupby(["frac", "rounding"])["passed"].sum().unstack("rounding")
    for r in ROUNDINGS:
        summary[f"{r} passed"] = [f"{int(passed.loc[f, r])}/{len(study.seeds)}" for f in summary["frac"]]
    wide = mins.pivot(index="seed", columns="rounding", values="min_frac").reset_index()
    fig = save_figure(study, figure(df, baselines), "rounding")
    sections = [
        "## Answer", "", _answer(mins, fracs), "",
        "## Accuracy against fraction bits", "",
        f"Mean and standard deviation over seeds {list(study.seeds)}; `passed`: seeds that converge.", "",
        md_table(summary, {c: ".3f" for c in summary.columns if c.endswith(("mean", "std"))}), "",
        f"![accuracy against fraction bits]({fig})", "",
        "## Minimum fraction bits per seed", "",
        "The fewest fraction bits from which every larger width on the grid converges (`<NA>`: none).", "",
        md_table(wide), "",
        "fp32 baselines (same seed, same schedule): "
        + ", ".join(f"seed {s}: {b['accuracy']:.3f}" for s, b in baselines.items()) + ".", "",
        f"Trial options: `{OPTIONS | {'epochs': study.epochs or OPTIONS['epochs']}}`; criterion: converge "
        f"`{CRITERION}`.", "",
    ]
    return write_result(study, "rounding", "Stochastic against nearest rounding in fixed-point training", sections,
                        time.perf_counter() - start)


def _answer(mins: pd.DataFrame, fracs: Sequence[int]) -> str:
    top = max(fracs) + 2  # "never converges" ranks above the grid
    wide = mins.pivot(index="seed", columns="rounding", values="min_frac").astype("Float64").fillna(top)
    near, stoch = wide["nearest"].astype(float), wide["stochastic"].astype(float)
    pos, neg, p = sign_test((near - stoch).tolist())
    lo, hi = bootstrap_ci((near - stoch).to_numpy())
    return (f"Median minimum fraction bits over {len(wide)} seeds: nearest {np.median(near):g}, stochastic "
            f"{np.median(stoch):g} (a width that never converged counts as {top}). Stochastic needs fewer fraction "
            f"bits on {pos} seeds, more on {neg} (sign test p = {p:.2g}); mean difference nearest − stochastic "
            f"{(near - stoch).mean():.1f} bits, 95% bootstrap CI [{lo:.1f}, {hi:.1f}].")


if __name__ == "__main__":
    print(main())
