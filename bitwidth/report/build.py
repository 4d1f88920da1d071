"""``write_report``: the report of a run directory, from the files on disk only.

It trains and evaluates nothing, so ``bitwidth report RUN_DIR`` rebuilds the report of
any finished (or interrupted) run. Sections come in the order a reader needs them:
the answer (minimum bits, the joint plan and what it saves), why (sensitivity,
distributions, and how well distribution statistics rank the bit needs), how (training
curves, cost against accuracy, run metadata).

>>> import tempfile
>>> sorted(write_report(tempfile.mkdtemp()))
['html', 'markdown']
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure as MplFigure

from .. import rundir as rd
from ..criteria import lower_is_better
from ..result import as_float, format_metric
from . import plots
from .document import Cards, Document, Figure, Section, Table, Text
from .html import render_html
from .markdown import render_markdown
from .run_files import RunFiles, load_run
from .tables import (
    SEARCHED,
    STATISTICS,
    answer_table,
    correlation_table,
    curves_table,
    distribution_table,
    joint_plan_table,
    meta_table,
    min_bits_table,
    pareto_table,
    sensitivity_table,
)

__all__ = ["build_document", "figure_png", "write_report"]

_MEASURE_NAMES = {"memory_bits": "memory", "bops": "BOPs", "train_bops": "training BOPs"}
_KEPT_FILES = (rd.TRIALS_CSV, rd.MIN_BITS, rd.COSTS, rd.JOINT_PLAN, rd.STATS_CSV)


def figure_png(fig: MplFigure) -> bytes:
    """A figure as PNG bytes, rendered by Agg; the same figure always gives the same bytes.

    >>> len(figure_png(MplFigure(figsize=(1, 1)))) > 0
    True
    """
    buf = io.BytesIO()
    FigureCanvasAgg(fig)
    # No software/version stamp: rebuilding a report gives byte-identical images.
    fig.savefig(buf, format="png", facecolor="white", metadata={"Software": None})
    return buf.getvalue()


class _Context:
    """What every section needs to word itself: names, the metric, the threshold, units."""

    def __init__(self, run: RunFiles) -> None:
        self.run = run
        cfg = run.search_config
        base = run.summary.get("baseline", {})
        self.metric = base.get("metric_name", "accuracy")
        self.base = as_float(base.get("metric"))
        self.family = cfg.get("family")
        self.bits_label = SEARCHED.get(self.family or "", "bits")
        self.candidates = [int(c) for c in cfg.get("candidates", [])]
        self.kinds = list(cfg.get("kinds", []))
        self.threshold = _threshold(cfg.get("criterion"), base.get("metric_name"), self.base)
        self.criterion = cfg.get("criterion") or {}
        # Accuracies are fractions, shown in percent everywhere (format_metric); changes in points.
        self.percent = format_metric(self.metric, 0.5).endswith("%")

    def value(self, v: float) -> str:
        """A metric value as people read it: accuracies in percent."""
        return format_metric(self.metric, v)

    def change(self, d: float) -> str:
        if not math.isfinite(d):
            return "n/a"
        return f"{d * 100:+.1f} pt" if self.percent else f"{d:+.4g}"

    def margin(self, m: Any) -> str:
        """A criterion's allowed drop or rise: points of an accuracy, or a fraction of fp32's value."""
        m = as_float(m)
        if self.criterion.get("relative"):
            return f"{m:.1%} of it"
        return f"{m * 100:g} pt" if self.percent else f"{m:g}"



def _threshold(criterion: dict[str, Any] | None, metric: str | None, base: float) -> float | None:
    if not criterion or metric is None or not math.isfinite(base):
        return None
    from ..criteria import criterion_from_dict

    try:
        return criterion_from_dict(criterion).threshold({metric: base})
    except ValueError:
        return None


# ----------------------------------------------------------------------------- the answer


def _answer(ctx: _Context) -> list[Section]:
    run, res = ctx.run, ctx.run.result
    summary = run.summary
    table = answer_table(summary, res.costs)
    joint, uni = table.loc["joint"], table.loc["uniform"]
    cost_measure = "train_bops" if "gradient" in ctx.kinds else "bops"
    cards = [(f"joint plan {ctx.metric}", ctx.value(joint[ctx.metric]),
              f"{ctx.change(joint['change'])} vs fp32 ({ctx.value(ctx.base)}); "
              f"{'passes' if joint['passed'] else 'FAILS'} the criterion")]
    for measure, label in (("memory_bits", "weight memory"), (cost_measure, _MEASURE_NAMES[cost_measure])):
        vs_fp32, vs_uni = as_float(joint.get(f"{measure}_vs_fp32")), as_float(joint.get(f"{measure}_vs_uniform"))
        if math.isfinite(vs_fp32):
            detail = f"{vs_uni:.1%} of the best uniform plan" if math.isfinite(vs_uni) else "no uniform width passed"
            cards.append((label, f"{vs_fp32:.1%} of fp32", detail))
    ubits = summary.get("uniform", {}).get("bits")
    cards.append(("best uniform width", f"{ubits} {ctx.bits_label}" if ubits is not None else "none passed",
                  f"{ctx.metric} {ctx.value(uni[ctx.metric])}" if ubits is not None
                  else f"no single width in {ctx.candidates} passes everywhere"))

    crit = ctx.criterion
    if ctx.threshold is None:
        rule = "the criterion"
    elif crit.get("name") == "loss" or lower_is_better(ctx.metric):
        rise = crit.get("max_rise", crit.get("max_drop"))
        rule = f"{ctx.metric} at most {ctx.value(ctx.threshold)} (fp32 {ctx.value(ctx.base)} plus {ctx.margin(rise)})"
    else:
        rule = (f"{ctx.metric} at least {ctx.value(ctx.threshold)} (fp32 {ctx.value(ctx.base)} minus "
                f"{ctx.margin(crit.get('max_drop'))})")
    if crit.get("name") == "converge":
        rule += (f", training not diverged and its final training loss at most "
                 f"{1 + float(crit.get('loss_tol', 0)):g}x fp32's")
    mb = min_bits_table(res.min_bits)
    top = max(ctx.candidates, default=0)
    blocks = [
        Cards(cards),
        Text(f"Each cell is the fewest {ctx.bits_label} a layer's {'/'.join(ctx.kinds) or 'tensors'} can use with "
             f"every other layer at full precision, keeping {rule}. Candidates: "
             f"{', '.join(map(str, ctx.candidates))}.", "lead"),
        Table(mb, caption=f"Minimum {ctx.bits_label} per layer and kind (— : no candidate up to {top} passed)"),
    ]
    cov = summary.get("coverage")
    if cov:
        left = pd.DataFrame(cov.get("left_out") or [], columns=["site", "kind", "reason"])
        blocks.append(Text(f"Coverage: the search {cov['text']}.", "note"))
        if not left.empty:
            blocks.append(Table(left, caption="Sites and kinds the search leaves out, and why", index=False))
    if res.min_bits["monotone"].eq(False).any():
        bad = res.min_bits[res.min_bits["monotone"].eq(False)]
        names = ", ".join(f"{r.layer} ({r.kind})" for r in bad.itertuples())
        blocks.append(Text(f"Not monotone: {names} passed at some width but failed at a larger one, so its "
                           "minimum depends on which widths were tried.", "note"))
    minimum = Section("Minimum bits per layer", "min-bits", "answer", blocks)

    steps = summary.get("joint", {}).get("steps", 0)
    measures = ("memory_bits", "bops", "train_bops") if "gradient" in ctx.kinds else ("memory_bits", "bops")
    keep = [c for c in table.columns if "_vs_" not in c or c.split("_vs_")[0] in measures]
    shown = table[keep].rename(columns=lambda c: " / ".join(_MEASURE_NAMES.get(p, p) for p in c.split("_vs_")))
    formats = {c: ".1%" for c in shown.columns if " / " in c}
    if ctx.percent:
        shown = shown.assign(change=shown["change"] * 100).rename(columns={"change": "change (pt)"})
        formats.update({ctx.metric: ".1%", "change (pt)": "+.1f"})
    else:
        formats.update({ctx.metric: ".4g", "change": "+.4g"})
    joint_blocks = [
        Text(f"Every pair at its own minimum together, then raised where the combination failed "
             f"({steps} raise{'s' if steps != 1 else ''}). Costs are ratios: memory counts weight bits, "
             "BOPs multiply weight and activation bits per multiply-accumulate (training BOPs add the two "
             "backward products); a kind at full precision counts 32 bits. `memory / fp32` is the joint plan's "
             "weight memory as a percentage of fp32's, `memory / uniform` of the best uniform plan's.", "p"),
        Table(shown, caption=f"{ctx.metric.capitalize()} and cost of fp32, the best uniform width and the joint plan",
              formats=formats),
        Table(joint_plan_table(res.joint_plan, ctx.kinds or ("weight", "activation")),
              caption="The joint plan (joint_plan.yaml loads back with bitwidth.plan_from_dict)"),
    ]
    return [minimum, Section("The joint plan", "joint-plan", "answer", joint_blocks)]


def _deployment(ctx: _Context) -> Section | None:
    """Simulation vs deployment, once `bitwidth export` has measured the run's plans."""
    from .deploy import deploy_section

    return deploy_section(ctx.run.path, ctx.metric)


