"""Claim behind adaptive precision: bit needs change as training proceeds, following the distributions' drift.

For every model, each seed's fp32 run is checkpointed after its first epoch, at
mid-training and at the end (``stop_epoch`` of the same cosine schedule, so these are
points of one run). Weights and activations: at each checkpoint every (site, kind)'s
post-training minimum (integer bits, within 1 point of *that checkpoint's* fp32 accuracy;
tiny_lm: loss within 5%) is searched and its distribution recorded. Gradients, a property
of training rather than of a checkpoint: the minimum fixed-point width of each site's
output gradient *during* that epoch, i.e. the epoch leading to the checkpoint retrained
from the previous checkpoint with only that gradient quantized, judged against the same
epoch in fp32 by the model's training criterion; the gradient's distribution is recorded
at the start of the epoch. A control repeats the gradient epochs at the first epoch's
learning rate, since the schedule's smaller late rates alone could lower the gradients'
needs. The change of each pair's seed-median minimum from the first
to the last checkpoint is set against the change of each statistic (Spearman, bootstrap
CI, Holm over statistics), for all kinds together and per kind.

    python experiments/drift.py [--quick]

Writes ``experiments/results/drift.md`` and ``drift.png``; the end checkpoint's weights and
activations are the post-training search of ``per_layer_minima.py``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from common import (
    MODELS,
    TrialCache,
    _absmax,
    _record_model,
    ensure_run,
    fill_cache,
    md_table,
    parallel,
    ranked_bits,
    read_run,
    run_options,
    run_table,
    save_figure,
    search_minima,
    sqnr_bits,
    study_from_args,
    write_result,
)
from inference import holm, spearman_ci

from bitwidth.coverage import coverage
from bitwidth.families import make_format
from bitwidth.report.tables import distribution_table
from bitwidth.runner import select_pairs
from bitwidth.stats_analysis import sweep
from bitwidth.trial import Baseline, TrialOptions, epoch_lr, run_trial, train_baseline
from bitwidth.wrap import QuantSpec

STATISTICS = ("dynamic_range", "octaves_below_max", "absmax_std", "kurtosis", "absmax", "sqnr30_bits")


def checkpoint_epochs(epochs: int) -> list[int]:
    """After the first epoch, at mid-training and at the end (distinct, in order).

    >>> checkpoint_epochs(10), checkpoint_epochs(4), checkpoint_epochs(2)
    ([1, 5, 10], [1, 2, 4], [1, 2])
    """
    return sorted({1, max(1, epochs // 2), epochs})


def _stop(study: Any, model: str, epoch: int) -> int | None:
    """The run's ``stop`` of a checkpoint: None at the end (the trained model per_layer_minima searched)."""
    return None if epoch == run_options(study, model, "ptq", 0).epochs else epoch


def gradient_window(study: Any, model: str, seed: int, epoch: int, rate: str = "schedule") -> Path:
    """Search each site's gradient minimum during ``epoch`` (1-based); cached in ``<runs>/<model>/grad_at<epoch>``.

    ``rate``: ``schedule`` trains the epoch at its own rate of the cosine schedule; ``first``
    at the first epoch's rate at every checkpoint (``gradlr1_at<epoch>``), the control that
    keeps a smaller late learning rate from passing for a change of the gradients' needs.
    """
    d = study.runs / model / f"{'grad' if rate == 'schedule' else 'gradlr1'}_at{epoch}" / f"seed{seed}"
    if (d / "minima.csv").exists():
        return d
    d.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    spec, full = MODELS[model], run_options(study, model, "train", seed)
    task = spec.task()
    # The previous checkpoint, trained at the full schedule's rates; before epoch 1 the initial
    # weights, which any checkpoint's run holds (the shortest: one epoch).
    prev = train_baseline(task, run_options(study, model, "train", seed, max(epoch - 1, 1)), cache_dir=d)
    state = prev.init_state_dict if epoch == 1 else prev.state_dict
    lr = epoch_lr(full, epoch - 1 if rate == "schedule" else 0)
    opts = TrialOptions(mode="train", seed=seed, epochs=1, lr=lr, batch_size=full.batch_size,
                        optimizer=full.optimizer, momentum=full.momentum, weight_decay=full.weight_decay)
    start_point = Baseline(state, {}, [], state, [], {})
    ref = run_trial(task, {}, opts, start_point)  # the same epoch in fp32: what the quantized ones must match
    table = coverage(task.build_model(seed), {"*": QuantSpec()}, task.example_input()).table
    pairs = select_pairs(table, list(dict.fromkeys(table["site"])), ["gradient"])
    rec = _record_model(task, start_point, pairs, ["gradient"], opts.calib_batches)
    absmax, candidates, criterion = _absmax(rec), study.candidates["train"], spec.criterion("train")
    minima = search_minima(pairs, candidates, TrialCache(d / "trials.jsonl"),
                           lambda layer, kind, n: make_format("fixed", n, absmax=absmax.get((layer, kind), 0.0)),
                           lambda plan: run_trial(task, plan, opts, start_point),
                           lambda out: criterion.passes(out, ref.metrics, ref.loss_curve))
    distribution_table(rec.to_frame(), recorder=rec).to_csv(d / "stats.csv", index=False)
    sweep(rec, "fixed", candidates)[["layer", "kind", "bits", "sqnr_db"]].to_csv(d / "sqnr.csv", index=False)
    (d / "meta.json").write_text(json.dumps({"model": model, "seed": seed, "epoch": epoch, "reference": ref.metrics,
                                             "wall_time_s": time.perf_counter() - start}))
    minima.to_csv(d / "minima.csv", index=False)
    return d


