"""Side-by-side report of a config's variants (e.g. nearest vs stochastic rounding).

Each variant is a complete run in ``<run dir>/<name>``; this reads their result files
and writes ``comparison.csv``, ``variants.yaml``, ``report.md`` and a self-contained
``report.html`` (inline figure, links to each variant's own report) in ``<run dir>``.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

__all__ = ["comparison_frame", "plot_comparison", "write_comparison"]


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


def plot_comparison(min_bits: pd.DataFrame) -> plt.Figure:
    """Grouped bars: each (layer, kind)'s minimum bits under each variant (empty = none passed).

    >>> df = pd.DataFrame({"layer": ["fc1"], "kind": ["weight"], "a": [4], "b": [8]})
    >>> plot_comparison(df).axes[0].get_ylabel()
    'minimum bits'
    """
    variants = [c for c in min_bits.columns if c not in ("layer", "kind")]
    labels = [f"{r.layer}\n{r.kind}" for r in min_bits.itertuples()]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(labels) * len(variants)), 3.6))
    width = 0.8 / max(1, len(variants))
    for i, v in enumerate(variants):
        xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(labels))]
        ax.bar(xs, min_bits[v].astype(float), width, label=v)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("minimum bits")
    ax.set_title("Minimum bits per layer and kind, by variant (lower is better)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def _png_data_uri(fig: plt.Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def write_comparison(run_dir: str | Path, names: list[str]) -> dict[str, Path]:
    """Write the comparison files into ``run_dir``; returns their paths by kind."""
    run_dir = Path(run_dir)
    min_bits, summary = comparison_frame(run_dir, names)
    (run_dir / "variants.yaml").write_text(yaml.safe_dump(list(names)))
    min_bits.to_csv(run_dir / "comparison.csv", index=False)
    md = ["# Variants compared", "", "## Minimum bits per layer and kind", "",
          min_bits.to_markdown(index=False) if _has_tabulate() else min_bits.to_string(index=False), "",
          "## Joint plan and best uniform width", "",
          summary.to_markdown(index=False) if _has_tabulate() else summary.to_string(index=False), "",
          "Each variant's full report: " + ", ".join(f"[{n}]({n}/report.md)" for n in names), ""]
    (run_dir / "report.md").write_text("\n".join(md))
    fig_uri = _png_data_uri(plot_comparison(min_bits))
    links = " · ".join(f'<a href="{html.escape(n)}/report.html">{html.escape(n)}</a>' for n in names)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>bitwidth: variants compared</title>
<style>body{{font:15px/1.5 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 10px}}
td{{text-align:right}}td:first-child,td:nth-child(2){{text-align:left}}th{{background:#f3f3f3}}
img{{max-width:100%}}</style></head><body>
<h1>Variants compared</h1>
<h2>Minimum bits per layer and kind</h2>{min_bits.to_html(index=False, na_rep="—", escape=True)}
<figure><img alt="minimum bits by variant" src="{fig_uri}"><figcaption>Lower bars: the variant lets
that tensor use fewer bits under the same criterion.</figcaption></figure>
<h2>Joint plan and best uniform width</h2>{summary.to_html(index=False, na_rep="—", escape=True)}
<p>Full reports: {links}</p></body></html>"""
    (run_dir / "report.html").write_text(page)
    return {"html": run_dir / "report.html", "md": run_dir / "report.md", "csv": run_dir / "comparison.csv"}


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True
