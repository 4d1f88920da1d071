"""``report.md``: the same document as Markdown, with figures linked from ``plots/``.

Cell text is escaped for pipe tables (``|``) and for renderers that pass raw HTML
through (``<``, ``>``, ``&``), so names from the model render as written.

>>> escape_md("a|b <i>")
'a\\\\|b &lt;i&gt;'
"""

from __future__ import annotations

from .document import Block, Cards, Document, Figure, Table, Text, format_cell, is_numeric_column

__all__ = ["escape_md", "render_markdown", "table_markdown"]

PARTS = {"answer": "The answer", "why": "Why", "how": "How"}


def escape_md(text: object) -> str:
    """Text safe inside a Markdown paragraph or pipe-table cell."""
    s = str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return s.replace("|", "\\|").replace("\n", " ")


def table_markdown(table: Table) -> str:
    """A pipe table; number columns are right-aligned.

    >>> import pandas as pd
    >>> print(table_markdown(Table(pd.DataFrame({"layer": ["fc1"], "bits": [4]}), index=False)))
    | layer | bits |
    | :-- | --: |
    | fc1 | 4 |
    """
    df = table.frame
    header = ([df.index.name or ""] if table.index else []) + [str(c) for c in df.columns]
    align = ([":--"] if table.index else []) + ["--:" if is_numeric_column(df[c]) else ":--" for c in df.columns]
    lines = ["| " + " | ".join(escape_md(h) for h in header) + " |", "| " + " | ".join(align) + " |"]
    for label, row in zip(df.index, df.itertuples(index=False), strict=True):
        cells = [format_cell(label)] if table.index else []
        cells += [format_cell(v, table.formats.get(c, "")) for c, v in zip(df.columns, row, strict=True)]
        lines.append("| " + " | ".join(escape_md(c) for c in cells) + " |")
    if table.caption:
        lines.insert(0, f"*{escape_md(table.caption)}*\n")
    return "\n".join(lines)


def _block(block: Block, image_dir: str) -> str:
    if isinstance(block, Text):
        text = escape_md(block.text)
        return f"> {text}" if block.style == "note" else (f"**{text}**" if block.style == "lead" else text)
    if isinstance(block, Table):
        return table_markdown(block)
    if isinstance(block, Figure):
        return f"![{escape_md(block.alt or block.name)}]({image_dir}/{block.name}.png)\n\n*{escape_md(block.caption)}*"
    if not isinstance(block, Cards):
        raise ValueError(f"unknown report block {type(block).__name__}; allowed: Text, Table, Figure, Cards")
    return "\n".join(f"- **{escape_md(label)}: {escape_md(value)}** — {escape_md(detail)}"
                     for label, value, detail in block.items)


def render_markdown(doc: Document, image_dir: str = "plots") -> str:
    """The document as Markdown; figures point to ``image_dir/<name>.png``.

    >>> from bitwidth.report.document import Section
    >>> print(render_markdown(Document("Report", "run", [Section("Answer", "a", "answer", [Text("x")])])))
    # Report
    <BLANKLINE>
    run
    <BLANKLINE>
    ## The answer: Answer
    <BLANKLINE>
    x
    <BLANKLINE>
    """
    out = [f"# {escape_md(doc.title)}", escape_md(doc.subtitle)]
    for section in doc.sections:
        out.append(f"## {PARTS.get(section.part, section.part)}: {escape_md(section.title)}")
        out += [_block(b, image_dir) for b in section.blocks]
    return "\n\n".join(out) + "\n"
