"""ONNX graph surgery for :mod:`bitwidth.export_onnx`: placeholder nodes become Q/DQ nodes.

While the model is traced, every quantized (site, kind) emits one placeholder node in the
``bitwidth.export`` domain; :func:`rewrite` replaces each with what it stands for, from
the site's :class:`Site` record (its scale, zero point, integer codes and ONNX type):

- a weight: its codes as an integer (or float8) initializer and a ``DequantizeLinear``
  (``axis`` for per-channel scales), or float16/bfloat16 values and a ``Cast``;
- a group-wise integer weight: its codes as a (channels, reduction) integer initializer
  and a blocked ``DequantizeLinear`` (``axis=1``, ``block_size``; opset 21) with one scale
  (and, asymmetric, one zero point) per block, then ``Reshape``/``Transpose`` back to the
  weight's shape: the layout of :mod:`bitwidth.blocks`. ONNX sizes the scale's blocked
  dimension ``ceil(K / block)``, so a last smaller block is the simulation's own. The scales
  stay in their ``scale_dtype`` (float16 by default) and a ``Cast`` feeds them to the
  ``DequantizeLinear`` as float32: a float16 ``DequantizeLinear`` would round ``code × scale``
  to float16, where the simulation multiplies in float32;
- an activation: ``QuantizeLinear`` → ``DequantizeLinear``, with a ``Clip`` to the
  simulated grid where the stored type is wider, or ``Clip`` → ``Cast`` → ``Cast``.

Initializers nothing reads any more (the float weights) are dropped.

>>> sorted(BITS)[:3]
['bfloat16', 'float16', 'float32']
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .formats import FixedFormat, FloatFormat, Format, GroupIntFormat, IntFormat

__all__ = ["BITS", "DOMAIN", "FLOATS", "SCALE_TYPES", "Site", "rewrite"]

DOMAIN = "bitwidth.export"  # placeholder nodes, replaced before the file is written
# ONNX's float types: (exp, man, largest finite value), narrowest first.
FLOATS = {"float8e4m3fn": (4, 3, 448.0), "float8e5m2": (5, 2, 57344.0), "float16": (5, 10, 65504.0),
          "bfloat16": (8, 7, float(torch.finfo(torch.bfloat16).max))}
BITS = {"int4": 4, "uint4": 4, "int8": 8, "uint8": 8, "int16": 16, "uint16": 16, "float8e4m3fn": 8,
        "float8e5m2": 8, "float16": 16, "bfloat16": 16, "float32": 32}
# a group-wise format's scale_dtype -> the ONNX type its scales are stored in
SCALE_TYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
_TORCH_FLOAT = {"float8e4m3fn": torch.float8_e4m3fn, "float8e5m2": torch.float8_e5m2, "float16": torch.float16,
                "bfloat16": torch.bfloat16}


@dataclass(eq=False)
class Site:
    """One (site, kind) of the export: what its placeholder node becomes.

    The capture pass fills it: ``capture_weight`` with the simulation's scale, zero point
    and codes, ``capture_activation`` with the static scale calibration gave.
    """

    site: str
    kind: str
    base: Format  # the simulated format, rounding to nearest
    dtype: str
    exact: bool
    note: str
    axis: int | None = None
    scale: Tensor | None = None  # int formats: per tensor (0-dim), per channel (1-dim) or per block (2-dim)
    zero_point: Tensor | None = None  # group-wise symmetric: None (no zero point input)
    block: int | None = None  # group-wise weights: the block size along the reduction dimension
    shape: tuple[int, ...] | None = None  # group-wise weights: the weight with its channel axis moved first
    stored: Tensor | None = None  # weights: integer codes, or float values in their float type
    value: Tensor | None = None  # weights: the simulated (dequantized) weight

    def capture_weight(self, w: Tensor, axis: int) -> None:
        w = w.detach()
        if isinstance(self.base, FloatFormat):
            self.value = self.base.quantize(w)
            self.stored = self.value.to(_TORCH_FLOAT[self.dtype])
            self.exact = bool(torch.equal(self.stored.float(), self.value.float()))
            if not self.exact:
                self.note = f"{self.base.name} weights rounded again to {self.dtype}"
            return
        if isinstance(self.base, GroupIntFormat):
            self._capture_blocks(w, axis)
            return
        scale, zp = _int_qparams(self.base, w, axis)
        self.axis = axis if scale.dim() else None
        shape = [-1 if d == axis else 1 for d in range(w.dim())] if scale.dim() else []
        s, z = scale.reshape(shape), zp.reshape(shape)
        lo, hi = _code_range(self.base)
        self.stored = (torch.round(w.float() / s) + z).clamp(lo, hi)  # as the simulation's integer kernel
        self.value = ((self.stored - z) * s).to(w.dtype)
        self.scale, self.zero_point = scale.float(), zp.float()

    def _capture_blocks(self, w: Tensor, axis: int) -> None:
        """Codes, per-block scales and zero points of a group-wise weight, in :mod:`bitwidth.blocks`' layout.

        The scales are the simulation's own (``block_scales``); the codes follow its
        arithmetic, and ``exact`` records whether they dequantize to the simulated weight.
        """
        fmt: GroupIntFormat = self.base  # type: ignore[assignment]
        self.value = fmt.quantize(w, axis=axis)
        moved = w.movedim(axis, 0)
        rows = moved.reshape(moved.shape[0], -1).to(torch.float64 if w.dtype == torch.float64 else torch.float32)
        k, block = rows.shape[1], fmt.block
        scale = fmt.block_scales(w, axis=axis).to(rows.dtype).reshape(rows.shape[0], -1)  # (channels, blocks)
        lo, hi = _code_range(fmt)
        if fmt.symmetric:
            zp = torch.zeros_like(scale)
        else:  # the block's finite minimum (0 included), as the simulation chooses its zero point
            padded = torch.nn.functional.pad(rows, (0, -k % block)).reshape(rows.shape[0], -1, block)
            low = torch.where(torch.isfinite(padded), padded, 0.0).amin(dim=2).clamp(max=0)
            zp = (lo - torch.round(low / scale)).clamp(lo, hi)
        s, z = (t.repeat_interleave(block, dim=1)[:, :k] for t in (scale, zp))
        self.stored = (torch.round(rows / s) + z).clamp(lo, hi)
        deployed = ((self.stored - z) * s).reshape(moved.shape).movedim(0, axis).to(w.dtype)
        if not torch.equal(deployed, self.value):  # the simulation's arithmetic, redone here: say if it ever parts
            self.exact = False
            self.note = "; ".join(filter(None, [self.note, f"{fmt.name} codes do not dequantize to the simulation's"]))
        self.scale, self.zero_point = scale.float(), None if fmt.symmetric else zp.float()
        self.axis, self.block, self.shape = axis, block, tuple(moved.shape)

    def capture_activation(self, qparams: tuple[Tensor, Tensor] | None) -> None:
        if isinstance(self.base, IntFormat):
            if qparams is None:
                raise ValueError(f"{self.site}: activation {self.base.name} has no static range; calibrate first")
            self.scale, self.zero_point = (t.detach().float().reshape(()) for t in qparams)
        elif isinstance(self.base, FixedFormat):
            self.scale, self.zero_point = torch.tensor(2.0**-self.base.frac), torch.tensor(0.0)


def _int_qparams(fmt: Format, w: Tensor, axis: int) -> tuple[Tensor, Tensor]:
    if isinstance(fmt, FixedFormat):
        return torch.tensor(2.0**-fmt.frac), torch.tensor(0.0)
    return fmt.qparams(w, axis)


def _signed(fmt: Format) -> bool:
    return isinstance(fmt, (FixedFormat, GroupIntFormat)) or getattr(fmt, "signed", False)


def _code_range(fmt: Format) -> tuple[int, int]:
    if isinstance(fmt, (FixedFormat, GroupIntFormat)):
        return -(2 ** (fmt.bits - 1)), 2 ** (fmt.bits - 1) - 1
    return fmt.qmin, fmt.qmax


def _tensor(name: str, dtype: str, data: Tensor) -> Any:
    """An ONNX initializer of ``dtype`` holding ``data`` (integer codes or values exact in that type).

    Raw bytes, 4-bit types packed two to a byte (``ml_dtypes``, which ``onnx`` requires).
    """
    import ml_dtypes
    from onnx import numpy_helper

    kinds = {"int4": ml_dtypes.int4, "uint4": ml_dtypes.uint4, "float8e4m3fn": ml_dtypes.float8_e4m3fn,
             "float8e5m2": ml_dtypes.float8_e5m2, "bfloat16": ml_dtypes.bfloat16}
    return numpy_helper.from_array(data.detach().float().numpy().astype(kinds.get(dtype, dtype)), name)


def _scalar(name: str, value: float) -> Any:
    from onnx import numpy_helper

    return numpy_helper.from_array(np.array(value, np.float32), name)


def _site_nodes(rec: Site, x: str, out: str, tag: str, node_tag: str, inits: dict[str, Any]) -> list[Any]:
    """The nodes of one call of a site, reading ``x`` and writing ``out``; its initializers go into ``inits``."""
    from onnx import TensorProto, helper, numpy_helper

    def init(proto: Any) -> str:
        inits.setdefault(proto.name, proto)
        return proto.name

    if rec.dtype in ("float16", "bfloat16"):  # a cast down and up; a weight stored in that type
        to = TensorProto.FLOAT16 if rec.dtype == "float16" else TensorProto.BFLOAT16
        if rec.kind == "weight":
            stored = init(_tensor(f"{tag}.values", rec.dtype, rec.stored.float()))  # type: ignore[union-attr]
            return [helper.make_node("Cast", [stored], [out], f"{node_tag}/cast", to=TensorProto.FLOAT)]
        top = rec.base.max_value  # type: ignore[union-attr]
        lo, hi = init(_scalar(f"{tag}.min", -top)), init(_scalar(f"{tag}.max", top))
        return [helper.make_node("Clip", [x, lo, hi], [f"{node_tag}/clipped"], f"{node_tag}/clip"),
                helper.make_node("Cast", [f"{node_tag}/clipped"], [f"{node_tag}/low"], f"{node_tag}/down", to=to),
                helper.make_node("Cast", [f"{node_tag}/low"], [out], f"{node_tag}/up", to=TensorProto.FLOAT)]
    if rec.block is not None:
        return _block_nodes(rec, out, tag, node_tag, init)
    if rec.scale is None:  # float8: scale 1, the float8 grid itself
        scale = init(_scalar(f"{tag}.scale", 1.0))
        zero = init(_tensor(f"{tag}.zero_point", rec.dtype, torch.zeros(())))
    else:
        scale = init(numpy_helper.from_array(rec.scale.numpy(), f"{tag}.scale"))
        shift = 2 ** (BITS[rec.dtype] - 1) if rec.dtype.startswith("u") and _signed(rec.base) else 0
        zero = init(_tensor(f"{tag}.zero_point", rec.dtype, rec.zero_point + shift))  # type: ignore[operator]
    if rec.kind == "weight":
        codes = init(_tensor(f"{tag}.codes", rec.dtype, rec.stored))  # type: ignore[arg-type]
        axis = {"axis": rec.axis} if rec.axis is not None else {}
        return [helper.make_node("DequantizeLinear", [codes, scale, zero], [out], f"{node_tag}/dq", **axis)]
    clip = _clip(rec)
    nodes = []
    # Clipping to a grid point commutes with rounding: clip before QuantizeLinear where
    # onnxruntime fuses it (integers), after DequantizeLinear for float8 (its Clip-Q
    # fusion cannot read float8 zero points).
    before = clip is not None and not rec.dtype.startswith("float")
    dq_out = f"{node_tag}/dq" if clip is not None and not before else out
    if clip is not None:
        lo, hi = init(_scalar(f"{tag}.min", clip[0])), init(_scalar(f"{tag}.max", clip[1]))
    if before:
        nodes.append(helper.make_node("Clip", [x, lo, hi], [f"{node_tag}/clipped"], f"{node_tag}/clip"))
        x = f"{node_tag}/clipped"
    nodes.append(helper.make_node("QuantizeLinear", [x, scale, zero], [f"{node_tag}/q"], f"{node_tag}/q"))
    nodes.append(helper.make_node("DequantizeLinear", [f"{node_tag}/q", scale, zero], [dq_out], f"{node_tag}/dq"))
    if dq_out != out:
        nodes.append(helper.make_node("Clip", [dq_out, lo, hi], [out], f"{node_tag}/clip"))
    return nodes


def _block_nodes(rec: Site, out: str, tag: str, node_tag: str, init: Callable[[Any], str]) -> list[Any]:
    """A group-wise weight: blocked ``DequantizeLinear`` over (channels, reduction), back to the weight's shape."""
    from onnx import TensorProto, helper, numpy_helper

    assert rec.shape is not None and rec.axis is not None and rec.scale is not None  # filled by the capture
    codes = init(_tensor(f"{tag}.codes", rec.dtype, rec.stored))  # type: ignore[arg-type]
    scale_type = SCALE_TYPES[rec.base.scale_dtype]  # type: ignore[union-attr]
    scale = init(_tensor(f"{tag}.scale", scale_type, rec.scale))
    nodes = []
    if scale_type != "float32":
        nodes.append(helper.make_node("Cast", [scale], [f"{node_tag}/scale"], f"{node_tag}/scale",
                                      to=TensorProto.FLOAT))
        scale = f"{node_tag}/scale"
    inputs = [codes, scale]
    if rec.zero_point is not None:
        inputs.append(init(_tensor(f"{tag}.zero_point", rec.dtype, rec.zero_point)))
    reshape, transpose = len(rec.shape) > 2, rec.axis != 0
    dq_out = f"{node_tag}/dq" if reshape or transpose else out
    nodes.append(helper.make_node("DequantizeLinear", inputs, [dq_out], f"{node_tag}/dq", axis=1,
                                  block_size=rec.block))
    if reshape:
        shape = init(numpy_helper.from_array(np.array(rec.shape, np.int64), f"{tag}.shape"))
        nodes.append(helper.make_node("Reshape", [dq_out, shape], [out if not transpose else f"{node_tag}/rows"],
                                      f"{node_tag}/reshape"))
    if transpose:  # the channel axis back in its place (the capture moved it first)
        perm = [*range(1, rec.axis + 1), 0, *range(rec.axis + 1, len(rec.shape))]
        nodes.append(helper.make_node("Transpose", [f"{node_tag}/rows" if reshape else dq_out], [out],
                                      f"{node_tag}/transpose", perm=perm))
    return nodes


