"""``SearchResult``: the tables and the joint plan of a search, saved as CSV and YAML.

A result directory holds ``trials.csv`` (one row per evaluated plan, with the metrics its
stored trials measured and, for a failing plan, the ``reason``), ``min_bits.csv``
(one row per (layer, kind)), ``costs.csv`` (fp32 / best uniform / joint plan),
``joint_plan.yaml`` (loadable with :func:`bitwidth.plan_from_dict`) and
``summary.yaml`` (joint and uniform outcome, baseline metrics, the search settings).

>>> import tempfile
>>> res = SearchResult.empty()
>>> d = tempfile.mkdtemp()
>>> res.save(d)
>>> SearchResult.load(d).min_bits.columns.tolist()
['layer', 'kind', 'min_bits', 'metric_at_min', 'evaluations', 'monotone']

Layer and site names are text, whatever they look like (``0``, ``007``, ``nan``,
``True``, ``h.0.attn:sdpa.q``): every CSV of a run is read with :func:`read_csv`.
"""

from __future__ import annotations

import io
import json
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from . import rundir as rd
from .criteria import criterion_from_dict, lower_is_better
from .wrap import QuantSpec, plan_from_dict, plan_to_dict

__all__ = [
    "as_float",
    "MIN_BITS_COLUMNS",
    "RESULT_FILES",
    "TEXT_COLUMNS",
    "SearchResult",
    "baseline_curves",
    "failure_reason",
    "format_metric",
    "read_csv",
    "reason_causes",
    "with_outcomes",
]

MIN_BITS_COLUMNS = ("layer", "kind", "min_bits", "metric_at_min", "evaluations", "monotone")
RESULT_FILES = (rd.TRIALS_CSV, rd.MIN_BITS, rd.COSTS, rd.JOINT_PLAN, rd.SUMMARY)
# Columns of a run's CSV files that hold names or free text, never numbers or booleans.
TEXT_COLUMNS = frozenset({"layer", "site", "kind", "group", "plan", "strategy", "keys", "error", "reason",
                          "variant", "op", "layer_type", "format", "family", "statistic", "scope"})
# pandas' own dtype for text read from a CSV (``str`` from pandas 3, ``object`` before).
_TEXT_DTYPE = pd.Series(["text"]).dtype


def read_csv(path: str | os.PathLike[str], **kwargs: Any) -> pd.DataFrame:
    """A CSV of a run directory, its name columns (:data:`TEXT_COLUMNS`) read as text.

    pandas would read a layer ``0`` as an integer, ``1.0`` as a float, ``True`` as a
    boolean and ``nan`` as missing; names must come back as written. An empty cell is
    missing (``NaN``) in every column. ``kwargs`` go to :func:`pandas.read_csv`.

    >>> import io
    >>> read_csv(io.StringIO("layer,bits\\n007,4\\nnan,\\nTrue,2\\n,8\\n")).values.tolist()
    [['007', 4.0], ['nan', nan], ['True', 2.0], [nan, 8.0]]
    """
    if hasattr(path, "read"):  # read twice below: once for the numbers, once for the text
        path = io.StringIO(path.read())
    frame = pd.read_csv(path, **kwargs)
    text = [c for c in frame.columns if c in TEXT_COLUMNS]
    if text:
        if isinstance(path, io.StringIO):
            path.seek(0)
        raw = pd.read_csv(path, usecols=text, dtype=str, keep_default_na=False)
        for col in text:
            values = pd.Series([v if v != "" else math.nan for v in raw[col]], index=frame.index, dtype=object)
            frame[col] = values.astype(_TEXT_DTYPE)
    return frame


def format_metric(name: str, value: Any, digits: int = 1) -> str:
    """A metric value as the report writes it: accuracies (fractions) in percent, others to 4
    significant figures; ``n/a`` when missing or not finite.

    >>> format_metric("accuracy", 0.9777777777777777), format_metric("loss", 1.23456), format_metric("accuracy", None)
    ('97.8%', '1.235', 'n/a')
    """
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "n/a"
    if not math.isfinite(v):
        return "n/a" if math.isnan(v) else str(v)
    if "acc" in name and not lower_is_better(name) and 0 <= v <= 1:
        return f"{v:.{digits}%}"
    return f"{v:.{digits + 3}g}"


def _compare(name: str, value: float, op: str, limit: float) -> str:
    """``name value op limit`` with enough digits that the two numbers differ."""
    for digits in range(1, 6):
        a, b = format_metric(name, value, digits), format_metric(name, limit, digits)
        if a != b:
            break
    return f"{name} {a} {op} {b}"


