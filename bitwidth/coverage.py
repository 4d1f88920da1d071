"""What a plan quantizes, and what it leaves out: ``sites`` and ``coverage``.

``sites(model, example_inputs)`` runs one forward and lists every site: weight sites
(with the parameter they hold), and each op site's activation and gradient, with shapes,
elements and the MACs of the products each input enters. ``coverage`` weighs a plan
against it: the fraction of weight elements it quantizes and the fraction of MAC inputs
(each multiplied operand of every matrix product, weighted by that product's MACs).

>>> import torch, torch.nn as nn
>>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
>>> sites(model, torch.zeros(1, 4))[["site", "kind", "op", "macs"]].head(3).values.tolist()
[['0', 'weight', 'Linear', 32], ['0', 'activation', 'linear', 32], ['0', 'gradient', 'linear', 32]]
>>> print(coverage(model, {"0": "int8"}, torch.zeros(1, 4)))
quantizes 66.7% of MAC inputs and 66.7% of weight elements; left out: 2 (weight), \
2 (activation)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import nn

from .registry import weight_axes
from .sites import Engine, _Trace, engine_of
from .wrap import KINDS, Plan, _resolver, _specs

__all__ = ["SITE_COLUMNS", "Coverage", "call_model", "coverage", "sites", "weigh"]

SITE_COLUMNS = ["site", "kind", "op", "param", "shape", "elements", "macs", "inputs", "quantizable", "reason"]


def call_model(model: nn.Module, example_inputs: Any) -> Any:
    """``model(*t)`` for a tuple, ``model(**d)`` for a dict, else ``model(x)``."""
    if isinstance(example_inputs, tuple):
        return model(*example_inputs)
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    return model(example_inputs)


def _trace(model: nn.Module, example_inputs: Any) -> tuple[Engine, _Trace]:
    eng = engine_of(model) or engine_of(model, create=True)
    assert eng is not None
    eng.trace = _Trace()
    eng.refresh()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            call_model(model, example_inputs)
        return eng, eng.trace
    finally:
        model.train(was_training)
        eng.trace = None
        eng.refresh()
        if engine_of(model) is None:
            eng.remove_hooks()


def sites(model: nn.Module, example_inputs: Any) -> pd.DataFrame:
    """Every site of ``model`` seen in one eval forward on ``example_inputs`` (no gradient is taken).

    Columns: ``site``, ``kind``, ``op`` (module type for weights, op for the others),
    ``param`` (the parameter a weight site holds; tied weights share one), ``shape``,
    ``elements``, ``macs`` (of the products this tensor enters, for these inputs: pass
    one example for MACs per example), ``inputs`` (multiplied operands the row stands
    for per call: 2 for ``a @ b`` between activations), ``quantizable`` and ``reason``.
    Weights that no registry rule names (``MultiheadAttention.bias_k``) are listed as
    not quantizable.
    """
    return _table(model, example_inputs)[1]


def _table(model: nn.Module, example_inputs: Any) -> tuple[Engine, pd.DataFrame]:
    eng, trace = _trace(model, example_inputs)
    names = {id(p): n for n, p in model.named_parameters()}
    rows = trace.rows
    for slot in eng.slots.values():
        if (slot.name, "weight") not in rows and slot.param is not None:
            trace.add(slot.name, "weight", type(slot.module).__name__, slot.param, 0)
    for mname, m in eng.modules.items():
        weights = weight_axes(m)
        for pname, p in m._parameters.items():
            if p is not None and p.is_floating_point() and p.dim() >= 2 and pname not in weights:
                name = f"{mname}.{pname}" if mname else pname
                trace.add(name, "weight", type(m).__name__, p, 0, reason=(
                    f"not a weight of {type(m).__name__} in the registry (bitwidth.register_module adds it)"))
    order = {site: i for i, site in enumerate(dict.fromkeys(site for site, _ in rows))}
    frame = pd.DataFrame(list(rows.values()))
    frame["param"] = [names.get(id(eng.slots[s].param), s) if k == "weight" and s in eng.slots else ""
                      for s, k in zip(frame["site"], frame["kind"], strict=True)]
    frame["_o"] = [order[s] * 3 + KINDS.index(k) for s, k in zip(frame["site"], frame["kind"], strict=True)]
    return eng, frame.sort_values("_o", kind="stable")[SITE_COLUMNS].reset_index(drop=True)


@dataclass(frozen=True)
class Coverage:
    """What a plan quantizes: fractions, and every site and kind it leaves out with why."""

    weight_fraction: float
    mac_fraction: float
    table: pd.DataFrame  # sites() with a ``quantized`` column
    left_out: pd.DataFrame  # site, kind, reason

    def __str__(self) -> str:
        items = [f"{r.site} ({r.kind})" for r in self.left_out.itertuples()]
        shown = ", ".join(items[:8]) + (f", … ({len(items) - 8} more)" if len(items) > 8 else "")
        return (f"quantizes {self.mac_fraction:.1%} of MAC inputs and {self.weight_fraction:.1%} of weight "
                f"elements; left out: {shown or 'nothing'}")


def coverage(model: nn.Module, plan: Plan, example_inputs: Any) -> Coverage:
    """The fraction of weight elements and of matmul MAC inputs ``plan`` quantizes, and what it leaves out.

    A weight element counts when every site reading its parameter quantizes it. Gradient
    sites are listed as left out only when the plan quantizes some gradient.
    """
    eng, table = _table(model, example_inputs)
    return weigh(table, _resolver(_specs(eng, plan, strict=True, traced=table["site"])))


def weigh(table: pd.DataFrame, resolve: Callable[[str], Any]) -> Coverage:
    """:func:`coverage` of a :func:`sites` table under ``resolve`` (site -> spec), with no forward.

    >>> import torch, torch.nn as nn
    >>> from bitwidth.wrap import QuantSpec
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> weigh(sites(model, torch.zeros(1, 4)), lambda site: QuantSpec("int8")).weight_fraction
    1.0
    """
    table = table.copy()
    table["quantized"] = [bool(q) and getattr(resolve(s), k) is not None
                          for s, k, q in zip(table["site"], table["kind"], table["quantizable"], strict=True)]
    weights = table[table["kind"] == "weight"]
    by_param = weights.assign(key=weights["param"].where(weights["param"] != "", weights["site"]))
    per_param = by_param.groupby("key", sort=False).agg(elements=("elements", "first"), quantized=("quantized", "all"))
    w_total = per_param["elements"].sum()
    w_frac = float(per_param.loc[per_param["quantized"], "elements"].sum() / w_total) if w_total else 1.0
    mac_rows = table[table["kind"].isin(["weight", "activation"])]
    weight = mac_rows["macs"] * mac_rows["inputs"]
    m_total = weight.sum()
    m_frac = float(weight[mac_rows["quantized"]].sum() / m_total) if m_total else 1.0
    kinds = ["weight", "activation"] + (["gradient"] if table.loc[table["kind"] == "gradient", "quantized"].any()
                                        else [])
    out = table[~table["quantized"] & table["kind"].isin(kinds)]
    reasons = out["reason"].where(out["reason"] != "", "not in the plan")
    left = pd.DataFrame({"site": out["site"], "kind": out["kind"], "reason": reasons}).reset_index(drop=True)
    return Coverage(w_frac, m_frac, table, left)
