"""A plan as an ONNX model: every quantized site a QuantizeLinear/DequantizeLinear pair.

``export_onnx(model, plan, example_inputs, path)`` wraps a copy of ``model`` with the plan,
calibrates static activation ranges (as a post-training trial does), and exports it with
``torch.onnx.export``. Each quantized site emits its own node while the model is traced,
so every site the simulation quantizes (weights, the inputs of every matrix-multiplying
call, attention's q/k/v) is a site of the graph, with the scale and zero point the
simulation used. The export then writes:

- weights as integer (or float8/float16) initializers feeding a ``DequantizeLinear``
  (per tensor, or per channel with ``axis``), never as floats;
- activations as ``QuantizeLinear`` → ``DequantizeLinear`` with static scales;
- fixed point as integers with the power-of-two scale ``2**-frac``;
- ``e4m3`` / ``e5m2`` as ``float8e4m3fn`` / ``float8e5m2``, ``fp16`` / ``bf16`` as casts.

Widths ONNX cannot hold (opset 21: 4, 8 and 16-bit integers) are stored at the nearest
wider one, **keeping the simulated grid**: an ``int3`` weight is int4 codes in -4..3, an
``int5`` activation is clipped to the int5 range before an int8 ``QuantizeLinear``
(Brevitas' QCDQ), so the deployed numbers are the simulated ones. Float formats without
an ONNX type run in the nearest wider one, which changes their grid: the summary marks
those sites ``exact=False``, as it does rounding ``stochastic`` (deployed to nearest) and
integers wider than 16 bits (left in float32). Gradient formats belong to training and
are not part of an inference graph.

The export uses the TorchScript-based path of ``torch.onnx.export`` (``dynamo=False``): it
runs the model's Python as is, hooks and site interception included, while
``torch.export`` cannot trace the site machinery's weight cache.

>>> import torch, tempfile, os
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 3))
>>> path = os.path.join(tempfile.mkdtemp(), "m.onnx")
>>> s = export_onnx(model, {"0": "int4"}, torch.randn(2, 4), path)  # doctest: +SKIP
>>> s.sites[["site", "kind", "simulated", "deployed", "exact"]].values.tolist()  # doctest: +SKIP
[['0', 'weight', 'int4', 'int4', True], ['0', 'activation', 'int4', 'int4', True]]
"""

from __future__ import annotations

import copy
import dataclasses
import os
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from .formats import FixedFormat, FloatFormat, Format, IntFormat
from .sites import engine_of
from .wrap import Plan, QuantSpec, calibrate, resolve_plan, set_plan, wrap

__all__ = ["DEFAULT_OPSET", "SITE_COLUMNS", "ExportSummary", "deploy_type", "export_onnx", "onnx_inputs", "require"]

DEFAULT_OPSET = 21  # the first with int4/uint4 (and int16) QuantizeLinear
_DOMAIN = "bitwidth.export"  # placeholder nodes, replaced before the file is written
# ONNX's float types: (exp, man, largest finite value), narrowest first.
_FLOATS = {"float8e4m3fn": (4, 3, 448.0), "float8e5m2": (5, 2, 57344.0), "float16": (5, 10, 65504.0),
           "bfloat16": (8, 7, float(torch.finfo(torch.bfloat16).max))}
_BITS = {"int4": 4, "uint4": 4, "int8": 8, "uint8": 8, "int16": 16, "uint16": 16, "float8e4m3fn": 8,
         "float8e5m2": 8, "float16": 16, "bfloat16": 16, "float32": 32}
SITE_COLUMNS = ["site", "kind", "simulated", "deployed", "granularity", "exact", "note", "stored_bits"]
_TORCH_FLOAT = {"float8e4m3fn": torch.float8_e4m3fn, "float8e5m2": torch.float8_e5m2, "float16": torch.float16,
                "bfloat16": torch.bfloat16}


def require(*modules: str, extra: str = "export") -> None:
    """Raise ``ValueError`` naming the pip extra when an optional package is missing.

    >>> require("os")
    """
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"this needs {', '.join(missing)}: pip install 'bitwidth[{extra}]'")


