"""Cost model: weight memory and bit operations of a plan, from per-layer sizes.

Per layer we measure, with forward hooks on one example batch of one sample:

- ``params``: the weight's element count (biases stay full precision and are not counted);
- ``macs``: multiply-accumulates of one forward pass.

A plan then costs ``memory_bits = Σ params × weight bits`` and
``bops = Σ macs × weight bits × activation bits`` (the figure AIMET and HAWQ report),
plus, for training, ``train_bops``: the forward BOPs and the two backward products
(gradient × weight and gradient × activation), ``Σ macs × (w·a + g·w + g·a)``.
A kind at full precision counts 32 bits.

>>> import torch
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 3))
>>> costs = CostModel.measure(model, torch.zeros(1, 4))
>>> costs.layers["0"]
LayerCost(params=12, macs=12)
>>> costs.of({"0": QuantSpec(weight="int4", activation="int8")})["bops"]
384
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .wrap import QuantSpec, as_spec, covered_layers

__all__ = ["COST_MEASURES", "FULL_BITS", "CostModel", "LayerCost"]

FULL_BITS = 32
COST_MEASURES = ("memory_bits", "bops", "train_bops")


@dataclass(frozen=True)
class LayerCost:
    """Size of one layer: weight elements and multiply-accumulates per sample."""

    params: int
    macs: int


def _macs(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> int:
    w = module.weight
    if isinstance(module, nn.Embedding):
        return 0  # a table lookup: no multiplies
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        # Every input element is multiplied by a (out/groups × kernel) slice of the weight.
        return inputs[0].numel() * w.shape[1] * math.prod(w.shape[2:])
    # Linear and Conv: every output element is a dot product over one weight row.
    return output.numel() * math.prod(w.shape[1:])


class CostModel:
    """Per-layer sizes and the cost of any plan over them."""

    def __init__(self, layers: Mapping[str, LayerCost]) -> None:
        self.layers = dict(layers)

    @classmethod
    @torch.no_grad()
    def measure(cls, model: nn.Module, example_input: Any) -> CostModel:
        """Measure ``params`` and ``macs`` of every covered layer on ``example_input`` (batch 1)."""
        found: dict[str, LayerCost] = {}
        hooks = []
        for name, module in covered_layers(model).items():

            def hook(mod: nn.Module, inputs: tuple[Any, ...], output: Any, name: str = name) -> None:
                macs = _macs(mod, inputs, output)
                prev = found.get(name)
                # A layer called twice (weight sharing) does its MACs twice.
                found[name] = LayerCost(mod.weight.numel(), macs + (prev.macs if prev else 0))

            hooks.append(module.register_forward_hook(hook))
        was_training = model.training
        model.eval()
        try:
            if isinstance(example_input, tuple):
                model(*example_input)
            else:
                model(example_input)
        finally:
            model.train(was_training)
            for h in hooks:
                h.remove()
        for name, module in covered_layers(model).items():
            found.setdefault(name, LayerCost(module.weight.numel(), 0))  # never called
        return cls(found)

    def of(self, plan: Mapping[str, Any]) -> dict[str, int]:
        """``memory_bits``, ``bops`` and ``train_bops`` of ``plan`` (exact layer names).

        >>> CostModel({"fc": LayerCost(10, 10)}).of({})
        {'memory_bits': 320, 'bops': 10240, 'train_bops': 30720}
        """
        unknown = set(plan) - set(self.layers)
        if unknown:
            raise ValueError(f"plan names layers the cost model does not know: {sorted(unknown)}; "
                             f"known: {sorted(self.layers)}")
        memory = bops = train = 0
        for name, size in self.layers.items():
            spec = as_spec(plan[name]) if name in plan else QuantSpec()
            w, a, g = (getattr(spec, k).bits if getattr(spec, k) is not None else FULL_BITS
                       for k in ("weight", "activation", "gradient"))
            memory += size.params * w
            bops += size.macs * w * a
            train += size.macs * (w * a + g * w + g * a)
        return {"memory_bits": memory, "bops": bops, "train_bops": train}

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
