"""Side-by-side report of a config's variants (e.g. nearest vs stochastic rounding).

Each variant is a complete run in ``<run dir>/<name>``; this reads their result files
and writes ``comparison.csv``, ``variants.yaml``, ``report.md`` and a self-contained
``report.html`` (inline figure, links to each variant's own report) in ``<run dir>``.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml
from matplotlib.figure import Figure as MplFigure

from .build import figure_png
from .document import Document, Figure, Section, Table, Text
from .html import render_html
from .markdown import render_markdown

__all__ = ["comparison_document", "comparison_frame", "plot_comparison", "write_comparison"]


def comparison_frame(run_dir: Path, names: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(min_bits, summary)``: minimum bits per (layer, kind) with one column per variant,
    and per variant the joint plan's metric and the best uniform width."""
    tables, rows = [], []
    for name in names:
        d = run_dir / name
        mb = pd.read_csv(d / "min_bits.csv")[["layer", "kind", "min_bits"]].rename(columns={"min_bits": name})
        tables.append(mb.set_index(["layer", "kind"]))
        summary = yaml.safe_load((d / "summary.yaml").read_text()) or {}
        joint, uni, base = summary.get("joint", {}), summary.get("uniform", {}), summary.get("baseline", {})
        rows.append({"variant": name, "baseline": base.get("metric"), "joint_metric": joint.get("metric"),
                     "joint_passed": joint.get("passed"), "uniform_bits": uni.get("bits"),
                     "uniform_metric": uni.get("metric")})
    return pd.concat(tables, axis=1).reset_index(), pd.DataFrame(rows)


def plot_comparison(min_bits: pd.DataFrame) -> MplFigure:
    """Grouped bars: each (layer, kind)'s minimum bits under each variant (empty = none passed).

    >>> df = pd.DataFrame({"layer": ["fc1"], "kind": ["weight"], "a": [4], "b": [8]})
    >>> plot_comparison(df).axes[0].get_ylabel()
    'minimum bits'
    """
    variants = [c for c in min_bits.columns if c not in ("layer", "kind")]
    labels = [f"{r.layer}\n{r.kind}" for r in min_bits.itertuples()]
    fig = MplFigure(figsize=(max(5.0, 0.9 * len(labels) * len(variants)), 3.6))
    ax = fig.subplots()
    width = 0.8 / max(1, len(variants))
    for i, v in enumerate(variants):
        xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(labels))]
        ax.bar(xs, min_bits[v].astype(float), width, label=v)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("minimum bits")
    ax.set_title("Minimum bits by variant (lower is better)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def comparison_document(min_bits: pd.DataFrame, summary: pd.DataFrame, names: list[str]) -> Document:
    """The comparison (tables of :func:`comparison_frame`) as a report document, so it has
    the same writers and look as a run's report."""
    links = ", ".join(f"[{n}]({n}/report.html)" for n in names)
    section = Section("Minimum bits by variant", "variants", "answer", [
        Text("The same search run several ways; each variant's full report: " + links + "."),
        Table(min_bits, "Minimum bits per layer and kind (— : no candidate passed)", index=False),
        Figure("variants", figure_png(plot_comparison(min_bits)),
               "Lower bars: that variant lets the tensor use fewer bits under the same criterion.",
               "minimum bits by variant"),
        Table(summary, "Per variant: fp32 baseline, the joint plan, and the best uniform width", index=False),
    ])
    return Document("bitwidth: variants compared", " · ".join(names), [section])


def write_comparison(run_dir: str | Path, names: list[str]) -> dict[str, Path]:
    """Write ``comparison.csv``, ``variants.yaml``, ``report.md`` and ``report.html`` into ``run_dir``."""
    run_dir = Path(run_dir)
    min_bits, summary = comparison_frame(run_dir, names)
    doc = comparison_document(min_bits, summary, names)
    (run_dir / "variants.yaml").write_text(yaml.safe_dump(list(names)))
    min_bits.to_csv(run_dir / "comparison.csv", index=False)
    paths = {"html": run_dir / "report.html", "markdown": run_dir / "report.md", "csv": run_dir / "comparison.csv"}
    paths["html"].write_text(render_html(doc), encoding="utf-8")
    # Markdown keeps figures as files beside it, like a run's report.
    (run_dir / "plots").mkdir(exist_ok=True)
    for block in doc.sections[0].blocks:
        if isinstance(block, Figure):
            (run_dir / "plots" / f"{block.name}.png").write_bytes(block.png)
    paths["markdown"].write_text(render_markdown(doc), encoding="utf-8")
    return paths