# ----------------------------------------------------------------------------- why


def _sensitivity(ctx: _Context) -> Section:
    res = ctx.run.result
    sens = sensitivity_table(res.trials, list(dict.fromkeys(res.min_bits["layer"])))
    # In training the verdict also weighs the training loss, so a cell's metric alone cannot colour it.
    by_verdict = ctx.run.mode not in (None, "ptq")
    fig = plots.sensitivity_heatmap(sens, baseline=ctx.base, threshold=ctx.threshold, metric_name=ctx.metric,
                                    bits_label=ctx.bits_label, by_verdict=by_verdict)
    if not by_verdict:
        caption = (f"{ctx.metric.capitalize()} with one (layer, kind) quantized at each width. Look for the rows "
                   "that turn red first: those layers need the most bits. Red cells fail the criterion and yellow "
                   "ones sit at its threshold (the line on the colour bar); the outlined cell is each row's "
                   "minimum; blank cells were never evaluated (bisection skips widths).")
        return Section("Sensitivity: layer x bits", "sensitivity", "why",
                       [Figure("sensitivity", figure_png(fig), caption)])
    caption = (f"Training with one (layer, kind) quantized at each width: green cells pass the criterion, red "
               f"ones fail it. Each cell gives the final {ctx.metric}; a failing cell also names what failed "
               f"({ctx.metric}: below the threshold; train loss: the final training loss above the allowed "
               "multiple of fp32's; diverged; error), so a red cell with a good "
               f"{ctx.metric} failed on its loss. The outlined cell is each row's minimum; blank cells were never "
               "evaluated (bisection skips widths).")
    blocks: list[Any] = [Figure("sensitivity", figure_png(fig), caption)]
    if "reason" in sens.columns:
        failed = sens[~sens["passed"]]
        if not failed.empty:
            losses = {c: name for c, name in (("train_loss", "train loss"), ("loss", "val loss"))
                      if c in failed.columns and c != ctx.metric}
            shown = failed[["layer", "kind", "bits", "metric", *losses, "reason"]].rename(
                columns={"metric": ctx.metric, **losses})
            formats = {ctx.metric: ".1%" if ctx.percent else ".4g", **dict.fromkeys(losses.values(), ".4g")}
            blocks.append(Table(shown, caption="Why each failing cell failed (trials.csv, column reason)",
                                index=False, formats=formats))
    return Section("Sensitivity: layer x bits", "sensitivity", "why", blocks)


