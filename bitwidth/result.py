"""``SearchResult``: the tables and the joint plan of a search, saved as CSV and YAML.

A result directory holds ``trials.csv`` (one row per evaluated plan), ``min_bits.csv``
(one row per (layer, kind)), ``costs.csv`` (fp32 / best uniform / joint plan),
``joint_plan.yaml`` (loadable with :func:`bitwidth.plan_from_dict`) and
``summary.yaml`` (joint and uniform outcome, baseline metrics, the search settings).

>>> import tempfile
>>> res = SearchResult.empty()
>>> d = tempfile.mkdtemp()
>>> res.save(d)
>>> SearchResult.load(d).min_bits.columns.tolist()
['layer', 'kind', 'min_bits', 'metric_at_min', 'evaluations', 'monotone']
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from .wrap import QuantSpec, plan_from_dict, plan_to_dict

__all__ = ["MIN_BITS_COLUMNS", "RESULT_FILES", "SearchResult"]

MIN_BITS_COLUMNS = ("layer", "kind", "min_bits", "metric_at_min", "evaluations", "monotone")
RESULT_FILES = ("trials.csv", "min_bits.csv", "costs.csv", "joint_plan.yaml", "summary.yaml")


def _plain(value: Any) -> Any:
    """YAML-safe builtins: numpy scalars to Python, NaN to None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


@dataclass
class SearchResult:
    """Everything a search found.

    ``trials``: one row per evaluated plan (``strategy, round, layer, kind, bits, plan,
    passed, metric, reused`` and trial details). ``min_bits``: ``layer, kind, min_bits,
    metric_at_min, evaluations, monotone``. ``joint_plan``: the mixed-precision plan.
    ``costs``: rows ``fp32``, ``uniform``, ``joint``; columns ``memory_bits``, ``bops``,
    ``train_bops`` and their ratios ``*_vs_fp32`` and ``*_vs_uniform``. ``summary``:
    ``joint`` (passed, metric, metrics, steps, bits), ``uniform`` (bits, passed, metric),
    ``baseline`` (metric name, mean metric, per-seed metrics), ``layer_costs`` (params and
    MACs per layer), ``counts`` (trials run and reused, evaluations per strategy),
    ``config`` (the search settings).
    """

    trials: pd.DataFrame
    min_bits: pd.DataFrame
    joint_plan: dict[str, QuantSpec]
    costs: pd.DataFrame
    summary: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def empty(cls) -> SearchResult:
        """A result with empty tables (a starting point for tests and tools)."""
        return cls(pd.DataFrame(columns=["strategy", "round", "layer", "kind", "bits", "plan", "passed", "metric",
                                         "reused"]),
                   pd.DataFrame(columns=list(MIN_BITS_COLUMNS)), {}, pd.DataFrame(), {})

    @property
    def joint_passed(self) -> bool:
        return bool(self.summary.get("joint", {}).get("passed", False))

    @property
    def uniform_bits(self) -> int | None:
        return self.summary.get("uniform", {}).get("bits")

    def min_bits_dict(self) -> dict[tuple[str, str], int | None]:
        """``{(layer, kind): min_bits or None}``.

        >>> SearchResult.empty().min_bits_dict()
        {}
        """
        return {(r.layer, r.kind): (None if pd.isna(r.min_bits) else int(r.min_bits))
                for r in self.min_bits.itertuples()}

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write the files of :data:`RESULT_FILES` into ``directory``."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.trials.to_csv(out / "trials.csv", index=False)
        self.min_bits.to_csv(out / "min_bits.csv", index=False)
        self.costs.to_csv(out / "costs.csv", index_label="plan")
        with open(out / "joint_plan.yaml", "w", encoding="utf-8") as f:
            yaml.safe_dump(_plain(plan_to_dict(self.joint_plan)), f, sort_keys=False)
        with open(out / "summary.yaml", "w", encoding="utf-8") as f:
            yaml.safe_dump(_plain(self.summary), f, sort_keys=False)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> SearchResult:
        """Read a result written by :meth:`save`."""
        src = Path(directory)
        missing = [name for name in RESULT_FILES if not (src / name).exists()]
        if missing:
            raise ValueError(f"{src} is not a search result directory: missing {', '.join(missing)}")
        trials = pd.read_csv(src / "trials.csv")
        if "bits" in trials:
            trials["bits"] = trials["bits"].astype("Int64")
        min_bits = pd.read_csv(src / "min_bits.csv").astype(
            {"min_bits": "Int64", "metric_at_min": float, "monotone": "boolean"})
        try:
            costs = pd.read_csv(src / "costs.csv", index_col="plan")
        except (pd.errors.EmptyDataError, ValueError):
            costs = pd.DataFrame()
        with open(src / "joint_plan.yaml", encoding="utf-8") as f:
            plan = plan_from_dict(yaml.safe_load(f) or {})
        with open(src / "summary.yaml", encoding="utf-8") as f:
            summary = yaml.safe_load(f) or {}
        return cls(trials, min_bits, plan, costs, summary)