def deploy_type(fmt: Format, kind: str = "weight") -> tuple[str, bool]:
    """The ONNX type a ``kind``'s format is stored in, and whether its simulated grid survives unchanged.

    Integers and fixed point go to the narrowest of (u)int4/8/16 holding them, grid kept.
    Activations take unsigned types of 8 bits at least, a signed grid shifted by the zero
    point (the same numbers): onnxruntime has no 4-bit activation kernels, its Relu/Clip
    fusions misread 4-bit zero points, and its int8-to-uint8 activation rewrite breaks
    opset-21 graphs. Floats go to the narrowest ONNX float with as many exponent and
    mantissa bits, exact only when the two share exponent and mantissa widths;
    ``float32`` means not quantized.

    >>> deploy_type(IntFormat(3)), deploy_type(IntFormat(3), "activation"), deploy_type(FixedFormat(12, 6))
    (('int4', True), ('uint8', True), ('int16', True))
    >>> deploy_type(FloatFormat(2, 3, max_value=7.5))
    ('float8e4m3fn', False)
    """
    if isinstance(fmt, (IntFormat, FixedFormat)):
        signed = getattr(fmt, "signed", True)
        widths = (4, 8, 16) if kind == "weight" else (8, 16)
        width = next((w for w in widths if fmt.bits <= w), None)
        if width is None:
            return "float32", False
        return f"{'' if signed and kind == 'weight' else 'u'}int{width}", fmt.rounding == "nearest"
    if not isinstance(fmt, FloatFormat):  # a format this export does not know
        return "float32", False
    for name, (exp, man, top) in _FLOATS.items():
        if fmt.exp <= exp and fmt.man <= man and fmt.max_value <= top:
            same = (fmt.exp, fmt.man) == (exp, man) and fmt.subnormals
            return name, same and fmt.rounding == "nearest"
    return "float32", False


def _note(fmt: Format, dtype: str, exact: bool, kind: str) -> str:
    if dtype == "float32":
        return f"no ONNX type holds {fmt.name}: left in float32"
    notes = []
    if isinstance(fmt, (IntFormat, FixedFormat)) and fmt.bits not in (4, 8, 16):
        notes.append(f"{fmt.name} grid kept in {dtype} storage")
    if isinstance(fmt, FloatFormat) and not exact and fmt.rounding == "nearest":
        notes.append(f"{fmt.name} runs as {dtype}" + (": values stored exactly" if kind == "weight" else
                                                     ": not the simulated grid"))
    if fmt.rounding != "nearest":
        notes.append("stochastic rounding deployed as round-to-nearest")
    return "; ".join(notes)


@dataclass(eq=False)
class _Site:
    """One (site, kind) of the export: what the placeholder node becomes."""

    site: str
    kind: str
    base: Format  # the simulated format, rounding to nearest
    dtype: str
    exact: bool
    note: str
    axis: int | None = None
    scale: Tensor | None = None  # int formats: per tensor (0-dim) or per channel (1-dim)
    zero_point: Tensor | None = None
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
        scale, zp = _int_qparams(self.base, w, axis)
        self.axis = axis if scale.dim() else None
        shape = [-1 if d == axis else 1 for d in range(w.dim())] if scale.dim() else []
        s, z = scale.reshape(shape), zp.reshape(shape)
        lo, hi = _code_range(self.base)
        self.stored = (torch.round(w.float() / s) + z).clamp(lo, hi)  # as the simulation's integer kernel
        self.value = ((self.stored - z) * s).to(w.dtype)
        self.scale, self.zero_point = scale.float(), zp.float()

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
    return isinstance(fmt, FixedFormat) or getattr(fmt, "signed", False)


def _code_range(fmt: Format) -> tuple[int, int]:
    if isinstance(fmt, FixedFormat):
        return -(2 ** (fmt.bits - 1)), 2 ** (fmt.bits - 1) - 1
    return fmt.qmin, fmt.qmax


