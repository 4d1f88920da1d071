"""Side-by-side report of a config's variants (e.g. nearest vs stochastic rounding).

Each variant is a complete run in ``<run dir>/<name>``; this reads their result files
and writes ``comparison.csv``, ``variants.yaml``, ``report.md`` and a self-contained
``report.html`` (inline figure, links to each variant's own report) in ``<run dir>``.

A variant name is a plain directory name directly inside the run directory: no path
separator, not ``.`` or ``..``, not absolute. Any other name, from ``variants.yaml``
or from a caller, is a ``ValueError`` before anything is read or written, so a report
never writes outside its run directory.

>>> variant_dir("/runs/study", "stochastic").as_posix()
'/runs/study/stochastic'
>>> variant_dir("/runs/study", "../other")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
ValueError: variant '../other': a variant name must be a plain directory name directly inside /runs/study (...)
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any
from urllib.parse import quote

import pandas as pd
import yaml
from matplotlib.figure import Figure as MplFigure

from .. import rundir as rd
from ..result import format_metric, read_csv
from .build import figure_png, write_report
from .document import Document, Figure, Section, Table, Text
from .html import render_html
from .markdown import render_markdown

__all__ = [
    "VARIANTS_FILE",
    "comparison_document",
    "comparison_frame",
    "plot_comparison",
    "read_variants",
    "variant_dir",
    "write_comparison",
    "write_variant_reports",
]

VARIANTS_FILE = rd.VARIANTS


def variant_dir(run_dir: str | os.PathLike[str], name: Any, *, source: str = "variant") -> Path:
    """``run_dir / name`` for a valid variant ``name``; ``ValueError`` naming the entry otherwise.

    Valid: a non-empty string without ``/``, ``\\`` or a drive, other than ``.`` and ``..``,
    whose directory (when it exists) is not a link leading out of ``run_dir``.
    """
    run_dir = Path(run_dir)
    allowed = (f"a variant name must be a plain directory name directly inside {run_dir} "
               "(no '/' or '\\', not '.' or '..', not absolute, not empty)")
    plain = (isinstance(name, str) and name not in ("", ".", "..") and "\0" not in name
             and PurePosixPath(name).name == name and PureWindowsPath(name).name == name
             and not PureWindowsPath(name).anchor)
    if not plain:
        raise ValueError(f"{source} {name!r}: {allowed}")
    path = run_dir / name
    if path.resolve().parent != run_dir.resolve():
        raise ValueError(f"{source} {name!r}: {path} is a link that leads out of {run_dir}; {allowed}")
    return path


def _variant_dirs(run_dir: Path, names: list[str], source: str = "variant") -> list[Path]:
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise ValueError(f"variants must be a list of names, got {names!r}")
    return [variant_dir(run_dir, n, source=source) for n in names]


def read_variants(run_dir: str | os.PathLike[str]) -> list[str]:
    """The variant names in ``run_dir/variants.yaml``, each checked by :func:`variant_dir`."""
    run_dir = Path(run_dir)
    path = run_dir / VARIANTS_FILE
    names = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(names, list) or not names:
        raise ValueError(f"{path}: expected a non-empty list of variant names, got {names!r}")
    _variant_dirs(run_dir, names, source=f"{path} entry")
    return names


def write_variant_reports(run_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """``bitwidth report DIR`` for a run of variants: every name of ``DIR/variants.yaml`` is
    checked first, then each variant's report and the comparison are written."""
    run_dir = Path(run_dir)
    names = read_variants(run_dir)
    for d in _variant_dirs(run_dir, names):
        write_report(d)
    return write_comparison(run_dir, names)


def comparison_frame(run_dir: Path, names: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(min_bits, summary)``: minimum bits per (layer, kind) with one column per variant,
    and per variant the joint plan's metric and the best uniform width."""
    tables, rows = [], []
    for name, d in zip(names, _variant_dirs(Path(run_dir), names), strict=True):
        mb = read_csv(d / rd.MIN_BITS)[["layer", "kind", "min_bits"]].rename(columns={"min_bits": name})
        tables.append(mb.set_index(["layer", "kind"]))
        summary = yaml.safe_load((d / rd.SUMMARY).read_text()) or {}
        joint, uni, base = summary.get("joint", {}), summary.get("uniform", {}), summary.get("baseline", {})
        rows.append({"variant": name, "metric": base.get("metric_name", "accuracy"), "baseline": base.get("metric"),
                     "joint_metric": joint.get("metric"), "joint_passed": joint.get("passed"),
                     "uniform_bits": uni.get("bits"), "uniform_metric": uni.get("metric")})
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


def _metric_formats(summary: pd.DataFrame) -> dict[str, str]:
    """Percent for the metric columns when every variant measures an accuracy (as the run reports do)."""
    if summary.empty or not all(format_metric(str(m), 0.5).endswith("%") for m in summary["metric"]):
        return {}
    return dict.fromkeys(("baseline", "joint_metric", "uniform_metric"), ".1%")


def comparison_document(min_bits: pd.DataFrame, summary: pd.DataFrame, names: list[str]) -> Document:
    """The comparison (tables of :func:`comparison_frame`) as a report document, so it has
    the same writers and look as a run's report."""
    links = ", ".join(f"[{n}]({quote(n)}/report.html)" for n in names)
    section = Section("Minimum bits by variant", "variants", "answer", [
        Text("The same search run several ways; each variant's full report: " + links + "."),
        Table(min_bits, "Minimum bits per layer and kind (— : no candidate passed)", index=False),
        Figure("variants", figure_png(plot_comparison(min_bits)),
               "Lower bars: that variant lets the tensor use fewer bits under the same criterion.",
               "minimum bits by variant"),
        Table(summary, "Per variant: fp32 baseline, the joint plan, and the best uniform width", index=False,
              formats=_metric_formats(summary)),
    ])
    return Document("bitwidth: variants compared", " · ".join(names), [section])


def write_comparison(run_dir: str | Path, names: list[str]) -> dict[str, Path]:
    """Write ``comparison.csv``, ``variants.yaml``, ``report.md`` and ``report.html`` into ``run_dir``."""
    run_dir = Path(run_dir)
    _variant_dirs(run_dir, names)  # every name checked before anything is written
    min_bits, summary = comparison_frame(run_dir, names)
    doc = comparison_document(min_bits, summary, names)
    (run_dir / VARIANTS_FILE).write_text(yaml.safe_dump(list(names)))
    min_bits.to_csv(run_dir / rd.COMPARISON, index=False)
    paths = {"html": run_dir / rd.REPORT_HTML, "markdown": run_dir / rd.REPORT_MD, "csv": run_dir / rd.COMPARISON}
    paths["html"].write_text(render_html(doc), encoding="utf-8")
    # Markdown keeps figures as files beside it, like a run's report.
    (run_dir / rd.PLOTS).mkdir(exist_ok=True)
    for block in doc.sections[0].blocks:
        if isinstance(block, Figure):
            (run_dir / rd.PLOTS / f"{block.name}.png").write_bytes(block.png)
    paths["markdown"].write_text(render_markdown(doc), encoding="utf-8")
    return paths
