"""The report as data: sections of text, tables, figures and headline figures.

:mod:`bitwidth.report.build` assembles a :class:`Document`; the HTML and Markdown
writers render the same one, so both files always say the same thing.

>>> format_cell(0.123456, ".3f"), format_cell(None, ".3f"), format_cell(True, "")
('0.123', '—', 'yes')
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

__all__ = ["Block", "Cards", "Document", "Figure", "Section", "Table", "Text", "format_cell", "is_numeric_column"]

MISSING = "—"


@dataclass(frozen=True)
class Text:
    """A paragraph; ``style`` is ``p`` (body), ``lead`` (the section's main point) or ``note`` (an aside)."""

    text: str
    style: str = "p"


@dataclass(frozen=True)
class Table:
    """A DataFrame with a caption; ``formats`` maps a column to a format spec (``".3f"``, ``".1%"``)."""

    frame: pd.DataFrame
    caption: str = ""
    formats: Mapping[str, str] = field(default_factory=dict)
    index: bool = True
    missing: str = MISSING


@dataclass(frozen=True)
class Figure:
    """A PNG image with its file stem (``plots/<name>.png``) and a caption saying what to look at."""

    name: str
    png: bytes
    caption: str
    alt: str = ""


@dataclass(frozen=True)
class Cards:
    """Headline numbers: ``(label, value, detail)`` triples shown side by side."""

    items: Sequence[tuple[str, str, str]]


Block = Text | Table | Figure | Cards


@dataclass
class Section:
    """A titled part of the report; ``part`` groups sections under answer / why / how."""

    title: str
    anchor: str
    part: str
    blocks: list[Block] = field(default_factory=list)


@dataclass
class Document:
    """The whole report."""

    title: str
    subtitle: str
    sections: list[Section] = field(default_factory=list)


def format_cell(value: Any, spec: str = "") -> str:
    """One table cell as text: missing values as a dash, booleans as yes/no, numbers by ``spec``."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()  # numpy scalars to Python, so bool and float checks below apply
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if spec and isinstance(value, (int, float)):
        if spec.endswith("d") and isinstance(value, float):
            value = round(value)  # integer columns turn float when a pivot or merge brings NaN
        return format(value, spec)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def is_numeric_column(series: pd.Series) -> bool:
    """Whether a column holds numbers (right-aligned in both writers); booleans do not count.

    >>> is_numeric_column(pd.Series([1, 2])), is_numeric_column(pd.Series(["a"])), is_numeric_column(pd.Series([True]))
    (True, False, False)
    """
    return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)