def _distributions(ctx: _Context) -> Section:
    run = ctx.run
    if run.recorder is None:
        return Section("Distributions", "distributions", "why", [Text(
            "No stats.pt in this run directory, so the log2|x| histograms are skipped. `bitwidth run` records "
            "them from the fp32 baseline when statistics are enabled; `bitwidth stats CONFIG` records them alone.",
            "note")])
    blocks: list[Any] = []
    for name, fig, caption in _stats_figures(run.recorder, ctx):
        blocks.append(Figure(name, figure_png(fig), caption))
    return Section("Distributions", "distributions", "why", blocks)


def _stats_figures(recorder: Any, ctx: _Context) -> list[tuple[str, MplFigure, str]]:
    """Histograms and SQNR from :mod:`bitwidth.report.stats_plots`; the tables are computed here."""
    from ..families import BLOCK_FAMILIES, make_format
    from ..stats_analysis import block_effects, sweep
    from . import stats_plots

    family, cands = ctx.family or "int", sorted(set(ctx.candidates)) or list(range(2, 9))
    opts = dict(ctx.run.search_config.get("family_options") or {})  # block families' formats depend on them
    blocks = (block_effects(recorder, [make_format(family, n, **opts) for n in cands])
              if family in BLOCK_FAMILIES else None)
    return stats_plots.report_figures(recorder.to_frame(), recorder.hist_frame(),
                                      sweep(recorder, family, cands, **opts), family=family, candidates=cands,
                                      blocks=blocks)


