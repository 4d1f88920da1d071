"""The report of an adaptive run (``mode: adaptive``), from its files only.

The answer first (did one training run pass, at what training cost, against fp32, uniform
widths and a training-mode search's static joint plan), then the schedule as a heatmap
(site × step, colour = bits, one panel per kind), the curves beside fp32's, and the
changes that moved the widths. Plots are functions from a DataFrame to a Figure.

>>> import pandas as pd
>>> sched = pd.DataFrame({"step": [0, 1], "steps": [1, 9], "site": ["fc", "fc"], "kind": ["weight"] * 2,
...                       "format": ["fp32", "fixed6_4"], "bits": [32, 6], "frac": [None, 4]})
>>> len(schedule_heatmap(sched).axes)  # one panel and its colour bar
2
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.colors import BoundaryNorm
from matplotlib.figure import Figure as MplFigure

from .. import rundir as rd
from ..result import read_csv
from ..wrap import KINDS
from .document import Cards, Document, Figure, Section, Table, Text
from .run_files import RunFiles

__all__ = ["adaptive_document", "comparison_table", "curves_figure", "schedule_heatmap"]

_KIND_COLORS = {"fp32": "#222222", "adaptive": "#d1495b"}


def schedule_heatmap(schedule: pd.DataFrame) -> MplFigure:
    """Site × training step, colour = bits in force, one panel per kind (full precision drawn as 32)."""
    kinds = [k for k in KINDS if k in set(schedule["kind"])]
    sites = list(dict.fromkeys(schedule["site"]))
    total = int((schedule["step"] + schedule["steps"]).max()) if len(schedule) else 1
    fig = MplFigure(figsize=(8.0, 1.0 + 0.28 * len(sites) * max(len(kinds), 1) + 0.4 * len(kinds)), dpi=110)
    if not kinds:
        fig.add_subplot().axis("off")
        return fig
    bits = sorted(set(schedule["bits"].astype(int)))
    edges = [bits[0] - 0.5] + [(a + b) / 2 for a, b in zip(bits, bits[1:], strict=False)] + [bits[-1] + 0.5]
    cmap = colormaps["viridis"].resampled(max(len(bits), 2))
    norm = BoundaryNorm(edges, cmap.N)
    axes = fig.subplots(len(kinds), 1, squeeze=False, sharex=True)[:, 0]
    image = None
    for ax, kind in zip(axes, kinds, strict=True):
        grid = np.full((len(sites), total), np.nan)
        for r in schedule[schedule["kind"] == kind].itertuples():
            grid[sites.index(r.site), int(r.step):int(r.step) + int(r.steps)] = int(r.bits)
        image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap=cmap, norm=norm,
                          extent=(0, total, len(sites) - 0.5, -0.5))
        ax.set_yticks(range(len(sites)), sites, fontsize=7)
        ax.set_ylabel(kind, fontsize=8)
    axes[-1].set_xlabel("training step")
    if image is not None:
        bar = fig.colorbar(image, ax=list(axes), ticks=bits, fraction=0.04, pad=0.02)
        bar.set_label("bits")
    return fig


def curves_figure(curves: Mapping[str, Mapping[str, list[float]]], metric_name: str = "accuracy") -> MplFigure:
    """Training loss and validation metric per epoch, one line per run (fp32, adaptive, uniform widths)."""
    fig = MplFigure(figsize=(8.0, 3.0), dpi=110)
    loss_ax, metric_ax = fig.subplots(1, 2)
    for label, c in curves.items():
        color = _KIND_COLORS.get(label)
        style = "-" if label in _KIND_COLORS else "--"
        for ax, key in ((loss_ax, "loss"), (metric_ax, "accuracy")):
            ys = [float(v) for v in c.get(key) or []]
            if ys:
                ax.plot(range(1, len(ys) + 1), ys, style, color=color, marker="o", ms=3, label=label)
    loss_ax.set(xlabel="epoch", ylabel="training loss (epoch mean)", yscale="log")
    metric_ax.set(xlabel="epoch", ylabel=f"validation {metric_name}")
    metric_ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def comparison_table(summary: Mapping[str, Any]) -> pd.DataFrame:
    """The comparison rows of ``adaptive.yaml`` as a table: one row per plan.

    >>> comparison_table({"metric_name": "accuracy", "comparison": [{"plan": "fp32", "passed": True,
    ...                   "accuracy": 0.98, "train_bops_vs_fp32": 1.0}]}).columns.tolist()[:3]
    ['plan', 'passes', 'accuracy']
    """
    metric = summary.get("metric_name", "accuracy")
    rows = pd.DataFrame(summary.get("comparison") or [])
    cols = {"plan": "plan", "passed": "passes", metric: metric, "train_bops_vs_fp32": "training BOPs vs fp32",
            **{f"avg_bits_{k}": f"mean {k} bits" for k in KINDS},
            "training_runs": "training runs", "training_steps": "training steps"}
    for c in cols:
        if c not in rows.columns:
            rows[c] = None
    return rows[list(cols)].rename(columns=cols)


def _answer(run: RunFiles, s: Mapping[str, Any]) -> Section:
    metric = s.get("metric_name", "accuracy")
    value, base = s.get("metrics", {}).get(metric), s.get("baseline_metrics", {}).get(metric)
    costs = s.get("costs", {})
    verdict = "passes" if s.get("passed") else ("diverged" if s.get("diverged") else "fails")
    crit = s.get("criterion", {})
    cards = Cards([
        ("criterion", verdict, f"{crit.get('name', '?')} (max drop {crit.get('max_drop', '?')}, "
                               f"loss tol {crit.get('loss_tol', '?')})"),
        (metric, _num(value, ".2%"), f"fp32 {_num(base, '.2%')}"),
        ("training BOPs", _num(costs.get("train_bops_vs_fp32"), ".2%"), "of fp32, every step counted"),
        ("mean bits", " / ".join(_num(costs.get(f"avg_bits_{k}"), ".1f") for k in KINDS), "weight / act. / grad."),
    ])
    blocks: list[Any] = [cards, Text(
        f"One training run of {s.get('steps', '?')} steps under the precision controller, after the fp32 "
        f"baseline; {s.get('changes', 0)} format changes (raises, lowerings, and binary points following the "
        "data's range).", "lead")]
    for event in s.get("events") or []:
        blocks.append(Text(f"What happened: {event}.", "p"))
    if s.get("diverged"):
        blocks.append(Text("The run diverged even after backing off: the metrics are those of the weights when it "
                           "stopped. Raise min_bits or the thresholds' strictness (lower raise_above).", "note"))
    blocks.append(Table(comparison_table(s), caption="One adaptive run against fp32, uniform widths and a static "
                        "joint plan", index=False,
                        formats={metric: ".2%", "training BOPs vs fp32": ".2%",
                                 **{f"mean {k} bits": ".1f" for k in KINDS}}))
    if s.get("static_plan"):
        note = s.get("static_note") or ""
        blocks.append(Text(f"Static joint plan and the search's uniform width from {s['static_plan']} (training "
                           f"runs: its trials plus its baseline). {note}".strip(), "note"))
    else:
        blocks.append(Text("No static joint plan to compare: run a training-mode search of the same model (e.g. "
                           "configs/digits_train.yaml) and name its run directory in adaptive.static_plan.", "note"))
    blocks.append(Text("Uniform rows train once with every width pinned (the binary point still follows the data). "
                       "The first step of every controlled run is measured at fp32 and counted at 32 bits.", "note"))
    return Section("One adaptive training run", "adaptive-answer", "answer", blocks)


def _num(v: Any, fmt: str) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "—"
    return format(f, fmt) if math.isfinite(f) else "—"


def _schedule(schedule: pd.DataFrame) -> Section:
    from .build import figure_png

    fig = schedule_heatmap(schedule)
    return Section("The schedule: bits per site over training", "schedule", "why", [Figure(
        "adaptive_schedule", figure_png(fig),
        "Each row a site, each column a training step, colour the bits in force (one panel per kind). Step 0 "
        "runs at fp32 and is measured; widths move where the data's distribution moved.",
        "heatmap of bits per site and training step")])


def _curves(s: Mapping[str, Any]) -> Section | None:
    from .build import figure_png

    curves = s.get("curves") or {}
    if not curves:
        return None
    fig = curves_figure(curves, s.get("metric_name", "accuracy"))
    return Section("Training curves beside fp32", "adaptive-curves", "how", [Figure(
        "adaptive_curves", figure_png(fig), "Training loss and validation metric per epoch: fp32, the adaptive "
        "run and any uniform widths trained for comparison.", "training curves")])


def _changes(changes: pd.DataFrame) -> Section:
    moves = changes[changes["reason"].isin(["raise", "lower", "backoff"])]
    counts = changes.groupby(["kind", "reason"]).size().unstack(fill_value=0) if len(changes) else pd.DataFrame()
    blocks: list[Any] = [
        Text("Why each width moved: the relative error of the format in force on the measured step (rel_error), "
             "the fractions saturated and flushed to zero, and the chosen format's error (new_error). 'range' "
             "changes move only the binary point.", "p"),
        Table(counts, caption="Changes per kind and reason"),
        Table(moves.head(40), caption=f"Raises, lowerings and back-offs ({len(moves)}; the first 40, all in "
              f"{rd.CHANGES})", index=False,
              formats={c: ".3f" for c in ("rel_error", "overflow", "underflow", "new_error")} | {"absmax": ".3g"}),
    ]
    return Section("Changes", "changes", "how", blocks)


def _metadata(run: RunFiles, s: Mapping[str, Any]) -> Section:
    meta = run.meta or {}
    settings = s.get("settings", {})
    cfg = s.get("config", {})
    items = [("run", (run.config or {}).get("name")), ("task", f"{cfg.get('task', {}).get('model')}@"
                                                               f"{cfg.get('task', {}).get('data')}"),
             ("mode", "adaptive"), ("seed", cfg.get("seed")),
             ("training", ", ".join(f"{k} {cfg.get('train', {}).get(k)}" for k in ("epochs", "lr", "batch_size",
                                                                                   "optimizer"))),
             ("measured every", f"{settings.get('every')} steps"), ("rounding", settings.get("rounding")),
             *((f"{k} policy", ", ".join(f"{n} {v}" for n, v in p.items()))
               for k, p in (settings.get("policies") or {}).items()),
             ("back-off", f"+{settings.get('backoff_bits')} bits, at most {settings.get('max_backoffs')} times"),
             ("adaptive run wall time", f"{s.get('wall_time_s')} s"),
             ("bitwidth", meta.get("bitwidth")), ("torch", meta.get("torch")), ("device", meta.get("device")),
             ("wall time", f"{meta['wall_time_s']} s" if "wall_time_s" in meta else None)]
    table = pd.DataFrame([(k, str(v)) for k, v in items if v is not None], columns=["item", "value"])
    return Section("Run metadata", "metadata", "how", [Table(table, caption="Run settings, versions and time",
                                                             index=False)])


def adaptive_document(run: RunFiles) -> Document:
    """The report of an adaptive run directory (``adaptive.yaml``, ``schedule.csv``, ``changes.csv``)."""
    from ..adaptive_run import load_summary

    s = load_summary(run.path) or {}
    schedule = read_csv(run.path / rd.SCHEDULE)
    changes = read_csv(run.path / rd.CHANGES) if (run.path / rd.CHANGES).exists() else pd.DataFrame(
        columns=["kind", "reason"])
    sections = [_answer(run, s), _schedule(schedule)]
    curves = _curves(s)
    sections += ([curves] if curves else []) + [_changes(changes), _metadata(run, s)]
    task = (s.get("config", {}).get("task") or {}).get("model") or run.path.name
    kinds = ", ".join(k for k in KINDS if k in set(schedule.get("kind", [])))
    return Document(f"bitwidth: {task}", f"adaptive · fixed point · kinds {kinds} · one training run", sections)