class _Emit(torch.autograd.Function):
    """The simulated values in forward; a placeholder node keyed by the site when traced."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, fmt: Any) -> Tensor:  # type: ignore[override]
        rec: _Site = fmt.site
        if rec.kind == "weight":
            return rec.value.clone()  # type: ignore[union-attr]
        state = torch._C._get_tracing_state()
        torch._C._set_tracing_state(None)  # the node stands for this computation: keep it out of the trace
        try:
            if isinstance(rec.base, IntFormat):
                return rec.base.quantize(x, qparams=(rec.scale, rec.zero_point))
            return rec.base.quantize(x)
        finally:
            torch._C._set_tracing_state(state)

    @staticmethod
    def symbolic(g: Any, x: Any, fmt: Any) -> Any:
        out = g.op(f"{_DOMAIN}::{'Weight' if fmt.site.kind == 'weight' else 'Activation'}", x, key_s=fmt.key)
        out.setType(x.type())
        return out


class _Emitting:
    """A format that hands the site engine its (site, kind) record's values: capture, then emit."""

    site: _Site
    capturing: dict

    def quantize(self, x: Tensor, *, axis: int | None = None, qparams: Any = None, **_: Any) -> Tensor:
        rec = self.site
        if self.capturing["on"]:
            if rec.kind == "weight":
                rec.capture_weight(x, axis if axis is not None else 0)
            elif rec.scale is None:
                rec.capture_activation(qparams)
        return _Emit.apply(x, self)


def _emitting(fmt: Format, rec: _Site, capturing: dict) -> Format:
    cls = {IntFormat: _EInt, FixedFormat: _EFixed, FloatFormat: _EFloat}[type(fmt)]
    values = {f.name: getattr(fmt, f.name) for f in dataclasses.fields(fmt)}
    return cls(**values, key=f"{rec.site}|{rec.kind}", site=rec, capturing=capturing)


def _extra() -> Any:
    return field(default=None, compare=False, hash=False, repr=False)


@dataclass(frozen=True)
class _EInt(_Emitting, IntFormat):
    key: str = ""
    site: Any = _extra()
    capturing: Any = _extra()


@dataclass(frozen=True)
class _EFixed(_Emitting, FixedFormat):
    key: str = ""
    site: Any = _extra()
    capturing: Any = _extra()


@dataclass(frozen=True)
class _EFloat(_Emitting, FloatFormat):
    key: str = ""
    site: Any = _extra()
    capturing: Any = _extra()


@dataclass
class ExportSummary:
    """What an export wrote: the file, and per (site, kind) the simulated and the deployed format.

    ``sites``: ``site, kind, simulated, deployed, granularity, exact, note, stored_bits``;
    ``exact`` is False where the deployed numbers can differ from the simulated ones
    (``note`` says why); ``stored_bits`` is the deployed type's width. ``max_abs_diff``:
    the largest difference between onnxruntime's output and the simulation's on the
    example input (NaN without onnxruntime).
    """

    path: Path
    sites: pd.DataFrame
    file_bytes: int
    opset: int
    max_abs_diff: float = float("nan")

    @property
    def changed(self) -> pd.DataFrame:
        """Sites stored wider than simulated or not exact: what the export had to change."""
        widened = self.sites["note"].astype(str).str.len() > 0
        return self.sites[widened | ~self.sites["exact"].astype(bool)]

    def __str__(self) -> str:
        lines = [f"{self.path}: {self.file_bytes / 1024:.1f} KiB, opset {self.opset}, "
                 f"{len(self.sites)} quantized (site, kind); onnxruntime vs simulation: max |diff| "
                 f"{self.max_abs_diff:.3g}"]
        changed = self.changed
        if changed.empty:
            lines.append("every site deployed at its simulated format")
        for r in changed.itertuples():
            lines.append(f"  {r.site} {r.kind}: {r.simulated} -> {r.deployed}: {r.note or 'not exact'}")
        return "\n".join(lines)


def onnx_inputs(example_inputs: Any) -> tuple[Tensor, ...]:
    """``example_inputs`` as the tuple of tensors an exported model takes.

    >>> len(onnx_inputs(torch.zeros(1, 2))), len(onnx_inputs((torch.zeros(1), torch.zeros(2))))
    (1, 2)
    """
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    if not args or not all(isinstance(a, Tensor) for a in args):
        raise ValueError("example_inputs must be a tensor or a tuple of tensors (the model's positional inputs)")
    return args


