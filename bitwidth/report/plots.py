"""Search plots: each a function from a DataFrame of :mod:`bitwidth.report.tables` to a Figure.

No file I/O and no pyplot state: figures are plain :class:`matplotlib.figure.Figure`
objects, rendered by the Agg canvas when the report saves them, so importing this module
never changes the caller's backend. Distribution plots (histograms, SQNR)
live in :mod:`bitwidth.report.stats_plots`.

>>> import pandas as pd
>>> sens = pd.DataFrame({"layer": ["fc1", "fc1"], "kind": ["weight", "weight"], "bits": [2, 4],
...                      "metric": [0.5, 0.9], "passed": [False, True]})
>>> len(sensitivity_heatmap(sens, baseline=0.91).axes)  # one panel and its colour bar
2
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize, TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import NullFormatter, PercentFormatter

from ..criteria import lower_is_better
from ..result import format_metric, reason_causes
from ..wrap import KINDS
from .tables import STATISTIC_LABELS, STATISTICS, spearman

__all__ = ["KIND_STYLE", "VERDICT_COLORS", "min_bits_scatter", "pareto_plot", "sensitivity_heatmap", "training_curves"]

VERDICT_COLORS = {True: "#1a9850", False: "#d73027"}
KIND_STYLE = {"weight": ("#2f6db5", "o"), "activation": ("#d1495b", "s"), "gradient": ("#3a9d5d", "^")}
_COST_LABELS = {"memory_bits_vs_fp32": "weight memory (% of fp32)",
                "bops_vs_fp32": "inference BOPs (% of fp32)",
                "train_bops_vs_fp32": "training BOPs (% of fp32)"}


def _empty(message: str, size: tuple[float, float] = (7.0, 1.6)) -> Figure:
    fig = Figure(figsize=size, dpi=110)
    ax = fig.add_subplot()
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", color="#5b6273")
    return fig


def _kinds(frame: pd.DataFrame) -> list[str]:
    present = set(frame["kind"])
    return [k for k in KINDS if k in present] + sorted(present - set(KINDS))


def sensitivity_heatmap(sens: pd.DataFrame, *, baseline: float | None = None, threshold: float | None = None,
                        metric_name: str = "accuracy", bits_label: str = "bits", by_verdict: bool = False) -> Figure:
    """Layer x bits heatmap of the metric, one panel per kind, from :func:`~.tables.sensitivity_table`.

    Each cell is the metric with only that (layer, kind) quantized; failed cells say so,
    the smallest passing width of each row is outlined, and cells the search never
    evaluated stay blank. Colours run from the worst trial (red) through ``threshold``
    (yellow) to ``baseline`` (green). With ``by_verdict`` (training, where the verdict
    also weighs the training loss) a cell is green when it passed and red when it failed,
    and a failed cell names what failed (the causes of its ``reason``).

    >>> s = pd.DataFrame({"layer": ["fc"], "kind": ["weight"], "bits": [2], "metric": [0.97], "passed": [False],
    ...                   "reason": ["train loss 1.9 > 1.5 (1.5x fp32)"]})
    >>> [t.get_text() for t in sensitivity_heatmap(s, by_verdict=True).axes[0].texts]
    ['97.0%\\ntrain loss']
    """
    if sens.empty:
        return _empty("no single-layer trials in this run")
    kinds = _kinds(sens)
    layers = list(dict.fromkeys(sens["layer"]))
    bits = sorted(set(int(b) for b in sens["bits"]))
    finite = sens["metric"].to_numpy(float)
    finite = finite[np.isfinite(finite)]
    lower = lower_is_better(metric_name)  # a loss: green at the baseline, red above the threshold
    has_base = baseline is not None and math.isfinite(baseline)
    if lower:
        low = baseline if has_base else float(finite.min(initial=0.0))
        low = min(low, float(finite.min(initial=low)))
        top = max(float(finite.max(initial=low)), low + 1e-6)
    else:
        top = baseline if has_base else float(finite.max(initial=1.0))
        top = max(top, float(finite.max(initial=top)))
        low = min(float(finite.min(initial=top)), top - 1e-6)
    if threshold is not None and low < threshold < top:
        # Red on the failing side of the criterion's threshold, green on the other, whatever the spread.
        norm: Normalize = TwoSlopeNorm(vcenter=threshold, vmin=low, vmax=top)
    else:
        norm = Normalize(vmin=low, vmax=top)
    cmap = colormaps["RdYlGn_r" if lower else "RdYlGn"]
    width = min(13.0, 1.6 + len(kinds) * (0.62 * len(bits) + 1.2))
    fig = Figure(figsize=(width, 1.3 + 0.36 * len(layers)), dpi=110, layout="constrained")
    axes = fig.subplots(1, len(kinds), sharey=True, squeeze=False)[0]
    for ax, kind in zip(axes, kinds, strict=True):
        part = sens[sens["kind"] == kind].set_index(["layer", "bits"])
        ax.set_xlim(-0.5, len(bits) - 0.5)
        ax.set_ylim(len(layers) - 0.5, -0.5)
        for i, layer in enumerate(layers):
            passing = [b for b in bits if (layer, b) in part.index and bool(part.loc[(layer, b), "passed"])]
            for j, b in enumerate(bits):
                if (layer, b) not in part.index:
                    continue
                cell = part.loc[(layer, b)]
                value, passed = float(cell["metric"]), bool(cell["passed"])
                label = format_metric(metric_name, value) if math.isfinite(value) else "error"
                if by_verdict:
                    color, dark = VERDICT_COLORS[passed], True
                    causes = [] if passed else reason_causes(cell.get("reason")) or ["fails"]
                    text = "\n".join([label, *(c for c in causes if c != label)])
                else:
                    color = cmap(norm(value)) if math.isfinite(value) else "#cccccc"
                    dark = math.isfinite(value) and not 0.2 < norm(value) < 0.8
                    text = label if passed else f"{label}\nfails"
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor=color, edgecolor="white", lw=1.5))
                ax.text(j, i, text, ha="center", va="center", fontsize=8 if text.count("\n") < 2 else 6.5,
                        color="white" if dark else "#1f2430", linespacing=1.1)
            if passing:
                j = bits.index(min(passing))
                ax.add_patch(Rectangle((j - 0.46, i - 0.46), 0.92, 0.92, fill=False, edgecolor="#1f2430", lw=2))
        ax.set_xticks(range(len(bits)), [str(b) for b in bits])
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        ax.set_xlabel(bits_label)
        ax.set_title(kind, fontsize=11)
        ax.tick_params(length=0)
        for spine in ax.spines.values():
            spine.set_visible(False)
    if by_verdict:
        fig.legend([Patch(color=VERDICT_COLORS[True]), Patch(color=VERDICT_COLORS[False])],
                   ["passes the criterion", "fails (what failed in the cell)"], loc="outside lower center",
                   ncols=2, frameon=False, fontsize=8.5)
        return fig
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=list(axes), shrink=0.9, pad=0.02)
    bar.set_label(metric_name)
    ticks = [norm.vmin, norm.vmax]
    if threshold is not None and math.isfinite(threshold) and norm.vmin <= threshold <= norm.vmax:
        bar.ax.axhline(threshold, color="#1f2430", lw=1.5)
        ticks.insert(1, threshold)
    bar.set_ticks(ticks, labels=[format_metric(metric_name, t) for t in ticks])
    return fig


def _jitter(kinds: Sequence[str], present: Sequence[str]) -> np.ndarray:
    # Minimum bits are few integers: shift kinds apart vertically so tied points stay visible.
    offsets = {k: (i - (len(present) - 1) / 2) * 0.12 for i, k in enumerate(present)}
    return np.array([offsets[k] for k in kinds])


def min_bits_scatter(dist: pd.DataFrame, statistics: Sequence[str] | None = None, *,
                     candidates: Sequence[int] = (), labels: Mapping[str, str] | None = None,
                     bits_label: str = "minimum bits") -> Figure:
    """Each (layer, kind)'s minimum bits against distribution statistics, one panel per statistic.

    ``dist``: :func:`~.tables.distribution_table`. Each panel's title gives the Spearman
    rank correlation over all points with its p-value and n. Pairs where no candidate
    passed are drawn hollow one step above the largest candidate.

    >>> d = pd.DataFrame({"layer": list("abcd"), "kind": ["weight"] * 4, "min_bits": [2, 3, 4, 6],
    ...                   "kurtosis": [0.1, 0.5, 2.0, 9.0]})
    >>> min_bits_scatter(d, ["kurtosis"]).axes[0].get_title().splitlines()[1]
    'Spearman ρ = +1.00 (p = 0.00, n = 4)'
    """
    stats = [s for s in (statistics or list(STATISTICS)) if s in dist.columns and dist[s].notna().any()]
    if "min_bits" not in dist.columns or dist.empty or not stats:
        return _empty("no minimum bits with distribution statistics to compare")
    names = {**STATISTIC_LABELS, **(labels or {})}
    top = max(candidates, default=int(dist["min_bits"].max(skipna=True) or 0)) + 1
    none_passed = dist["min_bits"].isna().to_numpy()
    y = dist["min_bits"].astype("Float64").fillna(top).astype(float).to_numpy()
    kinds = _kinds(dist)
    y_shown = y + _jitter(list(dist["kind"]), kinds)
    ncols = min(3, len(stats))
    nrows = math.ceil(len(stats) / ncols)
    fig = Figure(figsize=(4.1 * ncols, 3.3 * nrows + 0.4), dpi=110, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    annotate = len(dist) <= 16
    for ax, stat in zip(axes, stats, strict=False):
        x = dist[stat].astype(float).to_numpy()
        rho, p, n = spearman(x, y)
        corr = (f"Spearman ρ = {rho:+.2f} (p = {p:.2f}, n = {n})" if math.isfinite(rho)
                else f"Spearman ρ undefined (n = {n}: a constant side)")
        ax.set_title(f"{stat}\n{corr}", fontsize=9.5)
        for kind in kinds:
            m = (dist["kind"] == kind).to_numpy()
            color, marker = KIND_STYLE.get(kind, ("#555555", "o"))
            for hollow in (False, True):
                mm = m & (none_passed == hollow)
                if mm.any():
                    ax.scatter(x[mm], y_shown[mm], s=42, marker=marker, label=kind if not hollow else None,
                               facecolors="none" if hollow else color, edgecolors=color, linewidths=1.4, alpha=0.9)
        if annotate:
            for xi, yi, layer in zip(x, y_shown, dist["layer"], strict=True):
                if math.isfinite(xi):
                    ax.annotate(str(layer), (xi, yi), xytext=(4, 3), textcoords="offset points", fontsize=7,
                                color="#5b6273")
        ticks = sorted(set(int(v) for v in y))
        ax.set_yticks(ticks, [f">{top - 1}" if t == top and none_passed.any() else str(t) for t in ticks])
        ax.set_ylim(min(ticks) - 0.6, max(ticks) + 0.6)
        ax.set_xlabel(names.get(stat, stat), fontsize=9)
        if stat == "predicted_bits":
            # Where prediction equals measurement.
            ax.axline((top, top), slope=1, color="#9aa3b2", ls=":", lw=1)
        ax.set_ylabel(bits_label, fontsize=9)
        ax.grid(alpha=0.25)
    for ax in axes[len(stats):]:
        ax.axis("off")
    handles, legend_labels = axes[0].get_legend_handles_labels()
    if len(kinds) > 1 and handles:
        fig.legend(handles, legend_labels, loc="outside lower center", ncols=len(kinds), frameon=False)
    return fig


def training_curves(curves: pd.DataFrame, *, baseline: Sequence[float] = (), value: str = "loss") -> Figure:
    """Per-epoch ``value`` (``loss`` or ``val_accuracy``) per bit width, one panel per searched group.

    ``curves``: :func:`~.tables.curves_table`. Colour encodes the bit width (darker is
    fewer bits); a cross marks where a diverged run was stopped; the fp32 ``baseline``
    curve is dashed black.

    >>> c = pd.DataFrame({"group": ["uniform"] * 2, "bits": [4, 4], "seed": [0, 0], "epoch": [1, 2],
    ...                   "loss": [2.0, 1.0], "val_accuracy": [0.5, 0.8], "diverged": [False, False]})
    >>> training_curves(c).axes[0].get_title()
    'uniform'
    """
    if curves.empty:
        return _empty("no training curves stored (post-training runs have none)")
    groups = list(dict.fromkeys(curves["group"]))
    groups = ["uniform"] * ("uniform" in groups) + [g for g in groups if g != "uniform"]
    bits = sorted(set(int(b) for b in curves["bits"]))
    cmap = colormaps["viridis"]
    color = {b: cmap(0.1 + 0.8 * i / max(1, len(bits) - 1)) for i, b in enumerate(bits)}
    ncols = len(groups) if len(groups) <= 5 else 4
    nrows = math.ceil(len(groups) / ncols)
    fig = Figure(figsize=(2.7 * ncols + 1.0, 2.4 * nrows + 0.5), dpi=110, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True).ravel()
    for ax, group in zip(axes, groups, strict=False):
        part = curves[curves["group"] == group]
        for (b, _seed), run in part.groupby(["bits", "seed"], sort=True):
            run = run.sort_values("epoch")
            ax.plot(run["epoch"], run[value], color=color[int(b)], lw=1.6, label=f"{b} bits")
            if bool(run["diverged"].any()) and len(run):
                ax.plot(run["epoch"].iloc[-1], run[value].iloc[-1], "x", color="#d1495b", ms=9, mew=2)
        if len(baseline):
            ax.plot(range(1, len(baseline) + 1), baseline, "--", color="#1f2430", lw=1.2, label="fp32")
        ax.set_title(group, fontsize=10)
        ax.grid(alpha=0.25)
        if value == "loss" and (part[value] > 0).all():
            ax.set_yscale("log")
    for ax in axes[len(groups):]:
        ax.axis("off")
    fig.supxlabel("epoch", fontsize=10)
    fig.supylabel("training loss" if value == "loss" else value.replace("_", " "), fontsize=10)
    if format_metric(value, 0.5).endswith("%"):
        axes[0].yaxis.set_major_formatter(PercentFormatter(1.0))
    handles, labels = [], []
    for ax in axes[:len(groups)]:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    order = sorted(range(len(labels)), key=lambda i: (labels[i] == "fp32", int(labels[i].split()[0])
                                                       if labels[i] != "fp32" else 0))
    fig.legend([handles[i] for i in order], [labels[i] for i in order], loc="outside right center",
               frameon=False, fontsize=9)
    return fig


def _front(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats in both cost (lower) and ``y`` (higher), by cost."""
    order = np.lexsort((-y, x))
    best, keep = -np.inf, []
    for i in order:
        if y[i] > best:
            keep.append(i)
            best = y[i]
    return np.array(keep, dtype=int)