def _frame(run: dict[str, Any], model: str, seed: int, epoch: int, candidates: Sequence[int]) -> pd.DataFrame:
    df = run_table(run)
    df["bits"] = ranked_bits(df, candidates)
    df["sqnr30_bits"] = sqnr_bits(df, candidates, 30.0)
    return df.assign(model=model, seed=seed, epoch=epoch)


def checkpoints(study: Any) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Long tables of every checkpoint's minima: weights and activations post-training with gradients per
    epoch at the schedule's rate; and the control, gradients per epoch all at the first epoch's rate."""
    points = [(m, e) for m in study.models for e in checkpoint_epochs(run_options(study, m, "ptq", 0).epochs)]
    fill_cache(study, [(m, "ptq", s, _stop(study, m, e)) for m, e in points for s in study.seeds])
    windows = sorted([(study, m, s, e, rate) for m, e in points for s in study.seeds for rate in ("schedule", "first")],
                     key=lambda j: -(j[1] == "tiny_lm"))  # the costliest first
    dirs = parallel(gradient_window, windows)
    control = []
    frames = []
    for (m, e), s in [(p, s) for p in points for s in study.seeds]:
        frames.append(_frame(ensure_run(study, m, "ptq", s, stop=_stop(study, m, e)), m, s, e,
                             study.candidates["ptq"]))
    for (_, m, s, e, rate), d in zip(windows, dirs, strict=True):
        rows = _frame(read_run(d, {}), m, s, e, study.candidates["train"])
        (frames if rate == "schedule" else control).append(rows)
    return _points(pd.concat(frames, ignore_index=True)), _points(pd.concat(control, ignore_index=True))


def _points(long: pd.DataFrame) -> pd.DataFrame:
    """Label each row's checkpoint ``first``, ``mid`` or ``end`` of its model's."""
    ends = long.groupby("model")["epoch"].agg(["min", "max"])
    long["point"] = [("first" if e == ends.loc[m, "min"] else "end" if e == ends.loc[m, "max"] else "mid")
                     for m, e in zip(long["model"], long["epoch"], strict=True)]
    return long


POINTS = ("first", "mid", "end")


def changes(long: pd.DataFrame) -> pd.DataFrame:
    """Per (model, site, kind): seed medians at each checkpoint, first-to-end change, seed range at the end."""
    med = long.groupby(["model", "layer", "kind", "point"], sort=False)[["bits", *STATISTICS]].median()
    a, b = med.xs("first", level="point"), med.xs("end", level="point")
    present = [p for p in POINTS if p in set(long["point"])]
    out = pd.DataFrame({f"bits {p}": med["bits"].xs(p, level="point") for p in present})
    out["Δ bits"] = b["bits"] - a["bits"]
    for s in STATISTICS:
        out[f"Δ {s}"] = b[s] - a[s]
    out["seed range (end)"] = long[long["point"] == "end"].groupby(["model", "layer", "kind"], sort=False)[
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
                -0.08, 0.08), marker="o", ms=3, ls={"weight": "-", "activation": "--"}.get(kind, ":"), lw=0.9,
                label=f"{layer} {kind}")
        ax.set_xlabel("epoch of the checkpoint")
        ax.set_title(model, fontsize=9)
        ax.set_ylabel("minimum bits (w, a: ptq int; g: fixed)")
        if len(g) <= 40:
            ax.legend(fontsize=5)
    fig.tight_layout()
    return fig


def correlations(ch: pd.DataFrame) -> pd.DataFrame:
    """Spearman rho of each statistic's change against the minimum's: all kinds, then each; Holm over every row."""
    rows = []
    for scope, g in [("all", ch), *((k, ch[ch["kind"] == k]) for k in dict.fromkeys(ch["kind"]))]:
        for s in STATISTICS:
            rho, p, lo, hi, n = spearman_ci(g[f"Δ {s}"], g["Δ bits"])
            rows.append({"kinds": scope, "statistic": f"Δ {s}", "n": n, "rho": rho,
                         "95% CI": "–" if not np.isfinite(lo) else f"[{lo:+.2f}, {hi:+.2f}]", "p": p})
    corr = pd.DataFrame(rows)
    corr["p (Holm)"] = holm(corr["p"].tolist())
    return corr


def main(argv: Sequence[str] | None = None) -> Path:
    """Search every checkpoint, relate the changes, write the result file and figure; returns its path."""
    start = time.perf_counter()
    study, _ = study_from_args(argv, __doc__)
    long, control = checkpoints(study)
    ch, ch_ctrl = changes(long), changes(control)
    corr = correlations(ch)
    corr_ctrl = correlations(ch_ctrl)
    corr_ctrl = corr_ctrl[corr_ctrl["kinds"] == "all"].drop(columns="kinds")
    runs = long.groupby(["model", "epoch", "seed", "kind"]).size()
    fig = save_figure(study, figure(long), "drift")
    fmt = {c: "+.3g" for c in ch.columns if c.startswith("Δ")}
    epochs = long.groupby("model")["epoch"].agg(lambda v: ", ".join(map(str, sorted(set(v)))))
    sections = [
        "## Answer", "", _answer(ch, corr), "",
        "Control for the gradients: a later epoch trains at the cosine schedule's smaller rate, which alone "
        "could lower its gradients' needs. Retraining every checkpoint's epoch at the *first* epoch's rate "
        "instead: " + _control_answer(ch_ctrl, corr_ctrl), "",
        "## Does the change follow the distributions' drift?", "",
        "Spearman rho between the first-to-end change of each pair's minimum and the change of each statistic "
        "(both seed medians), over all kinds and per kind; Holm over every row. `sqnr30_bits`: the width the "
        "30 dB SQNR rule gives on the recorded sample.", "",
        md_table(corr, {"rho": "+.2f", "p": ".2g", "p (Holm)": ".2g"}), "",
        f"![minimum against checkpoint]({fig})", "",
        "## Minimum per checkpoint", "",
        "Checkpoint epochs per model: " + "; ".join(f"{m} {e}" for m, e in epochs.items()) + ". Seed-median "
        "minimum at the first, middle and end checkpoint (weights and activations: integer bits post-training; "
        "gradients: fixed-point word bits during that epoch; one above the largest candidate: none passed); "
        "`seed range (end)`: max − min over seeds at the end.", "",
        md_table(ch, fmt), "",
        "### Control: gradients, every epoch at the first epoch's rate", "",
        md_table(corr_ctrl, {"rho": "+.2f", "p": ".2g", "p (Holm)": ".2g"}), "",
        md_table(ch_ctrl, {c: "+.3g" for c in ch_ctrl.columns if c.startswith("Δ")}), "",
        f"Searched: {len(runs)} (model, epoch, seed, kind) groups.", "",
    ]
    return write_result(study, "drift", "Do bit needs drift during training?", sections, time.perf_counter() - start)


def _control_answer(ch: pd.DataFrame, corr: pd.DataFrame) -> str:
    up, down = int((ch["Δ bits"] > 0).sum()), int((ch["Δ bits"] < 0).sum())
    defined = corr[corr["rho"].notna()]
    best = defined.loc[defined["rho"].abs().idxmax()] if len(defined) else None
    link = ("no statistic's change could be ranked" if best is None else
            f"the strongest link is {best['statistic']} (ρ = {best['rho']:+.2f}, 95% CI {best['95% CI']}, "
            f"Holm p over this table's rows = {best['p (Holm)']:.2g})")
    return (f"{up + down} of {len(ch)} gradient pairs change from the first to the end checkpoint ({up} up, "
            f"{down} down); {link}.")


def _answer(ch: pd.DataFrame, corr: pd.DataFrame) -> str:
    parts = []
    for kind, g in [("all", ch), *((k, ch[ch["kind"] == k]) for k in dict.fromkeys(ch["kind"]))]:
        beyond = int((g["Δ bits"].abs() > g["seed range (end)"]).sum())
        up, down = int((g["Δ bits"] > 0).sum()), int((g["Δ bits"] < 0).sum())
        parts.append(f"{kind if kind != 'all' else 'all kinds'}: {up + down} of {len(g)} pairs change ({up} up, "
                     f"{down} down; beyond the end's seed range {beyond})")
    defined = corr[corr["rho"].notna()]
    best = defined.loc[defined["rho"].abs().idxmax()] if len(defined) else None
    sig = corr[corr["p (Holm)"] < 0.05]
    link = ("no statistic's change could be ranked" if best is None else
            f"The strongest link is {best['statistic']} over {best['kinds']} (ρ = {best['rho']:+.2f}, 95% CI "
            f"{best['95% CI']}, Holm p = {best['p (Holm)']:.2g}); {len(sig)} of {len(corr)} rows "
            "significant after Holm")
    return ("From the first to the end checkpoint the seed-median minimum changes for " + "; ".join(parts)
            + f". {link}.")


if __name__ == "__main__":
    print(main())
