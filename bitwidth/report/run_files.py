"""What a run directory holds, read from disk: nothing is trained or evaluated.

:func:`load_run` collects the search result (``SearchResult`` files), the trial store
(``trials.jsonl``, read-only), ``config.yaml``, ``meta.yaml``, recorded statistics
(``stats.pt``, else ``stats.csv``) and, in training mode, the fp32 baseline's curves.
Each part is None (or empty) when its file is absent, so a report can say what is missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from .. import rundir as rd
from ..result import RESULT_FILES, SearchResult, baseline_curves, read_csv
from ..store import TrialStore

__all__ = ["RunFiles", "load_run"]


@dataclass
class RunFiles:
    """Everything of a run directory the report uses; each part is None when its file is absent."""

    path: Path
    result: SearchResult | None = None
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    meta: dict[str, Any] | None = None
    recorder: Any = None
    stats: pd.DataFrame | None = None
    baseline_curves: list[dict[str, list[float]]] = field(default_factory=list)

    @property
    def summary(self) -> dict[str, Any]:
        return self.result.summary if self.result is not None else {}

    @property
    def search_config(self) -> dict[str, Any]:
        return self.summary.get("config", {})

    @property
    def mode(self) -> str | None:
        return self.search_config.get("mode") or (self.config or {}).get("mode")


def _yaml(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    return data if isinstance(data, dict) else None


def _records(path: Path) -> dict[str, dict[str, Any]]:
    """trials.jsonl, read-only: a run still writing it may have a cut last line, which is skipped."""
    store = TrialStore(path, readonly=True)
    return {key: store.get(key) for key in store.keys()}


def load_run(run_dir: str | Path) -> RunFiles:
    """Read a run directory: result files, trial store, config, meta, recorded statistics.

    >>> import tempfile
    >>> load_run(tempfile.mkdtemp()).result is None
    True
    """
    path = Path(run_dir)
    run = RunFiles(path)
    if all((path / name).exists() for name in RESULT_FILES):
        run.result = SearchResult.load(path)
    run.records = _records(path / rd.TRIALS)
    run.config = _yaml(path / rd.CONFIG)
    run.meta = _yaml(path / rd.META)
    if (path / rd.STATS).exists():
        from ..stats import Recorder

        run.recorder = Recorder.load(path / rd.STATS)
        run.stats = run.recorder.to_frame()
    elif (path / rd.STATS_CSV).exists():
        run.stats = read_csv(path / rd.STATS_CSV)
    if run.mode == "train":
        run.baseline_curves = baseline_curves(path / rd.BASELINE, run.search_config.get("seeds"))
    return run