def pareto_plot(points: pd.DataFrame, *, measures: Sequence[str] = ("memory_bits_vs_fp32", "bops_vs_fp32"),
                threshold: float | None = None, metric_name: str = "accuracy") -> Figure:
    """Metric against relative cost for every evaluated plan, one panel per cost measure.

    ``points``: :func:`~.tables.pareto_table`. Grey dots are single-layer trials, pink
    diamonds the joint step's tries, blue squares the uniform widths (labelled), the red
    star the joint plan, the black diamond fp32; the step line is the Pareto front, the
    dashed line the criterion's threshold.

    >>> p = pd.DataFrame({"group": ["fp32", "joint"], "plan": ["fp32", "j"], "bits": [32, None],
    ...                   "metric": [0.9, 0.89], "passed": [True, True], "memory_bits_vs_fp32": [1.0, 0.2]})
    >>> pareto_plot(p, measures=["memory_bits_vs_fp32"]).axes[0].get_xlabel()
    'weight memory (% of fp32)'
    """
    measures = [m for m in measures if m in points.columns and points[m].notna().any()]
    if points.empty or not measures:
        return _empty("no plan costs stored in this run")
    lower = lower_is_better(metric_name)
    fig = Figure(figsize=(5.4 * len(measures), 4.2), dpi=110, layout="constrained")
    axes = fig.subplots(1, len(measures), squeeze=False, sharey=True)[0]
    styles = {  # group: (colour, marker, size, label, z-order)
        "isolated": ("#9aa3b2", "o", 18, "one (layer, kind) quantized", 1),
        "uniform": ("#2f6db5", "s", 60, "uniform width", 3),
        "joint step": ("#e8a0aa", "D", 22, "joint step tried", 2),
        "joint": ("#d1495b", "*", 220, "joint plan", 5),  # on top: it may be the same plan as a uniform one
        "fp32": ("#1f2430", "D", 46, "fp32", 4),
    }
    for ax, measure in zip(axes, measures, strict=True):
        ok = points[measure].notna() & np.isfinite(points["metric"].astype(float))
        pts = points[ok]
        x, y = pts[measure].to_numpy(float), pts["metric"].to_numpy(float)
        front = _front(x, -y if lower else y)
        ax.step(x[front], y[front], where="post", color="#5b6273", lw=1, alpha=0.7, label="Pareto front", zorder=2)
        for group, (color, marker, size, label, z) in styles.items():
            g = pts[pts["group"] == group]
            if g.empty:
                continue
            ax.scatter(g[measure], g["metric"], c=color, marker=marker, s=size, label=label, zorder=z,
                       edgecolors="white" if group != "isolated" else "none", linewidths=0.6)
            if group == "uniform":
                for row in g.itertuples():
                    if not pd.isna(row.bits):
                        ax.annotate(f"{row.bits}b", (getattr(row, measure), row.metric), xytext=(5, -10),
                                    textcoords="offset points", fontsize=8, color=color)
        if threshold is not None and math.isfinite(threshold):
            ax.axhline(threshold, ls="--", color="#d1495b", lw=1, alpha=0.8, label="criterion threshold")
        if (x > 0).all() and x.max() / max(x.min(), 1e-12) > 8:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.xaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_xlabel(_COST_LABELS.get(measure, measure))
        ax.grid(alpha=0.25)
    axes[0].set_ylabel(metric_name)
    if format_metric(metric_name, 0.5).endswith("%"):
        axes[0].yaxis.set_major_formatter(PercentFormatter(1.0))
    low = points["metric"].astype(float)
    low = low[np.isfinite(low)]
    if threshold is not None and math.isfinite(threshold) and len(low):
        # Failed plans can sit far off; keep the band near the threshold readable.
        if lower:
            span = max(threshold - low.min(), 0.01)
            top = max(min(low.max(), threshold + 10 * span), threshold)
            axes[0].set_ylim(low.min() - 0.35 * span, top + 0.1 * span)
        else:
            span = max(low.max() - threshold, 0.01)
            bottom = min(max(low.min(), threshold - 10 * span), threshold)
            axes[0].set_ylim(bottom - 0.1 * span, low.max() + 0.35 * span)
    handles, labels = axes[-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(7, len(labels)), fontsize=8, frameon=False)
    return fig
