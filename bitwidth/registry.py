"""Which parameters of a module are weights, and along which axis its output channels lie.

Every floating-point parameter of two or more dimensions is a weight with its output
channel on axis 0, unless the module's type (or a base class of it) is registered with
rules of its own. Built-ins use the same path as user registrations:
``ConvTranspose*`` weights are ``(in, out, …)`` (axis 1), Hugging Face ``Conv1D``
weights are ``(in, out)`` (axis 1), ``MultiheadAttention`` names its projections, and
RNNs name their ``weight_ih_l*`` / ``weight_hh_l*`` / ``weight_hr_l*`` matrices.

>>> import torch.nn as nn
>>> weight_axes(nn.ConvTranspose2d(4, 8, 3))
{'weight': 1}
>>> class Gate(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.kernel = nn.Parameter(torch.zeros(3, 5))  # (in, out)
...         self.scale = nn.Parameter(torch.ones(5))
>>> register_module(Gate, {"kernel": 1, "scale": 0})
>>> weight_axes(Gate())
{'kernel': 1, 'scale': 0}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

__all__ = ["register_module", "registered", "weight_axes"]

WeightRule = Mapping[str, int] | Callable[[nn.Module], Mapping[str, int]]

# Keys are types, or "module.QualName" strings for classes of optional packages
# (transformers) that must not be imported to be recognised.
_RULES: dict[type | str, WeightRule] = {}


def register_module(cls: type[nn.Module] | str, weights: WeightRule) -> None:
    """Teach ``bitwidth`` a module type: its weight parameters and their output-channel axes.

    ``weights`` maps parameter names to the axis that holds output channels (what
    per-channel formats scale along), or is a function of the module returning that
    mapping. Subclasses inherit the rule; a later registration of the same type
    replaces the earlier one. ``cls`` may be a ``"package.module.ClassName"`` string for
    a class that should not be imported just to register it.

    >>> register_module(int, {"weight": 0})
    Traceback (most recent call last):
    ...
    ValueError: register_module needs an nn.Module subclass or a 'package.module.Class' string, got <class 'int'>
    """
    if isinstance(cls, str):
        if "." not in cls:
            raise ValueError(f"a class given by name must be 'package.module.Class', got {cls!r}")
    elif not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"register_module needs an nn.Module subclass or a 'package.module.Class' string, got {cls!r}")
    if isinstance(weights, Mapping):
        bad = {k: v for k, v in weights.items() if not isinstance(k, str) or not isinstance(v, int)}
        if bad:
            raise ValueError(f"weights maps parameter names to channel axes (int), got {bad!r}")
        weights = dict(weights)
    elif not callable(weights):
        raise ValueError(f"weights must be a {{name: axis}} mapping or a function of the module, got {weights!r}")
    _RULES[cls] = weights


def registered(module: nn.Module) -> WeightRule | None:
    """The rule of the nearest registered class in ``module``'s MRO, or ``None``."""
    for c in type(module).__mro__:
        rule = _RULES.get(c)
        if rule is None:
            rule = _RULES.get(f"{c.__module__}.{c.__qualname__}")
        if rule is not None:
            return rule
    return None


def weight_axes(module: nn.Module) -> dict[str, int]:
    """The module's own weight parameters (not its children's) with their channel axes.

    Without a registered rule: every floating-point parameter of two or more dimensions,
    axis 0. Biases and norm parameters (one dimension) stay full precision.
    """
    rule = registered(module)
    params = module._parameters  # own parameters only, None entries included
    if rule is None:
        return {n: 0 for n, p in params.items() if p is not None and p.is_floating_point() and p.dim() >= 2}
    axes = rule(module) if callable(rule) else rule
    unknown = [n for n in axes if n not in params]
    if unknown:
        raise ValueError(f"the rule for {type(module).__name__} names parameters it lacks: {unknown}; "
                         f"its parameters: {list(params)}")
    return {n: a for n, a in axes.items() if params[n] is not None}


def _rnn_weights(m: nn.Module) -> dict[str, int]:
    return {n: 0 for n in m._flat_weights_names if n.startswith("weight_")}  # type: ignore[union-attr]


def _mha_weights(m: nn.Module) -> dict[str, int]:
    names = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
    return {n: 0 for n in names if getattr(m, n, None) is not None}


for _cls in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.EmbeddingBag, nn.Bilinear):
    register_module(_cls, {"weight": 0})
for _cls in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register_module(_cls, {"weight": 1})  # (in, out/groups, *kernel)
register_module(nn.MultiheadAttention, _mha_weights)
register_module(nn.RNNBase, _rnn_weights)
register_module("transformers.pytorch_utils.Conv1D", {"weight": 1})  # (in, out): x @ W
_ = torch  # the doctest above uses it