def _claim(ctx: _Context) -> Section:
    run = ctx.run
    anchor, title = "bits-vs-distribution", "Do bit needs follow the distributions?"
    if run.stats is None:
        return Section(title, anchor, "why", [Text(
            "No recorded statistics (stats.pt or stats.csv) in this run directory: the minimum bits cannot be set "
            "against the distributions.", "note")])
    min_bits = run.result.min_bits if run.result is not None else None
    dist = distribution_table(run.stats, min_bits, recorder=run.recorder, family=ctx.family,
                              candidates=ctx.candidates)
    fmt = {"absmax_std": ".2f", "kurtosis": ".2f", "octaves_below_max": ".2f", "dynamic_range": ".2f",
           "absmax": ".3g", "std": ".3g", "zero_frac": ".1%"}
    # absmax and std are in stats.csv; the ratio, not the scale, is what bits depend on.
    shown_dist = dist.drop(columns=[c for c in ("absmax", "std") if c in dist.columns] if min_bits is not None else [])
    if min_bits is None:
        return Section("Distribution statistics", anchor, "why", [
            Table(dist.set_index("layer"), caption="Statistics of each recorded (layer, kind)", formats=fmt)])
    corr = correlation_table(dist, ctx.candidates)
    blocks: list[Any] = [Text(_claim_text(dist, corr, ctx), "lead")]
    fig = plots.min_bits_scatter(dist, candidates=ctx.candidates, bits_label=f"minimum {ctx.bits_label}")
    blocks.append(Figure("min_bits_vs_stats", figure_png(fig),
                         "Each point is one (layer, kind): its minimum bits (measured by the search) against a "
                         "statistic of its fp32 distribution. If bit needs follow the distribution, points rise "
                         "from left to right (or fall, for a statistic that shrinks with need); the title gives "
                         "the Spearman rank correlation over all points. Hollow points needed more than the "
                         "largest candidate."))
    if corr["rho"].notna().any():
        shown = _correlation_display(corr)
        blocks.append(Table(shown, caption="Spearman rank correlation of minimum bits with each statistic, over all "
                            "pairs and per kind with at least 3 pairs (p-values not corrected for testing "
                            "several statistics)",
                            formats={c: "+.2f" if c.startswith("ρ") else ".3f" for c in shown.columns}))
    blocks.append(Table(shown_dist.set_index("layer"), caption=f"Minimum {ctx.bits_label} beside the distribution "
                        "statistics of each (layer, kind), recorded on the fp32 baseline", formats=fmt))
    return Section(title, anchor, "why", blocks)


def _scope_sizes(corr: pd.DataFrame) -> dict[str, int]:
    return {scope: int(part["n"].max()) for scope, part in corr.groupby("scope", sort=False)}


def _correlation_display(corr: pd.DataFrame) -> pd.DataFrame:
    """One row per statistic: what it measures, then rho and p per scope (n in the header)."""
    table = pd.DataFrame(index=pd.Index([s for s in STATISTICS if s in set(corr["statistic"])], name="statistic"))
    table["measures"] = [STATISTICS[s] for s in table.index]
    defined = set(corr.loc[corr["rho"].notna(), "scope"])  # a kind with under 3 pairs or one width has no ranks
    for scope, n in _scope_sizes(corr).items():
        if scope not in defined:
            continue
        part = corr[corr["scope"] == scope].set_index("statistic")
        table[f"ρ {scope} (n={n})"] = part["rho"].reindex(table.index)
        table[f"p {scope}"] = part["p_value"].reindex(table.index)
    return table


