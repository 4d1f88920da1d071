"""Cost model: params and MACs measured by hooks, against hand counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bitwidth.cost import CostModel, LayerCost
from bitwidth.wrap import QuantSpec, wrap


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, groups=2)
        self.up = nn.ConvTranspose2d(4, 3, 2, stride=2)
        self.emb = nn.Embedding(10, 5)
        self.fc = nn.Linear(3 * 8 * 8, 6)

    def forward(self, x):
        self.emb(torch.zeros(1, dtype=torch.long))
        return self.fc(self.up(self.conv(x)).flatten(1))


def test_params_and_macs_match_hand_counts():
    model = Net()
    costs = CostModel.measure(model, torch.zeros(1, 2, 4, 4))
    assert costs.layers == {
        "conv": LayerCost(4 * 1 * 9, 4 * 4 * 4 * (1 * 9)),  # output elements x (in/groups x kernel)
        "up": LayerCost(4 * 3 * 4, 4 * 4 * 4 * (3 * 4)),  # input elements x (out x kernel)
        "emb": LayerCost(50, 0),
        "fc": LayerCost(6 * 192, 6 * 192),
    }
    # The same on a wrapped model, whose layers have other classes.
    assert CostModel.measure(wrap(Net()), torch.zeros(1, 2, 4, 4)).layers == costs.layers


def test_plan_costs_and_relative_cost():
    costs = CostModel({"a": LayerCost(100, 1000), "b": LayerCost(10, 500)})
    plan = {"a": QuantSpec(weight="int4", activation="int8"), "b": QuantSpec(gradient="int8")}
    got = costs.of(plan)
    assert got["memory_bits"] == 100 * 4 + 10 * 32
    assert got["bops"] == 1000 * 4 * 8 + 500 * 32 * 32
    assert got["train_bops"] == 1000 * (4 * 8 + 32 * 4 + 32 * 8) + 500 * (32 * 32 + 8 * 32 + 8 * 32)
    full = costs.of({})
    assert costs.relative(plan, ("bops",)) == pytest.approx(got["bops"] / full["bops"])
    with pytest.raises(ValueError, match="allowed"):
        costs.relative(plan, ("latency",))
    with pytest.raises(ValueError, match="known"):
        costs.of({"c": QuantSpec(weight="int4")})