def _export_plan(model: nn.Module, plan: Plan, capturing: dict) -> tuple[dict[str, QuantSpec], list[dict]]:
    """The plan with every quantized (site, kind) given its own emitting format; rows for the summary."""
    specs, rows = {}, []
    for site, spec in resolve_plan(model, plan).items():
        formats = {}
        for kind in ("weight", "activation", "gradient"):
            fmt = getattr(spec, kind)
            if fmt is None:
                continue
            if kind == "gradient":
                rows.append({"site": site, "kind": kind, "simulated": fmt.name, "deployed": "-", "granularity": "",
                             "exact": True, "note": "training only: not part of an inference graph",
                             "stored_bits": 0})
                continue
            dtype, exact = deploy_type(fmt, kind)
            gran = getattr(fmt, "granularity", "tensor") if kind == "weight" else "tensor"
            rows.append({"site": site, "kind": kind, "simulated": fmt.name, "deployed": dtype, "granularity": gran,
                         "exact": exact, "note": _note(fmt, dtype, exact, kind), "stored_bits": _BITS[dtype]})
            if dtype != "float32":
                base = dataclasses.replace(fmt, rounding="nearest")
                formats[kind] = _emitting(base, _Site(site, kind, base, dtype, exact, rows[-1]["note"]), capturing)
        if formats:
            specs[site] = QuantSpec(**formats)
    return specs, rows


def export_onnx(
    model: nn.Module,
    plan: Plan,
    example_inputs: Any,
    path: str | os.PathLike[str],
    *,
    calib: Iterable[Any] | None = None,
    opset: int = DEFAULT_OPSET,
) -> ExportSummary:
    """Export ``model`` under ``plan`` to ONNX Q/DQ at ``path``; the model itself is left untouched.

    ``example_inputs``: a tensor or a tuple of tensors (batch first; the batch size is
    dynamic in the file). ``calib``: batches for :func:`bitwidth.calibrate`, whose static
    activation ranges the file stores (default: ``example_inputs`` alone). Needs
    ``pip install 'bitwidth[export]'``.
    """
    require("onnx", "onnxscript")
    if not isinstance(opset, int) or opset < DEFAULT_OPSET:
        raise ValueError(f"opset must be an integer >= {DEFAULT_OPSET} (int4 QuantizeLinear), got {opset!r}")
    args = onnx_inputs(example_inputs)
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"the ONNX file's name must end in .onnx, got {str(path)!r}")
    m = copy.deepcopy(model).eval().requires_grad_(False)
    wrap(m, plan)
    calibrate(m, list(calib) if calib is not None else [args[0] if len(args) == 1 else args],
              forward=None if len(args) == 1 else (lambda mod, b: mod(*b)))
    capturing = {"on": True}
    specs, rows = _export_plan(m, plan, capturing)
    set_plan(m, specs)
    with torch.no_grad():
        expected = m(*args)  # the capture pass: every site records its scale, zero point and codes
    capturing["on"] = False
    records = {f.key: f.site for s in specs.values() for f in (s.weight, s.activation) if f is not None}
    eng = engine_of(m)

    def uncache(*_: Any) -> None:  # a cached quantized weight would be traced as a constant
        for st in eng.states.values():
            st.cache = None

    hook = m.register_forward_pre_hook(uncache, prepend=True)
    try:
        proto = _trace(m, args, opset)
    finally:
        hook.remove()
    _rewrite(proto, records, opset)
    path.parent.mkdir(parents=True, exist_ok=True)
    import onnx

    onnx.checker.check_model(proto)
    onnx.save(proto, path)
    table = pd.DataFrame(rows, columns=SITE_COLUMNS)
    for rec in records.values():  # a float weight's exactness is known once its values are
        hit = (table["site"] == rec.site) & (table["kind"] == rec.kind)
        table.loc[hit, "exact"], table.loc[hit, "note"] = rec.exact, rec.note
    summary = ExportSummary(path, table, path.stat().st_size, opset)
    summary.max_abs_diff = _check_runtime(path, args, expected)
    return summary