def _claim_text(dist: pd.DataFrame, corr: pd.DataFrame, ctx: _Context) -> str:
    pooled = corr[(corr["scope"] == "all") & corr["rho"].notna()]
    n = len(dist)
    if dist.empty:
        return "No (layer, kind) of the search was recorded, so nothing can be compared."
    if pooled.empty:
        values = ", ".join(map(str, sorted(set(dist["min_bits"].dropna().astype(int))))) or "none passed"
        return (f"Every one of the {n} (layer, kind) pairs needs the same minimum ({values} {ctx.bits_label}), "
                "so there is no "
                "ranking to correlate: this run cannot test whether bit needs follow distributions. Finer "
                "candidates or more layers would.")
    best = pooled.loc[pooled["rho"].abs().idxmax()]
    strength = "a monotone link unlikely to be chance" if best["p_value"] < 0.05 else (
        f"not distinguishable from chance with {int(best['n'])} points; read it as a hint, not evidence")
    tied = [r.statistic for r in pooled.itertuples()
            if r.statistic != best["statistic"] and abs(abs(r.rho) - abs(best["rho"])) < 1e-9]
    also = f", tied with {', '.join(tied)}" if tied else ""
    text = (f"Over {int(best['n'])} (layer, kind) pairs, the statistic whose ranking best matches the minimum bits "
            f"is {best['statistic']} (Spearman ρ = {best['rho']:+.2f}, p = {best['p_value']:.2f}{also}): {strength}.")
    if "predicted_bits" in dist.columns and dist["predicted_bits"].notna().any():
        both = dist[dist["predicted_bits"].notna() & dist["min_bits"].notna()]
        diff = (both["predicted_bits"] - both["min_bits"]).astype(int)
        from ..predict import validation_text

        validated = validation_text(ctx.family or "")
        text += (f" The calibrated predictor (bitwidth.predict: a line in each distribution's dynamic range, the "
                 f"octaves between its 1st and 99.99th percentile of |x|, fitted to measured minima and rounded to "
                 f"a candidate; "
                 f"{validated or 'not validated for this family: it uses the uncalibrated 30 dB rule'}), made from "
                 f"each distribution and the calibration, equals the measured minimum for "
                 f"{int((diff == 0).sum())} of {len(both)} pairs here and is within one bit for "
                 f"{int((diff.abs() <= 1).sum())} (more bits for "
                 f"{int((diff > 0).sum())}, fewer for {int((diff < 0).sum())}).")
    return text


# ----------------------------------------------------------------------------- how


def _curves(ctx: _Context) -> Section | None:
    run = ctx.run
    if run.mode != "train":
        return None
    curves = curves_table(run.result.trials, run.records, list(dict.fromkeys(run.result.min_bits["layer"])))
    baseline = run.baseline_curves[0]["loss_curve"] if run.baseline_curves else []
    blocks: list[Any] = []
    for value, name, what in (("loss", "training_loss", "training loss"),
                              ("val_accuracy", "val_accuracy", "validation accuracy")):
        fig = plots.training_curves(curves, baseline=baseline if value == "loss" else
                                    (run.baseline_curves[0]["val_curve"] if run.baseline_curves else []), value=value)
        blocks.append(Figure(name, figure_png(fig),
                             f"Per-epoch {what} for each bit width, one panel per searched (layer, kind) and one "
                             "for the uniform widths; dashed black is fp32. Look for the width at which a curve "
                             "stops following fp32: flat or rising curves did not converge, a red cross marks a "
                             "run stopped for divergence."))
    return Section("Training curves", "training-curves", "how", blocks)