def rewrite(proto: Any, records: Mapping[str, Site], opset: int) -> None:
    """Replace every placeholder node by its Q/DQ nodes and initializers; drop what is unused."""
    from onnx import helper

    graph = proto.graph
    inits: dict[str, Any] = {}
    nodes: list[Any] = []
    calls: Counter[str] = Counter()
    for node in graph.node:
        if node.domain != DOMAIN:
            nodes.append(node)
            continue
        key = next(a.s.decode() for a in node.attribute if a.name == "key")
        rec = records[key]
        tag = f"{rec.site}.{rec.kind}"
        node_tag = tag if calls[key] == 0 else f"{tag}.{calls[key]}"  # a site called again (a loop, a shared module)
        calls[key] += 1
        nodes += _site_nodes(rec, node.input[0], node.output[0], tag, node_tag, inits)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend([*kept, *inits.values()])
    opsets = [o for o in proto.opset_import if o.domain not in (DOMAIN, "")]
    del proto.opset_import[:]
    proto.opset_import.extend([helper.make_opsetid("", opset), *opsets])


def _clip(rec: Site) -> tuple[float, float] | None:
    """The float range to clip to before quantizing, where the stored type is wider than the grid."""
    if isinstance(rec.base, FloatFormat):
        top = rec.base.max_value
        return (-top, top) if top < FLOATS[rec.dtype][2] else None
    lo, hi = _code_range(rec.base)
    width = int(rec.dtype.removeprefix("u").removeprefix("int"))
    if rec.base.bits == width:
        return None
    s, z = float(rec.scale), float(rec.zero_point)  # type: ignore[arg-type]
    return (lo - z) * s, (hi - z) * s
