"""The matrix-multiplying ops a site can sit on: their operands and their MACs.

Each entry says where an op's multiplied operands are (by position or keyword) and how
many multiply-accumulates one call costs, from shapes alone. ``sites.py`` intercepts
these ops while a model runs; nothing here touches modules.

>>> import torch
>>> op = OPS[torch.matmul]
>>> a, b = torch.ones(2, 3), torch.ones(3, 4)
>>> op.name, op.macs([a, b], a @ b)
('matmul', 24)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as TF
from torch import Tensor

__all__ = ["OPS", "RNN_OPS", "Op", "operands", "with_operands"]

Slot = tuple[int, str]  # (position, keyword name) of one multiplied operand


@dataclass(frozen=True)
class Op:
    """A matrix-multiplying op: ``name`` in site names, its operand slots, its MAC count."""

    name: str
    slots: tuple[Slot, ...]
    macs: Callable[[Sequence[Tensor], Any], int]
    varargs: bool = False  # einsum: every positional argument after the first is an operand


def _inner(ts: Sequence[Tensor], out: Tensor) -> int:
    # matmul family: every output element is a dot product over the first operand's last axis.
    return out.numel() * ts[0].shape[-1] if ts[0].dim() else 0


def _linear(ts: Sequence[Tensor], out: Tensor) -> int:
    return out.numel() * ts[1].shape[-1]


def _conv(ts: Sequence[Tensor], out: Tensor) -> int:
    return out.numel() * math.prod(ts[1].shape[1:])


def _conv_t(ts: Sequence[Tensor], out: Tensor) -> int:
    # every input element is multiplied by an (out/groups × kernel) slice of the weight
    return ts[0].numel() * math.prod(ts[1].shape[1:])


def _einsum(ts: Sequence[Tensor], out: Tensor, equation: str = "") -> int:
    sizes: dict[str, int] = {}
    for term, t in zip(equation.replace(" ", "").split("->")[0].split(","), ts, strict=False):
        for letter, n in zip(term.replace("...", ""), t.shape[-len(term.replace("...", "")):], strict=False):
            sizes[letter] = n
    batch = math.prod(ts[0].shape[: ts[0].dim() - len(sizes)]) if "..." in equation else 1
    return batch * math.prod(sizes.values())


def sdpa_macs(q: Tensor, k: Tensor, v: Tensor) -> tuple[int, int]:
    """MACs of ``q @ kᵀ`` and of ``softmax(·) @ v`` in one attention call."""
    rows = math.prod(q.shape[:-1])  # batch × heads × queries
    return rows * k.shape[-2] * q.shape[-1], rows * k.shape[-2] * v.shape[-1]


def _sdpa(ts: Sequence[Tensor], out: Tensor) -> int:
    return sum(sdpa_macs(*ts))


_MM = ((0, "input"), (1, "other"))
_MAT2 = ((0, "input"), (1, "mat2"))
OPS: dict[Callable, Op] = {}
for _f in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__):
    OPS[_f] = Op("matmul", _MM, _inner)
OPS[torch.Tensor.__rmatmul__] = Op("matmul", ((1, "other"), (0, "input")), lambda ts, out: _inner(ts, out))
for _f in (torch.mm, torch.Tensor.mm):
    OPS[_f] = Op("matmul", _MAT2, _inner)
for _f in (torch.bmm, torch.Tensor.bmm):
    OPS[_f] = Op("bmm", _MAT2, _inner)
for _f in (torch.addmm, torch.Tensor.addmm):
    OPS[_f] = Op("addmm", ((1, "mat1"), (2, "mat2")), _inner)
for _f in (torch.baddbmm, torch.Tensor.baddbmm):
    OPS[_f] = Op("baddbmm", ((1, "batch1"), (2, "batch2")), _inner)
OPS[TF.linear] = Op("linear", ((0, "input"), (1, "weight")), _linear)
for _f in (TF.conv1d, TF.conv2d, TF.conv3d):
    OPS[_f] = Op("conv", ((0, "input"), (1, "weight")), _conv)
for _f in (TF.conv_transpose1d, TF.conv_transpose2d, TF.conv_transpose3d):
    OPS[_f] = Op("conv_transpose", ((0, "input"), (1, "weight")), _conv_t)
OPS[TF.embedding] = Op("embedding", ((0, "input"), (1, "weight")), lambda ts, out: 0)
OPS[TF.scaled_dot_product_attention] = Op("sdpa", ((0, "query"), (1, "key"), (2, "value")), _sdpa)
OPS[torch.einsum] = Op("einsum", (), _einsum, varargs=True)

# Fused recurrent kernels: sites.py runs them step by step through ``linear``.
_VF = torch._C._VariableFunctions
RNN_OPS: dict[Callable, str] = {_VF.lstm: "lstm", _VF.gru: "gru", _VF.rnn_tanh: "rnn_tanh", _VF.rnn_relu: "rnn_relu"}


def operands(op: Op, args: tuple, kwargs: dict) -> list[Any]:
    """The op's multiplied operands, in slot order (``None`` where absent)."""
    if op.varargs:
        rest = args[1:]
        return list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else list(rest)
    return [args[i] if i < len(args) else kwargs.get(k) for i, k in op.slots]


def with_operands(op: Op, args: tuple, kwargs: dict, values: Sequence[Any]) -> tuple[tuple, dict]:
    """``args`` and ``kwargs`` with the operands replaced by ``values``."""
    if op.varargs:
        nested = len(args) == 2 and isinstance(args[1], (list, tuple))
        return ((args[0], list(values)) if nested else (args[0], *values)), kwargs
    args, kwargs = list(args), dict(kwargs)
    for (i, k), v in zip(op.slots, values, strict=True):
        if i < len(args):
            args[i] = v
        elif k in kwargs:
            kwargs[k] = v
    return tuple(args), kwargs


def op_macs(op: Op, args: tuple, values: Sequence[Tensor], out: Any) -> int:
    """MACs of one call (0 where the shapes say nothing)."""
    try:
        if op.varargs:
            return int(_einsum(values, out, args[0]))
        return int(op.macs(values, out))
    except (IndexError, TypeError, AttributeError):
        return 0
