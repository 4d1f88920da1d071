"""``report.html``: one self-contained file (inline CSS, base64 PNGs, no scripts, no network).

Every string that comes from the model or the run (layer names, format names, values,
captions) is HTML-escaped, so a layer called ``<script>`` shows as text.

>>> import pandas as pd
>>> from bitwidth.report.document import Table
>>> "&lt;script&gt;" in table_html(Table(pd.DataFrame({"layer": ["<script>"]}), index=False))
True
"""

from __future__ import annotations

import base64
import html
import re

from .document import Block, Cards, Document, Figure, Section, Table, Text, format_cell, is_numeric_column

__all__ = ["CSS", "render_html", "table_html"]

_NUM = ' class="num"'
_CODE = re.compile(r"`([^`]+)`")
_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")
PARTS = {"answer": "The answer", "why": "Why", "how": "How"}

CSS = """
:root { --ink: #1f2430; --muted: #5b6273; --line: #dde1e8; --soft: #f5f7fa; --accent: #2f6db5; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--ink); background: #fff;
  font: 15px/1.55 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 28px 32px 64px; }
header { border-bottom: 3px solid var(--accent); padding-bottom: 12px; margin-bottom: 8px; }
h1 { font-size: 26px; margin: 0 0 4px; }
.subtitle { color: var(--muted); margin: 0; }
nav { font-size: 13.5px; color: var(--muted); margin: 10px 0 18px; }
nav a { color: var(--accent); text-decoration: none; margin-right: 14px; white-space: nowrap; }
.part { text-transform: uppercase; letter-spacing: .08em; font-size: 12px; font-weight: 700;
  color: var(--accent); margin: 40px 0 0; }
h2 { font-size: 20px; margin: 4px 0 10px; padding-top: 4px; }
p { margin: 8px 0; max-width: 860px; }
p.lead { font-size: 16.5px; }
p.note { color: var(--muted); font-size: 13.5px; border-left: 3px solid var(--line); padding-left: 10px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 14px 0; }
.card { flex: 1 1 200px; background: var(--soft); border: 1px solid var(--line); border-radius: 8px;
  padding: 10px 14px; }
.card .label { font-size: 12.5px; color: var(--muted); text-transform: uppercase; letter-spacing: .04em; }
.card .value { font-size: 24px; font-weight: 650; font-variant-numeric: tabular-nums; }
.card .detail { font-size: 13px; color: var(--muted); }
.table-wrap { overflow-x: auto; margin: 12px 0 18px; }
table { border-collapse: collapse; font-size: 13.5px; font-variant-numeric: tabular-nums; }
.caption { color: var(--muted); font-size: 13px; padding-bottom: 6px; max-width: 860px; }
th, td { padding: 4px 12px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
thead th { border-bottom: 2px solid #b9c0cc; font-weight: 650; background: #fff; white-space: nowrap; }
tbody tr:nth-child(even) { background: var(--soft); }
tbody th { font-weight: 600; font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
  font-size: 12.5px; }
td.num, th.num { text-align: right; }
figure { margin: 16px 0 26px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 6px; }
figcaption { color: var(--muted); font-size: 13.5px; max-width: 860px; margin-top: 6px; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 0.92em;
  background: var(--soft); padding: 1px 4px; border-radius: 3px; }
footer { margin-top: 48px; color: var(--muted); font-size: 12.5px; border-top: 1px solid var(--line);
  padding-top: 10px; }
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _inline(text: str) -> str:
    """Escaped paragraph text with `backticked` spans as code and [text](path) as links,
    as Markdown shows them."""
    return _LINK.sub(r'<a href="\2">\1</a>', _CODE.sub(r"<code>\1</code>", _e(text)))


def table_html(table: Table) -> str:
    """One table: header row, right-aligned number columns, formatted and escaped cells."""
    df = table.frame
    numeric = {c: is_numeric_column(df[c]) for c in df.columns}
    head = [f'<th scope="col">{_e(df.index.name or "")}</th>'] if table.index else []
    head += [f'<th scope="col"{_NUM if numeric[c] else ""}>{_e(c)}</th>' for c in df.columns]
    rows = []
    for label, row in zip(df.index, df.itertuples(index=False), strict=True):
        cells = [f'<th scope="row">{_e(format_cell(label))}</th>'] if table.index else []
        for col, value in zip(df.columns, row, strict=True):
            text = format_cell(value, table.formats.get(col, ""))
            cells.append(f'<td{_NUM if numeric[col] else ""}>{_e(text)}</td>')
        rows.append(f"<tr>{''.join(cells)}</tr>")
    # A caption above the table, not <caption>: that one wraps to the width of a narrow table.
    caption = f'<div class="caption">{_e(table.caption)}</div>' if table.caption else ""
    return (f'<div class="table-wrap">{caption}<table><thead><tr>{"".join(head)}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></div>")


def _figure(fig: Figure) -> str:
    data = base64.b64encode(fig.png).decode("ascii")
    alt = _e(fig.alt or fig.caption)
    return (f'<figure id="fig-{_e(fig.name)}"><img src="data:image/png;base64,{data}" alt="{alt}">'
            f"<figcaption>{_e(fig.caption)}</figcaption></figure>")


def _cards(cards: Cards) -> str:
    items = "".join(f'<div class="card"><div class="label">{_e(label)}</div><div class="value">{_e(value)}</div>'
                    f'<div class="detail">{_e(detail)}</div></div>' for label, value, detail in cards.items)
    return f'<div class="cards">{items}</div>'


def _block(block: Block) -> str:
    if isinstance(block, Text):
        cls = f' class="{_e(block.style)}"' if block.style != "p" else ""
        return f"<p{cls}>{_inline(block.text)}</p>"
    if isinstance(block, Table):
        return table_html(block)
    if isinstance(block, Figure):
        return _figure(block)
    return _cards(block)


def _section(section: Section) -> str:
    body = "\n".join(_block(b) for b in section.blocks)
    return f'<section id="{_e(section.anchor)}"><h2>{_e(section.title)}</h2>\n{body}\n</section>'


def render_html(doc: Document) -> str:
    """The document as one HTML page.

    >>> from bitwidth.report.document import Section
    >>> page = render_html(Document("t", "s", [Section("Min bits", "min-bits", "answer", [Text("a < b")])]))
    >>> "a &lt; b" in page, "http" in page
    (True, False)
    """
    parts, last = [], None
    for section in doc.sections:
        if section.part != last:
            parts.append(f'<div class="part">{_e(PARTS.get(section.part, section.part))}</div>')
            last = section.part
        parts.append(_section(section))
    nav = " ".join(f'<a href="#{_e(s.anchor)}">{_e(s.title)}</a>' for s in doc.sections)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(doc.title)}</title><style>{CSS}</style></head>\n<body><main>"
        f'<header><h1>{_e(doc.title)}</h1><p class="subtitle">{_e(doc.subtitle)}</p></header>'
        f"<nav>{nav}</nav>\n" + "\n".join(parts) +
        "<footer>Made by bitwidth from the files of this run directory; rebuild with "
        "<code>bitwidth report RUN_DIR</code>.</footer></main></body></html>\n"
    )