def _trace(model: nn.Module, args: tuple[Tensor, ...], opset: int) -> Any:
    import io

    import onnx

    names = ["input"] if len(args) == 1 else [f"input_{i}" for i in range(len(args))]
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's and the deprecation warnings say nothing to a user
        torch.onnx.export(model, args, buf, dynamo=False, opset_version=opset, input_names=names,
                          output_names=["output"], dynamic_axes={n: {0: "batch"} for n in [*names, "output"]},
                          custom_opsets={_DOMAIN: 1}, do_constant_folding=True)
    return onnx.load_from_string(buf.getvalue())


def _tensor(name: str, dtype: str, data: Tensor) -> Any:
    """An ONNX initializer of ``dtype`` holding ``data`` (integer codes or values in that type)."""
    from onnx import TensorProto, helper, numpy_helper

    if dtype in ("int4", "uint4"):
        kind = TensorProto.INT4 if dtype == "int4" else TensorProto.UINT4
        return helper.make_tensor(name, kind, list(data.shape), data.to(torch.int64).flatten().tolist())
    if dtype.startswith(("int", "uint")):
        return numpy_helper.from_array(data.numpy().astype(dtype), name)
    if dtype == "float16":
        return numpy_helper.from_array(data.to(torch.float16).numpy(), name)
    kind = {"float8e4m3fn": TensorProto.FLOAT8E4M3FN, "float8e5m2": TensorProto.FLOAT8E5M2,
            "bfloat16": TensorProto.BFLOAT16}[dtype]
    raw = data.to(_TORCH_FLOAT[dtype]).contiguous().view(torch.uint8 if dtype != "bfloat16" else torch.int16)
    return helper.make_tensor(name, kind, list(data.shape), raw.numpy().tobytes(), raw=True)


def _scalar(name: str, value: float) -> Any:
    from onnx import numpy_helper

    return numpy_helper.from_array(np.array(value, np.float32), name)


def _site_nodes(rec: _Site, x: str, out: str, tag: str, node_tag: str, inits: dict[str, Any]) -> list[Any]:
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
    if rec.scale is None:  # float8: scale 1, the float8 grid itself
        scale = init(_scalar(f"{tag}.scale", 1.0))
        zero = init(_tensor(f"{tag}.zero_point", rec.dtype, torch.zeros(())))
    else:
        scale = init(numpy_helper.from_array(rec.scale.numpy(), f"{tag}.scale"))
        shift = 2 ** (_BITS[rec.dtype] - 1) if rec.dtype.startswith("u") and _signed(rec.base) else 0
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


def _rewrite(proto: Any, records: Mapping[str, _Site], opset: int) -> None:
    """Replace every placeholder node by its Q/DQ nodes and initializers; drop what is unused."""
    from onnx import helper

    graph = proto.graph
    inits: dict[str, Any] = {}
    nodes: list[Any] = []
    calls: Counter[str] = Counter()
    for node in graph.node:
        if node.domain != _DOMAIN:
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
    opsets = [o for o in proto.opset_import if o.domain not in (_DOMAIN, "")]
    del proto.opset_import[:]
    proto.opset_import.extend([helper.make_opsetid("", opset), *opsets])


def _clip(rec: _Site) -> tuple[float, float] | None:
    """The float range to clip to before quantizing, where the stored type is wider than the grid."""
    if isinstance(rec.base, FloatFormat):
        top = rec.base.max_value
        return (-top, top) if top < _FLOATS[rec.dtype][2] else None
    lo, hi = _code_range(rec.base)
    width = int(rec.dtype.removeprefix("u").removeprefix("int"))
    if rec.base.bits == width:
        return None
    s, z = float(rec.scale), float(rec.zero_point)  # type: ignore[arg-type]
    return (lo - z) * s, (hi - z) * s


def _check_runtime(path: Path, args: Sequence[Tensor], expected: Any) -> float:
    """Max |onnxruntime - simulation| on the example input; NaN when onnxruntime is not installed."""
    try:
        import onnxruntime as ort
    except ImportError:
        return float("nan")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: a.detach().numpy() for i, a in zip(sess.get_inputs(), args, strict=True)}
    got = sess.run(None, feed)[0]
    want = expected[0] if isinstance(expected, (tuple, list)) else expected
    return float(np.abs(got - want.detach().float().numpy()).max()) if got.size else 0.0
