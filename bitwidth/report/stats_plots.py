"""Distribution plots: each a function from a recorder's DataFrame to a matplotlib Figure.

No file I/O and no pyplot state: figures are plain :class:`matplotlib.figure.Figure`
objects, rendered by the Agg canvas when saved, so nothing here touches the caller's
backend. Inputs: :meth:`~bitwidth.stats.Recorder.hist_frame` (histograms),
:func:`~bitwidth.stats_analysis.analyze` or :func:`~bitwidth.stats_analysis.sweep`
(SQNR), :meth:`~bitwidth.stats.Recorder.to_frame` (drift).

>>> import pandas as pd
>>> hist = pd.DataFrame({"layer": ["fc"] * 2, "kind": ["weight"] * 2, "quantized": [False] * 2,
...                      "lo": [0.5, 1.0], "hi": [0.5625, 1.125], "n": [3, 1], "min": [-0.5, -0.5],
...                      "max": [1.0, 1.0], "zeros": [0, 0], "count": [4, 4]})
>>> [line.get_xdata()[0] for line in plot_log2_hist(hist, ["fixed8_4"]).axes[0].lines]
[-5.0, 2.988684686772166]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ..formats import Format
from ..stats_analysis import format_range, resolve_format
from ..wrap import KINDS

__all__ = ["plot_log2_hist", "plot_sqnr_heatmap", "plot_drift", "plot_block_effects", "report_figures"]

KIND_COLORS = {"weight": "#2f6db5", "activation": "#d1495b", "gradient": "#3a9d5d"}
FORMAT_COLORS = ("#e07a1f", "#7b4fb3", "#1f9e89", "#c2185b", "#5d4037")


def _message(text: str) -> Figure:
    fig = Figure(figsize=(6.0, 1.4), dpi=110)
    ax = fig.add_subplot()
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", color="#5b6273")
    return fig


def _select(frame: pd.DataFrame, quantized: bool, step: int | None) -> pd.DataFrame:
    """Rows of one stage (raw or quantized) and one step (default: the last recorded)."""
    if "quantized" in frame.columns:
        frame = frame[frame["quantized"].astype(bool) == quantized]
    if "step" in frame.columns and len(frame):
        frame = frame[frame["step"] == (frame["step"].max() if step is None else step)]
    return frame


def _kinds(frame: pd.DataFrame, kinds: Sequence[str] | None) -> list[str]:
    present = set(frame["kind"])
    return [k for k in (kinds or KINDS) if k in present]


def _spec_label(spec: str | Format | tuple[str, int]) -> str:
    if isinstance(spec, tuple):
        return f"{spec[0]} {spec[1]}"
    return resolve_format(spec, 1.0).name


def plot_log2_hist(hist: pd.DataFrame, formats: Sequence[str | Format | tuple[str, int]] = (), *,
                   layers: Sequence[str] | None = None, kinds: Sequence[str] | None = None,
                   step: int | None = None, quantized: bool = False,
                   panel: tuple[float, float] = (3.3, 1.8)) -> Figure:
    """Histograms of log2|x|, a row per layer and a column per kind, with format ranges drawn on.

    Bars are the fraction of the finite values per octave (exact zeros are noted in the
    corner, they have no logarithm). Per format, left of its dashed line the values it
    flushes to zero (below half its smallest step), right of its solid line those it
    saturates. Integer formats take their scale from each panel's recorded range;
    ``(family, n)`` pairs are made per panel as the search makes them
    (:func:`~bitwidth.stats_analysis.resolve_format`).

    >>> hist = pd.DataFrame({"layer": ["fc"], "kind": ["gradient"], "lo": [2.0**-12], "hi": [2.0**-12 * 1.125],
    ...                      "n": [5], "min": [-3e-4], "max": [3e-4], "zeros": [5], "count": [10]})
    >>> ax = plot_log2_hist(hist, [("fixed", 8)]).axes[0]
    >>> ax.get_title(), ax.texts[0].get_text()
    ('fc · gradient', 'zeros 50.0%')
    """
    specs = list(formats)
    for spec in specs:  # bad names fail here, before any drawing
        resolve_format(spec, 1.0)
    frame = _select(hist, quantized, step)
    if layers is not None:
        frame = frame[frame["layer"].isin(list(layers))]
    frame = frame[frame["n"] > 0] if len(frame) else frame
    if frame.empty:
        return _message("no histogram to plot (nothing recorded for this selection)")
    names, cols = list(dict.fromkeys(frame["layer"])), _kinds(frame, kinds)
    fig = Figure(figsize=(panel[0] * len(cols) + 0.8, panel[1] * len(names) + 0.9), dpi=110, layout="constrained")
    axes = fig.subplots(len(names), len(cols), squeeze=False, sharex="col")
    spans: dict[int, list[float]] = {j: [] for j in range(len(cols))}
    for (i, layer), (j, kind) in ((a, b) for a in enumerate(names) for b in enumerate(cols)):
        ax = axes[i][j]
        part = frame[(frame["layer"] == layer) & (frame["kind"] == kind)]
        if part.empty:
            ax.axis("off")
            continue
        lo, hi, n = (part[c].to_numpy(float) for c in ("lo", "hi", "n"))
        right = np.log2(hi)
        left = np.where(lo > 0, np.log2(np.where(lo > 0, lo, 1.0)), right - 0.125)  # bin 0 starts at 0
        count, zeros = float(part["count"].iloc[0]), float(part["zeros"].iloc[0])
        ax.bar(left, n / count / (right - left), width=right - left, align="edge", lw=0,
               color=KIND_COLORS.get(kind, "#555555"))
        spans[j] += [float(left.min()), float(right.max())]
        lo_x, hi_x = float(part["min"].iloc[0]), float(part["max"].iloc[0])
        for spec, color in zip(specs, FORMAT_COLORS * len(specs), strict=False):
            fmt = resolve_format(spec, max(abs(lo_x), abs(hi_x)))
            step_, _, largest = format_range(fmt, lo_x, hi_x)
            flush, clip = math.log2(step_ / 2), math.log2(largest)
            ax.axvline(flush, color=color, ls="--", lw=1.1)
            ax.axvline(clip, color=color, lw=1.3)
            ax.axvspan(flush - 400, flush, color=color, alpha=0.06, lw=0)
            ax.axvspan(clip, clip + 400, color=color, alpha=0.06, lw=0)
            spans[j] += [flush, clip]
        if zeros:
            ax.text(0.98, 0.92, f"zeros {zeros / count:.1%}", transform=ax.transAxes, ha="right", va="top",
                    fontsize=7, color="#5b6273")
        ax.set_title(f"{layer} · {kind}", fontsize=8.5)
        ax.tick_params(labelsize=7)
        if j == 0:
            ax.set_ylabel("fraction / octave", fontsize=7.5)
        if i == len(names) - 1:
            ax.set_xlabel("log2 |x|", fontsize=8)
    for j, xs in spans.items():
        if xs:  # the view is the data plus every format boundary, with an octave to spare
            axes[0][j].set_xlim(min(xs) - 1, max(xs) + 1)
    if specs:
        handles = [Line2D([], [], color=c, lw=1.3, label=_spec_label(s))
                   for s, c in zip(specs, FORMAT_COLORS * len(specs), strict=False)]
        handles.append(Line2D([], [], color="#888888", ls="--", lw=1.1, label="flushed to zero left of dashed"))
        handles.append(Line2D([], [], color="#888888", lw=1.3, label="saturated right of solid"))
        fig.legend(handles=handles, loc="outside lower center", ncols=min(4, len(handles)), fontsize=7.5,
                   frameon=False)
    return fig


def plot_sqnr_heatmap(errors: pd.DataFrame, *, step: int | None = None, quantized: bool = False,
                      kinds: Sequence[str] | None = None) -> Figure:
    """SQNR (dB) heatmap, layer x bit width (or format), one panel per kind.

    ``errors``: :func:`~bitwidth.stats_analysis.sweep` (columns are bit widths) or
    :func:`~bitwidth.stats_analysis.analyze` (columns are formats when several share a
    width). Lossless cells read "inf" and take the top colour; missing ones stay grey.

    >>> e = pd.DataFrame({"layer": ["fc", "fc"], "kind": ["weight"] * 2, "format": ["int4", "int8"],
    ...                   "family": ["int"] * 2, "bits": [4, 8], "sqnr_db": [20.0, float("inf")]})
    >>> plot_sqnr_heatmap(e).axes[0].images[0].get_array().tolist()
    [[20.0, 20.0]]
    """
    frame = _select(errors, quantized, step)
    if frame.empty:
        return _message("no quantization errors to plot")
    by_bits = not frame.duplicated(["layer", "kind", "bits"]).any()
    col = "bits" if by_bits else "format"
    order = (sorted(set(frame["bits"])) if by_bits else
             list(frame.sort_values(["family", "bits", "format"])["format"].drop_duplicates()))
    names, panels = list(dict.fromkeys(frame["layer"])), _kinds(frame, kinds)
    values = frame["sqnr_db"].to_numpy(float)
    finite = values[np.isfinite(values)]
    norm = Normalize(float(finite.min()) if finite.size else 0.0, float(finite.max()) if finite.size else 1.0)
    cmap = colormaps["viridis"].with_extremes(bad="#d9d9d9")
    width = min(16.0, 1.8 + len(panels) * (0.55 * len(order) + 1.4))
    fig = Figure(figsize=(width, 1.2 + 0.32 * len(names)), dpi=110, layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    image = None
    for ax, kind in zip(axes, panels, strict=True):
        grid = frame[frame["kind"] == kind].pivot_table(index="layer", columns=col, values="sqnr_db", aggfunc="first")
        grid = grid.reindex(index=names, columns=order).to_numpy(float)  # (layers, widths)
        shown = np.where(np.isposinf(grid), norm.vmax, grid)  # lossless: the top colour, labelled "inf"
        image = ax.imshow(np.ma.masked_invalid(shown), cmap=cmap, norm=norm, aspect="auto")
        for (r, c), v in np.ndenumerate(grid):
            if not math.isnan(v):
                dark = norm(min(v, norm.vmax)) < 0.55
                ax.text(c, r, "inf" if math.isinf(v) else f"{v:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if dark else "#1f2430")
        ax.set_xticks(range(len(order)), [str(o) for o in order], fontsize=7.5, rotation=0 if by_bits else 45)
        ax.set_yticks(range(len(names)), names, fontsize=7.5)
        ax.set_xlabel("bits" if by_bits else "format", fontsize=8)
        ax.set_title(kind, fontsize=10)
        ax.tick_params(length=0)
    if image is not None:
        fig.colorbar(image, ax=list(axes), shrink=0.9, pad=0.02).set_label("SQNR (dB)")
    return fig


def plot_drift(stats: pd.DataFrame, stat: str = "absmax", *, kinds: Sequence[str] | None = None,
               layers: Sequence[str] | None = None, quantized: bool = False, logy: bool | None = None) -> Figure:
    """One statistic of each layer over the recorded snapshots, one panel per kind.

    ``stats``: :meth:`~bitwidth.stats.Recorder.to_frame` of a recorder made with
    ``every=N``. Colour runs from the first layer (dark) to the last (light); the y axis
    is logarithmic when every value is positive (``logy`` overrides). NaN and infinite
    values leave gaps instead of bending the scale.

    >>> s = pd.DataFrame({"layer": ["fc"] * 3, "kind": ["gradient"] * 3, "quantized": [False] * 3,
    ...                   "step": [0, 1, 2], "absmax": [1.0, float("inf"), 0.25]})
    >>> plot_drift(s).axes[0].lines[0].get_ydata().tolist()
    [1.0, nan, 0.25]
    """
    if "step" not in stats.columns:
        raise ValueError("drift needs snapshots: record with every=N and call rec.step() each step or epoch")
    numeric = [c for c in stats.columns if c not in ("layer", "kind", "quantized", "step", "layer_type")
               and pd.api.types.is_numeric_dtype(stats[c])]
    if stat not in numeric:
        raise ValueError(f"stat must be one of {numeric}, got {stat!r}")
    frame = stats[stats["quantized"].astype(bool) == quantized] if "quantized" in stats.columns else stats
    if layers is not None:
        frame = frame[frame["layer"].isin(list(layers))]
    if frame.empty:
        return _message("no snapshots to plot")
    names, panels = list(dict.fromkeys(frame["layer"])), _kinds(frame, kinds)
    values = frame[stat].to_numpy(float)
    finite = values[np.isfinite(values)]
    log = bool(finite.size and (finite > 0).all()) if logy is None else logy
    cmap = colormaps["viridis"]
    fig = Figure(figsize=(3.6 * len(panels) + 1.2, 3.0), dpi=110, layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, kind in zip(axes, panels, strict=True):
        part = frame[frame["kind"] == kind]
        for i, layer in enumerate(names):
            run = part[part["layer"] == layer].sort_values("step")
            if run.empty:
                continue
            y = run[stat].to_numpy(float)
            ax.plot(run["step"].to_numpy(), np.where(np.isfinite(y), y, np.nan), marker=".", lw=1.3, ms=4,
                    color=cmap(0.85 * i / max(1, len(names) - 1)), label=layer)
        if log:
            ax.set_yscale("log")
        ax.set_title(kind, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel(stat, fontsize=8)
        ax.grid(alpha=0.25)
        ax.tick_params(labelsize=7)
    if len(names) <= 12:
        axes[-1].legend(fontsize=7, frameon=False, loc="best")
    return fig


def plot_block_effects(effects: pd.DataFrame, *, step: int | None = None, quantized: bool = False) -> Figure:
    """What block formats do inside their blocks, a row per (layer, kind).

    Left: the fraction of nonzero values flushed to zero (a bar per format). Right: the
    spread of the per-block scales, log2, from the 5th to the 95th percentile with the
    median marked. Input: :func:`~bitwidth.stats_analysis.block_effects`.

    >>> eff = pd.DataFrame({"layer": ["fc"], "kind": ["weight"], "format": ["mxfp4"], "n_blocks": [4],
    ...                     "flush_frac": [0.1], "scale_log2_lo": [-6.0], "scale_log2_mid": [-5.0],
    ...                     "scale_log2_hi": [-3.0], "spread_octaves": [3.0]})
    >>> [ax.get_xlabel() for ax in plot_block_effects(eff).axes]
    ['flushed to zero inside blocks', 'log2 block scale (5th–95th percentile, • median)']
    """
    frame = _select(effects, quantized, step).dropna(subset=["flush_frac"])
    if frame.empty:
        return _message("no block format effects to plot (nothing recorded for this selection)")
    rows = list(dict.fromkeys(zip(frame["layer"], frame["kind"], strict=True)))
    fmts = list(dict.fromkeys(frame["format"]))
    fig = Figure(figsize=(8.0, 0.32 * len(rows) * max(1, len(fmts)) ** 0.5 + 1.4), dpi=110, layout="constrained")
    left, right = fig.subplots(1, 2, sharey=True)
    height = 0.8 / len(fmts)
    for k, (fmt, color) in enumerate(zip(fmts, FORMAT_COLORS * len(fmts), strict=False)):
        part = frame[frame["format"] == fmt].set_index(["layer", "kind"])
        ys = [i + (k - (len(fmts) - 1) / 2) * height for i in range(len(rows))]
        got = [part.loc[r] if r in part.index else None for r in rows]
        left.barh(ys, [g["flush_frac"] if g is not None else 0.0 for g in got], height=height, color=color,
                  label=fmt)
        for y, g in zip(ys, got, strict=True):
            if g is not None and math.isfinite(g["scale_log2_lo"]):
                right.plot([g["scale_log2_lo"], g["scale_log2_hi"]], [y, y], color=color, lw=2)
                right.plot([g["scale_log2_mid"]], [y], "o", color=color, ms=3)
    left.set_yticks(range(len(rows)), [f"{layer} · {kind}" for layer, kind in rows], fontsize=7)
    left.invert_yaxis()
    left.xaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
    left.set_xlabel("flushed to zero inside blocks", fontsize=8)
    right.set_xlabel("log2 block scale (5th–95th percentile, • median)", fontsize=8)
    for ax in (left, right):
        ax.tick_params(labelsize=7)
    left.legend(fontsize=7, frameon=False, loc="lower right")
    return fig


def report_figures(stats: pd.DataFrame, hist: pd.DataFrame, errors: pd.DataFrame, *, family: str = "int",
                   candidates: Sequence[int] = (), blocks: pd.DataFrame | None = None) -> list[tuple[str, Figure, str]]:
    """The distribution figures of a run report as ``(name, figure, caption)``, from tables.

    ``stats``: ``Recorder.to_frame()``; ``hist``: ``Recorder.hist_frame()``; ``errors``:
    :func:`bitwidth.stats_analysis.sweep` of ``family`` over ``candidates`` (the report
    computes them; plots only draw); ``blocks``: :func:`bitwidth.stats_analysis.block_effects`
    of a block-format family's candidates, drawn when given. Raw data of the first snapshot, with the formats at
    the smallest and largest candidate, plus the drift of absmax over several snapshots.

    >>> import torch
    >>> from bitwidth.stats import record
    >>> from bitwidth.stats_analysis import sweep
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 2))
    >>> with record(model) as rec:
    ...     model(torch.randn(8, 4)).sum().backward()
    >>> figs = report_figures(rec.to_frame(), rec.hist_frame(), sweep(rec, "fixed", [4, 8]), family="fixed",
    ...                       candidates=[4, 8])
    >>> [name for name, fig, caption in figs]
    ['stats_log2_hist', 'stats_sqnr']
    """
    cands = sorted(set(candidates)) or list(range(2, 9))
    first = int(stats["step"].min()) if "step" in stats.columns and len(stats) else None
    ends = [(family, cands[0])] + ([(family, cands[-1])] if len(cands) > 1 else [])
    out = [("stats_log2_hist", plot_log2_hist(hist, ends, step=first),
            f"Where each layer's values lie, in octaves (log2|x|), per kind. The shaded bands are what "
            f"{family} {cands[0]} and {family} {cands[-1]} would do: values left of a dashed line are flushed "
            "to zero, right of a solid line saturated. Layers whose mass sits near a band need more bits.")]
    out.append(("stats_sqnr", plot_sqnr_heatmap(errors, step=first),
                f"Signal-to-quantization-noise ratio of {family} formats on each layer's recorded sample, "
                "in dB (about 6 dB per bit for a uniform grid). Rows that stay dark to the right need more bits."))
    if blocks is not None and len(blocks):
        out.append(("stats_blocks", plot_block_effects(blocks, step=first),
                    "What each block format does inside its blocks: the share of nonzero values flushed to zero "
                    "because a larger value in their block sets the scale, and how far the per-block scales "
                    "spread (octaves). Blocks are drawn from each layer's recorded sample."))
    if first is not None and stats["step"].nunique() > 1:
        out.append(("stats_drift", plot_drift(stats, "absmax"),
                    "Largest magnitude per layer over the recorded snapshots: a format chosen at the start "
                    "clips or underflows once its layer's range moves."))
    return out