def failure_reason(row: Mapping[str, Any], criterion: Mapping[str, Any] | None, baseline_metric: float | None,
                   baseline_train_loss: float | None = None) -> str:
    """Why a plan failed its criterion, from the stored outcome (a ``trials`` row) and the criterion dict.

    One or more causes joined by ``"; "``: ``error: …``, ``diverged``, the metric against
    its threshold (``accuracy 81.0% < 95.0%``), and for ``converge`` the final training
    loss against ``(1 + loss_tol)`` times fp32's plus ``loss_abs_tol``
    (``train loss 1.9 > 1.5 (1.5x fp32)``, ``train loss 0.02 > 0.0115 (1.5x fp32 + 0.01)``).
    ``row`` holds ``metric`` (the criterion's metric, mean over seeds), ``error``,
    ``diverged`` and ``train_loss`` where known; ``baseline_metric`` and
    ``baseline_train_loss`` are fp32's (means over seeds).

    >>> crit = {"name": "converge", "max_drop": 0.02, "loss_tol": 0.5, "metric": "accuracy", "relative": False}
    >>> failure_reason({"metric": 0.97, "train_loss": 1.9}, crit, 0.97, 1.0)
    'train loss 1.9 > 1.5 (1.5x fp32)'
    >>> failure_reason({"metric": 0.97, "train_loss": 0.02}, {**crit, "loss_abs_tol": 0.01}, 0.97, 0.001)
    'train loss 0.02 > 0.0115 (1.5x fp32 + 0.01)'
    >>> failure_reason({"metric": 0.81, "train_loss": 0.9}, crit, 0.97, 1.0)
    'accuracy 81.0% < 95.0%'
    >>> failure_reason({"metric": float("nan"), "error": "RuntimeError: boom"}, crit, 0.97)
    'error: RuntimeError: boom'
    """
    error = row.get("error")
    if isinstance(error, str) and error:
        return f"error: {error}"
    if _truthy(row.get("diverged")):
        return "diverged"
    crit = dict(criterion or {})
    name = str(crit.get("metric", "accuracy"))
    causes = []
    value = as_float(row.get("metric"))
    if not math.isfinite(value):
        causes.append(f"{name} {value}")
    elif crit and baseline_metric is not None and math.isfinite(as_float(baseline_metric)):
        try:
            limit = criterion_from_dict(crit).threshold({name: float(baseline_metric)})
        except ValueError:  # a criterion this version does not know: no threshold to cite
            limit = math.nan
        if lower_is_better(name) and value > limit:
            causes.append(_compare(name, value, ">", limit))
        elif not lower_is_better(name) and value < limit:
            causes.append(_compare(name, value, "<", limit))
    train_loss, base_loss = as_float(row.get("train_loss")), as_float(baseline_train_loss)
    if crit.get("name") == "converge" and math.isfinite(base_loss):
        # A dict written before loss_abs_tol existed was judged without it.
        factor, slack = 1 + float(crit.get("loss_tol", 0.5)), float(crit.get("loss_abs_tol", 0.0))
        limit = base_loss * factor + slack
        if not math.isfinite(train_loss) and "train_loss" in row:
            causes.append(f"train loss {train_loss}")
        elif train_loss > limit:
            causes.append(f"{_compare('train loss', train_loss, '>', limit)} ({factor:g}x fp32"
                          + (f" + {slack:g})" if slack else ")"))
    return "; ".join(causes) or "fails the criterion"


def reason_causes(reason: Any) -> list[str]:
    """What failed, one short word group per cause of a :func:`failure_reason` text.

    >>> reason_causes("accuracy 81.0% < 95.0%; train loss 1.9 > 1.5 (1.5x fp32)"), reason_causes("error: x; y")
    (['accuracy', 'train loss'], ['error'])
    """
    if not isinstance(reason, str) or not reason:
        return []
    if reason.startswith("error"):
        return ["error"]  # an error message may itself hold "; "
    causes = []
    for part in reason.split("; "):
        words = []
        for word in part.split(" "):
            if word[:1].isdigit() or word[:1] in "<>-+" or word in ("nan", "inf", "n/a"):
                break
            words.append(word)
        causes.append(" ".join(words) or part)
    return causes


def as_float(value: Any) -> float:
    """``value`` as a float; NaN when missing or not a number (tables read from files).

    >>> as_float("0.5"), as_float(None)
    (0.5, nan)
    """
    try:
        return float(value) if value is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() == "true"
    return bool(value) if value is not None and not (isinstance(value, float) and math.isnan(value)) else False


