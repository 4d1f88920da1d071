"""The report's tables: DataFrames built from the parts of a run directory.

Each function takes what :func:`bitwidth.report.run_files.load_run` read from disk (the
search result, the trial store, recorded statistics) and returns one table the report
shows; the same tables are what the plots of :mod:`bitwidth.report.plots` take.

>>> import pandas as pd
>>> mb = pd.DataFrame({"layer": ["fc1", "fc1", "fc2"], "kind": ["weight", "activation", "weight"],
...                    "min_bits": pd.array([4, 6, None], dtype="Int64")})
>>> table = min_bits_table(mb)
>>> table.loc["fc1"].tolist(), table.loc["fc2", "weight"] is pd.NA
([4, 6], True)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..cost import COST_MEASURES, CostModel, LayerCost
from ..histogram import first_raw_step, histogram_stats
from ..result import as_float
from ..search import plan_label
from ..wrap import KINDS, QuantSpec, plan_from_dict

__all__ = [
    "SEARCHED",
    "STATISTICS",
    "STATISTIC_LABELS",
    "answer_table",
    "correlation_table",
    "curves_table",
    "distribution_table",
    "joint_plan_table",
    "meta_table",
    "min_bits_table",
    "pareto_table",
    "sensitivity_table",
    "spearman",
]

# What the integer of each family's search counts (``min_bits`` is in these units).
SEARCHED = {
    "int": "bits",
    "fixed": "word bits",
    "fixed_frac": "fraction bits",
    "float": "mantissa bits",
    "float_exp": "exponent bits",
    "group_int": "bits",
    "mx": "element bits",
    "block": "scales per 256 values",
}

# Distribution statistics set against the minimum bits, with what each one measures.
STATISTICS = {
    "absmax_std": "absmax / std: how far the largest value sits beyond the spread",
    "kurtosis": "excess kurtosis: tail weight (0 for a Gaussian)",
    "octaves_below_max": "log2(absmax / median nonzero |x|): octaves between the typical and the largest value",
    "dynamic_range": "log2(p99.99 / p1 of nonzero |x|): octaves the bulk of the values spans",
    "predicted_bits": "bits the calibrated predictor gives: a line in the dynamic range fitted to measured minima",
}

# Short axis labels for the same statistics.
STATISTIC_LABELS = {
    "absmax_std": "absmax / std",
    "kurtosis": "excess kurtosis",
    "octaves_below_max": "log2(absmax / median |x|)",
    "dynamic_range": "log2(p99.99 / p1 of |x|)",
    "predicted_bits": "predicted bits (calibrated: SQNR rule and median)",
}



def _isolated(trials: pd.DataFrame) -> pd.Series:
    """Rows that quantized one (layer, kind) alone: the per-pair strategies' trials.

    Joint-step rows also name a (layer, kind), the one they raise, but quantize every pair.
    """
    per_pair = trials["strategy"].isin(("grid", "bisect"))
    return per_pair & (trials["layer"] != "*") & trials["layer"].notna() & trials["bits"].notna()


# ----------------------------------------------------------------------------- the answer


def min_bits_table(min_bits: pd.DataFrame) -> pd.DataFrame:
    """Minimum bits as a layer x kind table (layers and kinds in search order; NA: no candidate passed)."""
    layers = list(dict.fromkeys(min_bits["layer"]))
    kinds = [k for k in KINDS if k in set(min_bits["kind"])]
    table = min_bits.pivot(index="layer", columns="kind", values="min_bits").reindex(index=layers, columns=kinds)
    table.index.name, table.columns.name = "layer", None
    return table.astype("Int64")


def joint_plan_table(plan: Mapping[str, QuantSpec], kinds: Sequence[str] = KINDS) -> pd.DataFrame:
    """The joint plan as layer x kind format names (``fp32`` where a kind stays full precision).

    >>> joint_plan_table({"fc1": QuantSpec(weight="int4")}, ("weight", "activation")).values.tolist()
    [['int4', 'fp32']]
    """
    rows = {layer: {k: (getattr(spec, k).name if getattr(spec, k) is not None else "fp32") for k in kinds}
            for layer, spec in plan.items()}
    table = pd.DataFrame.from_dict(rows, orient="index", columns=list(kinds))
    table.index.name = "layer"
    return table


def answer_table(summary: Mapping[str, Any], costs: pd.DataFrame) -> pd.DataFrame:
    """fp32, the best uniform width and the joint plan: metric, its change, pass, and costs.

    Costs are ratios: ``*_vs_fp32`` of full precision, ``*_vs_uniform`` of the best uniform plan.

    >>> s = {"baseline": {"metric_name": "accuracy", "metric": 0.9}, "uniform": {"bits": 4, "passed": True,
    ...      "metric": 0.89}, "joint": {"passed": True, "metric": 0.895}}
    >>> answer_table(s, pd.DataFrame())[["bits", "accuracy", "change"]].values.tolist()
    [['32', 0.9, 0.0], ['4', 0.89, -0.01], ['mixed', 0.895, -0.005]]
    """
    base = summary.get("baseline", {})
    name = base.get("metric_name", "metric")
    ref = as_float(base.get("metric"))
    uni, joint = summary.get("uniform", {}), summary.get("joint", {})
    rows = {
        "fp32": {"bits": "32", name: ref, "passed": True},
        "uniform": {"bits": str(uni["bits"]) if uni.get("bits") is not None else "none passed",
                    name: as_float(uni.get("metric")), "passed": bool(uni.get("passed", False))},
        "joint": {"bits": "mixed", name: as_float(joint.get("metric")), "passed": bool(joint.get("passed", False))},
    }
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.insert(2, "change", (table[name] - ref).round(12))
    ratios = [c for m in COST_MEASURES for c in (f"{m}_vs_fp32", f"{m}_vs_uniform") if c in costs.columns]
    for col in ratios:
        table[col] = [as_float(costs[col].get(p)) if p in costs.index else math.nan for p in table.index]
    table.index.name = "plan"
    return table



# ----------------------------------------------------------------------------- why: sensitivity


def sensitivity_table(trials: pd.DataFrame, layers: Sequence[str] = ()) -> pd.DataFrame:
    """Trials that quantized one (layer, kind) alone: ``layer, kind, bits, metric, passed``, and
    ``train_loss``, ``loss`` and ``reason`` where ``trials`` has them.

    Rows are sorted by ``layers`` (the search order; others after, by name), kind and bits.

    >>> t = pd.DataFrame({"strategy": ["grid", "joint"], "layer": ["fc1", "*"], "kind": ["weight", "*"],
    ...                   "bits": [4, None], "metric": [0.9, 0.8], "passed": [True, False]})
    >>> sensitivity_table(t).values.tolist()
    [['fc1', 'weight', 4, 0.9, True]]
    """
    cols = ["layer", "kind", "bits", "metric", "passed"]
    cols += [c for c in ("train_loss", "loss", "reason") if c in trials.columns and c not in cols]
    iso = trials[_isolated(trials)].drop_duplicates(["layer", "kind", "bits"], keep="last")[cols]
    iso = iso.astype({"bits": int, "metric": float, "passed": bool})
    order = {name: i for i, name in enumerate(dict.fromkeys([*layers, *sorted(set(iso["layer"]))]))}
    kind_order = {k: i for i, k in enumerate(KINDS)}
    keys = iso.apply(lambda r: (order[r["layer"]], kind_order.get(r["kind"], len(KINDS)), r["bits"]), axis=1)
    return iso.iloc[sorted(range(len(iso)), key=lambda i: keys.iloc[i])].reset_index(drop=True)


# ----------------------------------------------------------------------------- why: distributions


def distribution_table(stats: pd.DataFrame, min_bits: pd.DataFrame | None = None, *, recorder: Any = None,
                       family: str | None = None, candidates: Sequence[int] = ()) -> pd.DataFrame:
    """Each (layer, kind)'s distribution statistics, beside its minimum bits when a search ran.

    ``stats``: :meth:`Recorder.to_frame` (or ``stats.csv``). With the ``recorder`` the
    histogram statistics (``octaves_below_max``, ``dynamic_range``) are added, and for
    the ``int`` and ``fixed`` families the bits the calibrated predictor gives
    (``predicted_bits``, :func:`bitwidth.predict.predict_min_bits`).

    >>> st = pd.DataFrame({"layer": ["fc"], "kind": ["weight"], "absmax": [2.0], "std": [0.5],
    ...                    "kurtosis": [0.1], "zero_frac": [0.0]})
    >>> distribution_table(st)[["layer", "absmax_std"]].values.tolist()
    [['fc', 4.0]]
    """
    raw = first_raw_step(stats)
    keep = [c for c in ("layer", "kind", "absmax", "std", "kurtosis", "zero_frac") if c in raw.columns]
    table = raw[keep].copy()
    table["absmax_std"] = table["absmax"] / table["std"].where(table["std"] > 0)
    if recorder is not None:
        table = table.merge(histogram_stats(first_raw_step(recorder.hist_frame())), on=["layer", "kind"], how="left")
        if family in ("int", "fixed") and candidates:
            from ..predict import predict_min_bits

            pred = first_raw_step(predict_min_bits(recorder, family, candidates))
            table = table.merge(pred[["layer", "kind", "min_bits"]].rename(columns={"min_bits": "predicted_bits"}),
                                on=["layer", "kind"], how="left")
    if min_bits is not None:
        table = min_bits[["layer", "kind", "min_bits"]].merge(table, on=["layer", "kind"], how="inner")
    order = ["layer", "kind", "min_bits", *STATISTICS, "absmax", "std", "zero_frac"]
    return table[[c for c in order if c in table.columns]].reset_index(drop=True)


def spearman(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, int]:
    """Spearman rank correlation ``(rho, p_value, n)`` over the pairs where both are finite.

    ``rho`` is NaN when fewer than 3 pairs remain or either side is constant: no ranking to compare.

    >>> spearman([1, 2, 3, 4], [2, 4, 5, 9])[0], spearman([1, 2, 3], [4, 4, 4])[2]
    (1.0, 3)
    """
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(xs) & np.isfinite(ys)
    xs, ys, n = xs[ok], ys[ok], int(ok.sum())
    if n < 3 or np.unique(xs).size < 2 or np.unique(ys).size < 2:
        return math.nan, math.nan, n
    from scipy.stats import spearmanr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small-n accuracy notes; n and p are reported beside rho
        res = spearmanr(xs, ys)
    return float(res.statistic), float(res.pvalue), n


def _ranked_min_bits(dist: pd.DataFrame, candidates: Sequence[int]) -> pd.Series:
    # "no candidate passed" needs more than the largest candidate: rank it above all of them.
    top = max(candidates, default=int(dist["min_bits"].max(skipna=True) or 0)) + 1
    return dist["min_bits"].astype("Float64").fillna(top).astype(float)


def correlation_table(dist: pd.DataFrame, candidates: Sequence[int] = ()) -> pd.DataFrame:
    """Spearman correlation of minimum bits with each statistic, over all pairs and per kind.

    One row per (statistic, scope): ``statistic, scope, n, rho, p_value``. Pairs where no
    candidate passed rank above the largest candidate.

    >>> d = pd.DataFrame({"kind": ["weight"] * 4, "min_bits": [2, 3, 4, 6], "kurtosis": [0.1, 0.5, 2.0, 9.0]})
    >>> correlation_table(d)[["statistic", "scope", "n", "rho"]].values.tolist()[0]
    ['kurtosis', 'all', 4, 1.0]
    """
    if "min_bits" not in dist.columns:
        return pd.DataFrame(columns=["statistic", "scope", "n", "rho", "p_value"])
    bits = _ranked_min_bits(dist, candidates)
    scopes = [("all", pd.Series(True, index=dist.index))]
    kinds = [k for k in KINDS if k in set(dist["kind"])]
    if len(kinds) > 1:
        scopes += [(k, dist["kind"] == k) for k in kinds]
    rows = []
    for stat in (s for s in STATISTICS if s in dist.columns):
        for scope, mask in scopes:
            rho, p, n = spearman(dist.loc[mask, stat].astype(float), bits[mask])
            rows.append({"statistic": stat, "scope": scope, "n": n, "rho": rho, "p_value": p})
    return pd.DataFrame(rows, columns=["statistic", "scope", "n", "rho", "p_value"])


# ----------------------------------------------------------------------------- how


def _trial_keys(row: Any) -> list[str]:
    keys = getattr(row, "keys", None)
    return str(keys).split() if isinstance(keys, str) else []


def curves_table(trials: pd.DataFrame, records: Mapping[str, Mapping[str, Any]],
                 layers: Sequence[str] = ()) -> pd.DataFrame:
    """Per-epoch training curves of the isolated and uniform trials (train mode), in long form.

    Columns ``group`` (``layer.kind`` or ``uniform``), ``bits, seed, epoch, loss,
    val_accuracy, diverged``; uniform first, then by ``layers`` (the search order) and
    kind. Trials without a stored curve (ptq) give no rows.

    >>> t = pd.DataFrame({"strategy": ["uniform"], "layer": ["*"], "kind": ["*"], "bits": [4], "keys": ["k"]})
    >>> rec = {"k": {"seed": 0, "outcome": {"loss_curve": [2.0, 1.0], "val_curve": [0.5, 0.8], "diverged": False}}}
    >>> curves_table(t, rec)[["group", "bits", "epoch", "loss"]].values.tolist()
    [['uniform', 4, 1, 2.0], ['uniform', 4, 2, 1.0]]
    """
    cols = ["group", "bits", "seed", "epoch", "loss", "val_accuracy", "diverged"]
    rows = []
    chosen = trials[_isolated(trials) | ((trials["strategy"] == "uniform") & trials["bits"].notna())]
    chosen = chosen.assign(group=[f"{r.layer}.{r.kind}" if r.layer != "*" else "uniform" for r in chosen.itertuples()])
    for row in chosen.drop_duplicates(["group", "bits"], keep="last").itertuples():
        group = row.group
        for key in _trial_keys(row):
            rec = records.get(key)
            if rec is None:
                continue
            out = rec.get("outcome", {})
            loss, val = list(out.get("loss_curve") or []), list(out.get("val_curve") or [])
            for epoch in range(max(len(loss), len(val))):
                rows.append({"group": group, "bits": int(row.bits), "seed": rec.get("seed"), "epoch": epoch + 1,
                             "loss": loss[epoch] if epoch < len(loss) else math.nan,
                             "val_accuracy": val[epoch] if epoch < len(val) else math.nan,
                             "diverged": bool(out.get("diverged", False)), "_layer": row.layer,
                             "_kind": row.kind})
    frame = pd.DataFrame(rows, columns=[*cols, "_layer", "_kind"])
    order = {name: i for i, name in enumerate(dict.fromkeys([*layers, *sorted(set(frame["_layer"]) - {"*"})]))}
    frame["_o"] = [(-1 if lay == "*" else order[lay], KINDS.index(k) if k in KINDS else len(KINDS))
                   for lay, k in zip(frame["_layer"], frame["_kind"], strict=True)]
    frame = frame.sort_values(["_o", "bits", "seed", "epoch"], kind="stable")
    return frame[cols].reset_index(drop=True)


def pareto_table(trials: pd.DataFrame, records: Mapping[str, Mapping[str, Any]], summary: Mapping[str, Any],
                 costs: pd.DataFrame, joint_plan: Mapping[str, QuantSpec] | None = None) -> pd.DataFrame:
    """Every evaluated plan with its metric and relative costs (``*_vs_fp32``), plus fp32 itself.

    Per-layer sizes come from ``summary["layer_costs"]``; without them only the plans of
    ``costs.csv`` (fp32, best uniform, joint) can be placed. Columns ``group`` (``fp32``,
    ``isolated``, ``joint step``, ``joint`` for the final ``joint_plan``, ``uniform``),
    ``plan, bits, metric, passed`` and the cost ratios.
    """
    measures = list(COST_MEASURES)
    ratio_cols = [f"{m}_vs_fp32" for m in measures]
    cols = ["group", "plan", "bits", "metric", "passed", *ratio_cols]
    base = summary.get("baseline", {})
    rows = [{"group": "fp32", "plan": "fp32", "bits": 32, "metric": as_float(base.get("metric")), "passed": True,
             **dict.fromkeys(ratio_cols, 1.0)}]
    sizes = summary.get("layer_costs")
    if sizes:
        model = CostModel({name: LayerCost(int(v["params"]), int(v["macs"]), bool(v.get("weightless", False)))
                           for name, v in sizes.items()})
        full = model.of({})
        final = plan_label(joint_plan) if joint_plan is not None else None
        iso = _isolated(trials)
        for row in trials.itertuples():
            keys = _trial_keys(row)
            rec = records.get(keys[0]) if keys else None
            if rec is None:
                continue
            cost = model.of(plan_from_dict(rec.get("plan", {})))
            group = str(row.strategy)
            if iso[row.Index]:
                group = "isolated"
            elif group == "joint":
                group = "joint" if row.plan == final else "joint step"
            rows.append({"group": group, "plan": row.plan, "bits": row.bits, "metric": float(row.metric),
                         "passed": bool(row.passed),
                         **{f"{m}_vs_fp32": cost[m] / full[m] if full[m] else math.nan for m in measures}})
    else:
        uni = summary.get("uniform", {})
        for plan in ("uniform", "joint"):
            if plan not in costs.index or (plan == "uniform" and uni.get("bits") is None):
                continue
            part = summary.get(plan, {})
            rows.append({"group": plan, "plan": plan, "bits": part.get("bits") if plan == "uniform" else None,
                         "metric": as_float(part.get("metric")), "passed": bool(part.get("passed", False)),
                         **{c: as_float(costs.loc[plan].get(c)) for c in ratio_cols}})
    table = pd.DataFrame(rows, columns=cols)
    table["bits"] = table["bits"].astype("Int64")
    return table.drop_duplicates(["group", "plan"], keep="last").reset_index(drop=True)


def meta_table(meta: Mapping[str, Any] | None, summary: Mapping[str, Any],
               config: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Run metadata as ``item, value`` rows: task, search settings, versions, device, time, trials.

    >>> meta_table({"torch": "2.4", "wall_time_s": 12.5}, {"counts": {"trials_run": 3}}).values.tolist()
    [['trials run', '3'], ['torch', '2.4'], ['wall time', '12.5 s']]
    """
    cfg = summary.get("config", {})
    crit = cfg.get("criterion") or {}
    opts = cfg.get("trial_options") or {}
    counts = summary.get("counts", {})
    meta = dict(meta or {})
    items: list[tuple[str, Any]] = [
        ("run", (config or {}).get("name")),
        ("task", (cfg.get("task") or {}).get("name")),
        ("mode", cfg.get("mode")),
        ("layers", ", ".join(map(str, cfg.get("layers", []))) or None),
        ("kinds", ", ".join(cfg.get("kinds", [])) or None),
        ("format family", cfg.get("family")),
        ("family options", _short(cfg.get("family_options")) if cfg.get("family_options") else None),
        ("candidates", ", ".join(map(str, cfg.get("candidates", []))) or None),
        ("criterion", _short(crit) if crit else None),
        ("strategy", cfg.get("strategy")),
        ("seeds", ", ".join(map(str, cfg.get("seeds", meta.get("seeds") or []))) or None),
        ("training", _short({k: opts[k] for k in ("epochs", "lr", "batch_size", "optimizer") if k in opts})
         if opts else None),
        ("trials run", counts.get("trials_run", meta.get("trials_run"))),
        ("trials reused", counts.get("trials_reused", meta.get("trials_reused"))),
        ("evaluations", _short(counts["evaluations"]) if counts.get("evaluations") else None),
        ("trials per pair", counts.get("trials_per_pair")),
        ("full evaluations per pair", counts.get("full_evaluations_per_pair")),
        ("early stop", _short(cfg["early_stop"]) if (cfg.get("early_stop") or {}).get("enabled") else None),
        ("bitwidth", meta.get("bitwidth")),
        ("torch", meta.get("torch")),
        ("python", meta.get("python")),
        ("platform", meta.get("platform")),
        ("device", " ".join(str(v) for v in (meta.get("device"), meta.get("cuda")) if v) or None),
        ("threads", meta.get("threads")),
        ("executor", _short(meta["executor"]) if isinstance(meta.get("executor"), dict) else meta.get("executor")),
        ("wall time", f"{meta['wall_time_s']} s" if meta.get("wall_time_s") is not None else None),
        ("finished", meta.get("finished")),
    ]
    rows = [(k, str(v)) for k, v in items if v is not None and v != ""]
    return pd.DataFrame(rows, columns=["item", "value"])


def _short(d: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items() if v is not None)
