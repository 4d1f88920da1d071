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
- group-wise integer weights (``int4_g128``, symmetric or not) as blocked
  ``DequantizeLinear`` (``block_size``, opset 21): integer codes, one scale per block
  in the format's ``scale_dtype`` (and a zero point per block, asymmetric);
- fixed point as integers with the power-of-two scale ``2**-frac``;
- ``e4m3`` / ``e5m2`` as ``float8e4m3fn`` / ``float8e5m2``, ``fp16`` / ``bf16`` as casts.

Widths ONNX cannot hold (opset 21: 4, 8 and 16-bit integers) are stored at the nearest
wider one, **keeping the simulated grid**: an ``int3`` weight is int4 codes in -4..3, an
``int5`` activation is clipped to the int5 range before an int8 ``QuantizeLinear``
(Brevitas' QCDQ), so the deployed numbers are the simulated ones. Float formats without
an ONNX type run in the nearest wider one, which changes their grid: the summary marks
those sites ``exact=False``, as it does rounding ``stochastic`` (deployed to nearest) and
integers wider than 16 bits (left in float32). Block-scaled formats ONNX cannot run stay
float32 too, with a note: group-wise integer activations (their scales are computed per
block at run time, which no ONNX quantize operator does) and OCP MX and NVFP4 (onnxruntime's
CPU provider has no ``DequantizeLinear`` or ``Cast`` kernel for ``float4e2m1``, nor a
``DequantizeLinear`` taking ``float8e8m0`` scales). Gradient formats belong to training and
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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from .export_graph import BITS, DOMAIN, FLOATS, SCALE_TYPES, Site, rewrite
from .formats import BLOCK_FORMATS, FixedFormat, FloatFormat, Format, GroupIntFormat, IntFormat, MXFormat
from .sites import engine_of
from .wrap import Plan, QuantSpec, calibrate, resolve_plan, set_plan, wrap

__all__ = ["DEFAULT_OPSET", "SITE_COLUMNS", "ExportSummary", "deploy_type", "export_onnx", "onnx_inputs", "require"]

DEFAULT_OPSET = 21  # the first with int4/uint4 (and int16) QuantizeLinear
SITE_COLUMNS = ["site", "kind", "simulated", "deployed", "granularity", "exact", "note", "stored_bits"]


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

    Integers and fixed point go to the narrowest of (u)int4/8/16 holding them, grid kept;
    so do group-wise integer weights (signed codes, blocked scales), while group-wise
    activations and MX/NVFP4 have no ONNX form onnxruntime runs (``float32``).
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
    >>> deploy_type(GroupIntFormat(3, block=32)), deploy_type(GroupIntFormat(4), "activation")
    (('int4', True), ('float32', False))
    """
    if isinstance(fmt, GroupIntFormat):
        if kind != "weight":
            return "float32", False
        return f"int{next(w for w in (4, 8, 16) if fmt.bits <= w)}", fmt.rounding == "nearest"
    if isinstance(fmt, (IntFormat, FixedFormat)):
        signed = getattr(fmt, "signed", True)
        widths = (4, 8, 16) if kind == "weight" else (8, 16)
        width = next((w for w in widths if fmt.bits <= w), None)
        if width is None:
            return "float32", False
        return f"{'' if signed and kind == 'weight' else 'u'}int{width}", fmt.rounding == "nearest"
    if not isinstance(fmt, FloatFormat):  # a format this export does not know
        return "float32", False
    for name, (exp, man, top) in FLOATS.items():
        if fmt.exp <= exp and fmt.man <= man and fmt.max_value <= top:
            same = (fmt.exp, fmt.man) == (exp, man) and fmt.subnormals
            return name, same and fmt.rounding == "nearest"
    return "float32", False


def _float_note(fmt: Format) -> str:
    """Why ``fmt`` stays float32 in the file."""
    if isinstance(fmt, GroupIntFormat):  # only activations get here: weights have their blocked form
        return (f"{fmt.name} activations take per-block scales computed at run time, which no ONNX quantize "
                f"operator does: left in float32")
    if isinstance(fmt, BLOCK_FORMATS):  # MX or NVFP4: what onnxruntime 1.32's CPU provider lacks
        element = fmt.element if isinstance(fmt, MXFormat) else "e2m1"
        e8m0 = "onnxruntime (CPU) has no DequantizeLinear taking float8e8m0 (E8M0) scales"
        why = [e8m0] if isinstance(fmt, MXFormat) else []
        if element == "e2m1":
            why.append("onnxruntime (CPU) has no DequantizeLinear or Cast kernel for float4e2m1")
        elif element in ("e2m3", "e3m2"):
            why.append(f"ONNX has no {element} type")
        return f"{'; '.join(why)}: {fmt.name} left in float32"
    return f"no ONNX type holds {fmt.name}: left in float32"


def _note(fmt: Format, dtype: str, exact: bool, kind: str) -> str:
    if dtype == "float32":
        return _float_note(fmt)
    notes = []
    if isinstance(fmt, (IntFormat, FixedFormat, GroupIntFormat)) and fmt.bits not in (4, 8, 16):
        notes.append(f"{fmt.name} grid kept in {dtype} storage")
    if isinstance(fmt, FloatFormat) and not exact and fmt.rounding == "nearest":
        notes.append(f"{fmt.name} runs as {dtype}" + (": values stored exactly" if kind == "weight" else
                                                     ": not the simulated grid"))
    if fmt.rounding != "nearest":
        notes.append("stochastic rounding deployed as round-to-nearest")
    return "; ".join(notes)


class _Emit(torch.autograd.Function):
    """The simulated values in forward; a placeholder node keyed by the site when traced."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, fmt: Any) -> Tensor:  # type: ignore[override]
        rec: Site = fmt.site
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
        out = g.op(f"{DOMAIN}::{'Weight' if fmt.site.kind == 'weight' else 'Activation'}", x, key_s=fmt.key)
        out.setType(x.type())
        return out


def _extra() -> Any:
    return field(default=None, compare=False, hash=False, repr=False)


@dataclass(frozen=True)
class _Emitting:
    """A format that hands the site engine its (site, kind) record's values: capture, then emit.

    Mixed in before a format class, its fields follow the format's own."""

    key: str = ""
    site: Any = _extra()
    capturing: Any = _extra()

    def quantize(self, x: Tensor, *, axis: int | None = None, qparams: Any = None, **_: Any) -> Tensor:
        rec = self.site
        if self.capturing["on"]:
            if rec.kind == "weight":
                rec.capture_weight(x, axis if axis is not None else 0)
            elif rec.scale is None:
                rec.capture_activation(qparams)
        return _Emit.apply(x, self)


def _emitting(fmt: Format, rec: Site, capturing: dict) -> Format:
    cls = {IntFormat: _EInt, FixedFormat: _EFixed, FloatFormat: _EFloat, GroupIntFormat: _EGroupInt}[type(fmt)]
    values = {f.name: getattr(fmt, f.name) for f in dataclasses.fields(fmt)}
    return cls(**values, key=f"{rec.site}|{rec.kind}", site=rec, capturing=capturing)


@dataclass(frozen=True)
class _EInt(_Emitting, IntFormat):
    pass


@dataclass(frozen=True)
class _EFixed(_Emitting, FixedFormat):
    pass


@dataclass(frozen=True)
class _EFloat(_Emitting, FloatFormat):
    pass


@dataclass(frozen=True)
class _EGroupInt(_Emitting, GroupIntFormat):
    pass


@dataclass
class ExportSummary:
    """What an export wrote: the file, and per (site, kind) the simulated and the deployed format.

    ``sites``: ``site, kind, simulated, deployed, granularity, exact, note, stored_bits``;
    ``exact`` is False where the deployed numbers can differ from the simulated ones
    (``note`` says why); ``stored_bits`` is the deployed type's width (plus, for a group-wise
    weight, its block's scale and zero point shared by the block's values). ``max_abs_diff``:
    the largest difference between onnxruntime's output and the plan's simulation on the
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


def _cpu(batch: Any) -> Any:
    """A calibration batch (a tensor, or a tuple whose first item is the input) on the CPU."""
    if isinstance(batch, Tensor):
        return batch.cpu()
    return type(batch)(_cpu(b) for b in batch) if isinstance(batch, (tuple, list)) else batch


def _export_plan(model: nn.Module, plan: Plan, capturing: dict) -> tuple[dict[str, QuantSpec], list[dict]]:
    """The plan with every quantized (site, kind) given its own emitting format; rows for the summary."""
    specs, rows = {}, []
    for site, spec in resolve_plan(model, plan).items():
        formats = {}
        for kind in ("weight", "activation", "gradient"):
            fmt = getattr(spec, kind)
            if fmt is None or (kind == "weight" and ":" in site):  # an op site (`attn:sdpa.q`) reads no weight
                continue
            if kind == "gradient":
                rows.append({"site": site, "kind": kind, "simulated": fmt.name, "deployed": "-", "granularity": "",
                             "exact": True, "note": "training only: not part of an inference graph",
                             "stored_bits": 0})
                continue
            dtype, exact = deploy_type(fmt, kind)
            gran = getattr(fmt, "granularity", "tensor") if kind == "weight" else "tensor"
            rows.append({"site": site, "kind": kind, "simulated": fmt.name, "deployed": dtype,
                         "granularity": f"block{fmt.block}" if isinstance(fmt, BLOCK_FORMATS) else gran,
                         "exact": exact, "note": _note(fmt, dtype, exact, kind),
                         "stored_bits": _stored_bits(fmt, dtype)})
            if dtype != "float32":
                base = dataclasses.replace(fmt, rounding="nearest")
                formats[kind] = _emitting(base, Site(site, kind, base, dtype, exact, rows[-1]["note"]), capturing)
        if formats:
            specs[site] = QuantSpec(**formats)
    return specs, rows


def _stored_bits(fmt: Format, dtype: str) -> float:
    """Bits per value the file stores: the type's width, plus a group-wise block's scale and zero point.

    >>> _stored_bits(GroupIntFormat(3, block=32), "int4"), _stored_bits(GroupIntFormat(4, symmetric=False), "int4")
    (4.5, 4.15625)
    """
    if isinstance(fmt, GroupIntFormat) and dtype != "float32":
        shared = BITS[SCALE_TYPES[fmt.scale_dtype]] + (0 if fmt.symmetric else BITS[dtype])
        return BITS[dtype] + shared / fmt.block
    return BITS[dtype]


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
    activation ranges the file stores (default: ``example_inputs`` alone). The export runs
    on a CPU copy of the model. Needs ``pip install 'bitwidth[export]'``.
    """
    require("onnx", "onnxscript")
    if not isinstance(opset, int) or opset < DEFAULT_OPSET:
        raise ValueError(f"opset must be an integer >= {DEFAULT_OPSET} (int4 QuantizeLinear), got {opset!r}")
    args = onnx_inputs(example_inputs)
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"the ONNX file's name must end in .onnx, got {str(path)!r}")
    m = copy.deepcopy(model).cpu().eval().requires_grad_(False)  # onnxruntime's CPU provider is the target
    args = tuple(a.cpu() for a in args)
    batches = [_cpu(b) for b in calib] if calib is not None else [args[0] if len(args) == 1 else args]
    wrap(m, plan)
    calibrate(m, batches, forward=None if len(args) == 1 else (lambda mod, b: mod(*b)))
    with torch.no_grad():
        expected = m(*args)  # the plan as simulated, which the file is checked against
    capturing = {"on": True}
    specs, rows = _export_plan(m, plan, capturing)
    set_plan(m, specs)
    with torch.no_grad():
        m(*args)  # the capture pass: every site records its scale, zero point and codes
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
    rewrite(proto, records, opset)
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
                          custom_opsets={DOMAIN: 1}, do_constant_folding=True)
    return onnx.load_from_string(buf.getvalue())


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