def _pareto(ctx: _Context) -> Section:
    run = ctx.run
    points = pareto_table(run.result.trials, run.records, run.summary, run.result.costs, run.result.joint_plan)
    measures = ["memory_bits_vs_fp32", "train_bops_vs_fp32" if "gradient" in ctx.kinds else "bops_vs_fp32"]
    fig = plots.pareto_plot(points, measures=measures, threshold=ctx.threshold, metric_name=ctx.metric)
    caption = (f"{ctx.metric.capitalize()} against cost for every plan the search evaluated. The joint plan "
               "(red star) should sit left of the uniform widths (blue squares) at the same "
               f"{ctx.metric}: that gap is what per-layer widths save. Points below the dashed line fail the "
               "criterion.")
    blocks: list[Any] = [Figure("pareto", figure_png(fig), caption)]
    if "layer_costs" not in run.summary:
        blocks.append(Text("This run stored no per-layer sizes, so only fp32, the best uniform width and the joint "
                           "plan are placed.", "note"))
    return Section("Cost against accuracy", "pareto", "how", blocks)


def _metadata(ctx: _Context) -> Section:
    run = ctx.run
    table = meta_table(run.meta, run.summary, run.config)
    files = [f for f in (*_KEPT_FILES, rd.TRIALS, rd.CONFIG, rd.META, rd.LOG)
             if (run.path / f).exists()]
    blocks: list[Any] = [Table(table, caption="Run settings, versions and time", index=False)]
    if files:
        blocks.append(Text(f"Files beside this report: {', '.join(files)}; plots in plots/.", "note"))
    return Section("Run metadata", "metadata", "how", blocks)


# ----------------------------------------------------------------------------- assembly


def build_document(run: RunFiles) -> Document:
    """The report of a loaded run as a :class:`~.document.Document` (figures rendered to PNG).

    >>> import tempfile
    >>> [s.title for s in build_document(load_run(tempfile.mkdtemp())).sections]
    ['Nothing to report']
    """
    if (run.path / rd.SCHEDULE).exists():  # mode adaptive: one training run, its own report
        from .adaptive import adaptive_document

        return adaptive_document(run)
    ctx = _Context(run)
    cfg = run.search_config
    task = (cfg.get("task") or {}).get("name") or (run.config or {}).get("name") or run.path.name
    if run.result is None:
        sections = [_distributions(ctx), _claim(ctx), _metadata(ctx)] if run.stats is not None else [
            Section("Nothing to report", "empty", "answer", [Text(
                f"{run.path} holds no search result (summary.yaml and the other result files) and no recorded "
                "statistics (stats.pt or stats.csv). Run `bitwidth run CONFIG` first.", "note")])]
        return Document(f"bitwidth: {task}", "distributions of the fp32 baseline", sections)
    builders: list[Callable[[_Context], Any]] = [_answer, _deployment, _sensitivity, _distributions, _claim, _curves,
                                                 _pareto, _metadata]
    sections: list[Section] = []
    for build in builders:
        out = build(ctx)
        sections += out if isinstance(out, list) else ([out] if out is not None else [])
    subtitle = (f"{cfg.get('mode', '?')} · {ctx.family} formats · kinds {', '.join(ctx.kinds)} · "
                f"{len(cfg.get('layers', []))} layers · strategy {cfg.get('strategy', '?')}")
    return Document(f"bitwidth: {task}", subtitle, sections)


def write_report(run_dir: str | Path) -> dict[str, Path]:
    """Write ``plots/*.png``, ``report.md`` and ``report.html`` into ``run_dir``; return the paths.

    Reads only files already in ``run_dir``. Keys: ``html``, ``markdown``, one per plot
    (``plots/<name>``), and the result tables kept as they are (``trials.csv`` …).
    """
    path = Path(run_dir)
    doc = build_document(load_run(path))
    paths: dict[str, Path] = {}
    figures = [b for s in doc.sections for b in s.blocks if isinstance(b, Figure)]
    if figures:
        (path / rd.PLOTS).mkdir(exist_ok=True)
    for fig in figures:
        out = path / rd.PLOTS / f"{fig.name}.png"
        out.write_bytes(fig.png)
        paths[f"plots/{fig.name}"] = out
    paths["markdown"] = path / rd.REPORT_MD
    paths["markdown"].write_text(render_markdown(doc), encoding="utf-8")
    paths["html"] = path / rd.REPORT_HTML
    paths["html"].write_text(render_html(doc), encoding="utf-8")
    paths.update({name: path / name for name in _KEPT_FILES if (path / name).exists()})
    return paths
