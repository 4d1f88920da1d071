"""The report of a run: tables, plots, and the HTML and Markdown writers.

``write_report(run_dir)`` rebuilds ``report.html`` (self-contained), ``report.md`` and
``plots/*.png`` from the files of a run directory, without running anything.
"""

from .build import write_report

__all__ = ["write_report"]
