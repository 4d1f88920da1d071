"""Cost model: weight memory and bit operations of a plan, from per-site sizes.

Per site we measure, from :func:`bitwidth.coverage.sites` on one example batch of one sample:

- ``params``: the weight's element count (biases stay full precision and are not counted);
- ``macs``: multiply-accumulates of one forward pass.

A plan then costs ``memory_bits = Σ params × weight bits`` and
``bops = Σ macs × weight bits × activation bits`` (the figure AIMET and HAWQ report;
at an op site between two activations, ``a @ b`` or attention, both operands take the
site's activation bits),
plus, for training, ``train_bops``: the forward BOPs and the two backward products
(gradient × weight and gradient × activation), ``Σ macs × (w·a + g·w + g·a)``.
A kind at full precision counts 32 bits. A format counts its ``storage_bits``: its element
width plus the scales a block format stores per value (``mxfp4`` 4.25, ``int4_g128``
4.125, ``nvfp4`` 4.5), in memory and in BOPs alike (the scale multiplies each block's
partial sum: charging them per value keeps one number per format). Totals are rounded to
whole bits.

>>> import torch
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 3))
>>> costs = CostModel.measure(model, torch.zeros(1, 4))
>>> costs.layers["0"]
LayerCost(params=12, macs=12, weightless=False)
>>> costs.of({"0": QuantSpec(weight="int4", activation="int8")})["bops"]
384
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from .wrap import QuantSpec, as_spec

__all__ = ["COST_MEASURES", "FULL_BITS", "CostModel", "LayerCost"]

FULL_BITS = 32
COST_MEASURES = ("memory_bits", "bops", "train_bops")


@dataclass(frozen=True)
class LayerCost:
    """Size of one site: weight elements and multiply-accumulates per sample.

    ``weightless``: an op site whose operands are all activations (``q @ kᵀ``).
    """

    params: int
    macs: int
    weightless: bool = False


class CostModel:
    """Per-site sizes and the cost of any plan over them."""

    def __init__(self, layers: Mapping[str, LayerCost]) -> None:
        self.layers = dict(layers)

    @classmethod
    def from_sites(cls, table: Any) -> CostModel:
        """From a :func:`bitwidth.coverage.sites` table (one sample's MACs)."""
        found: dict[str, LayerCost] = {}
        for site, rows in table.groupby("site", sort=False):
            kinds = dict(zip(rows["kind"], zip(rows["elements"], rows["macs"], strict=True), strict=True))
            params = int(kinds["weight"][0]) if "weight" in kinds else 0
            macs = int((kinds.get("activation") or kinds.get("weight") or (0, 0))[1])
            found[str(site)] = LayerCost(params, macs, weightless="weight" not in kinds)
        return cls(found)

    @classmethod
    def measure(cls, model: nn.Module, example_input: Any) -> CostModel:
        """Measure ``params`` and ``macs`` of every site on ``example_input`` (batch 1)."""
        from .coverage import sites

        return cls.from_sites(sites(model, example_input))

    def of(self, plan: Mapping[str, Any]) -> dict[str, int]:
        """``memory_bits``, ``bops`` and ``train_bops`` of ``plan`` (exact layer names).

        >>> CostModel({"fc": LayerCost(10, 10)}).of({})
        {'memory_bits': 320, 'bops': 10240, 'train_bops': 30720}
        >>> CostModel({"fc": LayerCost(64, 64)}).of({"fc": QuantSpec(weight="mxfp4", activation="mxfp8_e4m3")})
        {'memory_bits': 272, 'bops': 2244, 'train_bops': 27844}
        """
        unknown = set(plan) - set(self.layers)
        if unknown:
            raise ValueError(f"plan names layers the cost model does not know: {sorted(unknown)}; "
                             f"known: {sorted(self.layers)}")
        memory = bops = train = 0
        for name, size in self.layers.items():
            spec = as_spec(plan[name]) if name in plan else QuantSpec()
            w, a, g = (getattr(spec, k).storage_bits if getattr(spec, k) is not None else FULL_BITS
                       for k in ("weight", "activation", "gradient"))
            w = a if size.weightless else w
            memory += size.params * w
            bops += size.macs * w * a
            train += size.macs * (w * a + g * w + g * a)
        return {"memory_bits": round(memory), "bops": round(bops), "train_bops": round(train)}

    def relative(self, plan: Mapping[str, Any], measures: tuple[str, ...] = ("memory_bits", "bops")) -> float:
        """Sum over ``measures`` of the plan's cost as a fraction of full precision.

        One number to rank plans by, used by the joint step.

        >>> CostModel({"fc": LayerCost(10, 10)}).relative({"fc": QuantSpec(weight="int8")})
        0.5
        """
        bad = [m for m in measures if m not in COST_MEASURES]
        if bad:
            raise ValueError(f"unknown cost measure(s) {bad}; allowed: {COST_MEASURES}")
        cost, full = self.of(plan), self.of({})
        return sum(cost[m] / full[m] for m in measures if full[m])