def baseline_curves(path: str | os.PathLike[str], seeds: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """The fp32 baselines' ``seed``, ``loss_curve`` and ``val_curve`` from a run's ``baseline.pt``
    (only ``seeds`` when given); empty when the file is absent or unreadable."""
    path = Path(path)
    if not path.exists():
        return []
    import torch

    try:
        entries = torch.load(path, weights_only=True)
    except Exception:  # a cache that cannot be read only costs the reference curve
        return []
    if not isinstance(entries, dict):
        return []
    out = [{"seed": json.loads(e["key"]).get("seed"), "loss_curve": list(e.get("loss_curve", [])),
            "val_curve": list(e.get("val_curve", []))} for e in entries.values()]
    return [c for c in out if seeds is None or c["seed"] in set(seeds)]


def _stored_records(path: Path) -> dict[str, dict[str, Any]]:
    if not path.exists():
        return {}
    from .store import TrialStore

    store = TrialStore(path, readonly=True)  # a reader: no lock, never changes the file
    return {key: store.get(key) for key in store.keys()}


def with_outcomes(trials: pd.DataFrame, summary: Mapping[str, Any],
                  records: Mapping[str, Mapping[str, Any]] | None = None,
                  baseline_train_loss: float | None = None) -> pd.DataFrame:
    """``trials`` with each stored metric (mean over the trial's seeds, e.g. ``loss``,
    ``train_loss``) and ``reason`` (empty for passing plans) added.

    ``records``: the trial store's records by key (``trials.jsonl``); the criterion and the
    fp32 metric come from ``summary``.

    >>> t = pd.DataFrame({"passed": [True, False], "metric": [0.97, 0.5], "keys": ["a", "b"]})
    >>> s = {"config": {"criterion": {"name": "accuracy", "max_drop": 0.02}}, "baseline": {"metric": 0.97}}
    >>> rec = {"a": {"outcome": {"metrics": {"loss": 0.1}}}, "b": {"outcome": {"metrics": {"loss": 2.0}}}}
    >>> with_outcomes(t, s, rec)[["loss", "reason"]].values.tolist()
    [[0.1, nan], [2.0, 'accuracy 50.0% < 95.0%']]
    """
    frame = trials.copy()
    records = records or {}
    per_row = []
    for keys in frame["keys"] if "keys" in frame.columns else [None] * len(frame):
        outs = [records[k].get("outcome", {}) for k in (keys.split() if isinstance(keys, str) else [])
                if k in records]
        names = sorted({n for o in outs for n in o.get("metrics", {})})
        per_row.append({n: statistics.fmean(as_float(o.get("metrics", {}).get(n)) for o in outs) for n in names})
    for name in sorted({n for m in per_row for n in m} - set(frame.columns)):
        frame[name] = [m.get(name, math.nan) for m in per_row]
    crit = (summary.get("config") or {}).get("criterion")
    base = (summary.get("baseline") or {}).get("metric")
    frame["reason"] = [math.nan if _truthy(row.get("passed")) else failure_reason(row, crit, base, baseline_train_loss)
                       for row in frame.to_dict(orient="records")] if len(frame) else pd.Series(dtype=object)
    return frame


def _annotated(trials: pd.DataFrame, summary: Mapping[str, Any], directory: Path) -> pd.DataFrame:
    """:func:`with_outcomes` from the files of ``directory`` (trial store, fp32 baseline)."""
    seeds = (summary.get("config") or {}).get("seeds")
    finals = [float(c["loss_curve"][-1]) for c in baseline_curves(directory / rd.BASELINE, seeds)
              if c["loss_curve"]]
    return with_outcomes(trials, summary, _stored_records(directory / rd.TRIALS),
                         statistics.fmean(finals) if finals else None)


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
        """Write the files of :data:`RESULT_FILES` into ``directory``.

        ``trials`` gains (here and in the file) the metrics of the trials stored in
        ``directory/trials.jsonl`` and the ``reason`` each failing plan failed.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.trials = _annotated(self.trials, self.summary, out)
        self.trials.to_csv(out / rd.TRIALS_CSV, index=False)
        self.min_bits.to_csv(out / rd.MIN_BITS, index=False)
        self.costs.to_csv(out / rd.COSTS, index_label="plan")
        with open(out / rd.JOINT_PLAN, "w", encoding="utf-8") as f:
            yaml.safe_dump(_plain(plan_to_dict(self.joint_plan)), f, sort_keys=False)
        with open(out / rd.SUMMARY, "w", encoding="utf-8") as f:
            yaml.safe_dump(_plain(self.summary), f, sort_keys=False)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> SearchResult:
        """Read a result written by :meth:`save`."""
        src = Path(directory)
        missing = [name for name in RESULT_FILES if not (src / name).exists()]
        if missing:
            raise ValueError(f"{src} is not a search result directory: missing {', '.join(missing)}")
        trials = read_csv(src / rd.TRIALS_CSV)
        if "bits" in trials:
            trials["bits"] = trials["bits"].astype("Int64")
        min_bits = read_csv(src / rd.MIN_BITS).astype(
            {"min_bits": "Int64", "metric_at_min": float, "monotone": "boolean"})
        try:
            costs = read_csv(src / rd.COSTS, index_col="plan")
        except (pd.errors.EmptyDataError, ValueError):
            costs = pd.DataFrame()
        with open(src / rd.JOINT_PLAN, encoding="utf-8") as f:
            plan = plan_from_dict(yaml.safe_load(f) or {})
        with open(src / rd.SUMMARY, encoding="utf-8") as f:
            summary = yaml.safe_load(f) or {}
        if "reason" not in trials.columns:  # written before trials.csv kept the reasons
            trials = _annotated(trials, summary, src)
        return cls(trials, min_bits, plan, costs, summary)
