"""Number formats as small frozen dataclasses, and ``parse_format`` for their names.

A format knows its bit width and how to quantize a tensor; the maths lives in
:mod:`bitwidth.functional` and, for block-scaled formats, :mod:`bitwidth.blocks`. Bit
width is data: a sweep is a loop over ``bits``.

``bits`` is the searched element width (an int); ``storage_bits`` is what a value costs
in memory, block scales included (``mxfp4``: 4 + 8/32 = 4.25).

>>> parse_format("int4").bits, parse_format("fixed16_8").frac, parse_format("e4m3").max_value
(4, 8, 448.0)
>>> parse_format("mxfp4").storage_bits, parse_format("int4_g128").name, parse_format("nvfp4").storage_bits
(4.25, 'int4_g128', 4.5)
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor

from . import blocks as B
from . import functional as F

__all__ = [
    "BLOCK_FORMATS",
    "FORMAT_FORMS",
    "FORMAT_TYPES",
    "GRANULARITIES",
    "MX_NAMES",
    "SCALE_METHODS",
    "FixedFormat",
    "FloatFormat",
    "Format",
    "GroupIntFormat",
    "IntFormat",
    "MXFormat",
    "NVFP4Format",
    "block_grid",
    "format_from_dict",
    "format_to_dict",
    "parse_format",
]

SCALE_METHODS = ("max", "pow2", "percentile", "mse")
GRANULARITIES = ("tensor", "channel")
FORMAT_FORMS = (
    "int<2..32>",
    "uint<1..32>",
    "fixed<bits>_<frac>",
    "e<E>m<M> (E 2..8, M 0..23)",
    "e4m3 e5m2 e2m3 e3m2 e2m1 (OCP maxima)",
    "fp16",
    "bf16",
    "fp32 / none",
    "int<2..16>_g<block> (group-wise)",
    "mxfp8_e4m3 mxfp8_e5m2 mxfp6_e2m3 mxfp6_e3m2 mxfp4 mxint8 (OCP MX)",
    "nvfp4",
    "<mx or nvfp4 name>_b<block>",
)


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


@dataclass(frozen=True)
class IntFormat:
    """Scaled integer: ``bits``-bit codes times a scale chosen from the data.

    ``scale``: "max" (absolute max maps to the largest code), "pow2" (that scale rounded
    up to a power of two, as fixed-point accelerators use), "percentile" (the
    ``percentile``-th percentile of |x| instead of the max), "mse" (the clipping that
    minimises the squared error, searched over 32 candidates).
    ``granularity="channel"`` gives one scale per output channel (weights).

    >>> IntFormat(4).quantize(torch.tensor([0.1, 0.7, -1.4]))
    tensor([ 0.0000,  0.8000, -1.4000])
    """

    bits: int
    signed: bool = True
    symmetric: bool = True
    granularity: str = "tensor"
    scale: str = "max"
    rounding: str = "nearest"
    percentile: float = 99.99

    def __post_init__(self) -> None:
        lo = 2 if self.signed else 1
        if not isinstance(self.bits, int) or not lo <= self.bits <= 32:
            raise ValueError(f"{self.kind_name} bits must be an integer in {lo}..32, got {self.bits!r}")
        _choice("granularity", self.granularity, GRANULARITIES)
        _choice("scale", self.scale, SCALE_METHODS)
        _choice("rounding", self.rounding, F.ROUNDINGS)
        if not 0 < self.percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")

    @property
    def kind_name(self) -> str:
        return "int" if self.signed else "uint"

    @property
    def storage_bits(self) -> float:
        """Bits per stored value: ``bits`` (one scale per tensor or channel is not counted)."""
        return self.bits

    @property
    def name(self) -> str:
        return f"{self.kind_name}{self.bits}"

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    def qparams(self, x: Tensor, axis: int | None = None) -> tuple[Tensor, Tensor]:
        """Scale and zero point for ``x`` (per channel along ``axis`` when granular).

        Computed in float32, or float64 for float64 ``x``; always positive and finite.
        Empty ``x`` (or empty channels) get scale 1. A 0-dim ``x`` gets a scalar scale.

        >>> IntFormat(8).qparams(torch.tensor([-2.54, 1.0]))[0]
        tensor(0.0200)
        """
        F._check_input(x)
        # float64 data keeps float64 scales: its range may lie far beyond float32's
        x = x.detach() if x.dtype == torch.float64 else x.detach().float()
        channel = self.granularity == "channel" and axis is not None and x.dim() > 0
        if channel:
            if not -x.dim() <= axis < x.dim():
                raise ValueError(f"axis must be in {-x.dim()}..{x.dim() - 1} for a {x.dim()}-dim tensor, got {axis}")
            c = x.shape[axis]
            # (channels, rest), sizes explicit so that empty tensors reshape too
            x = x.movedim(axis, 0).reshape(c, x.numel() // c if c else 0)
        else:
            x = x.reshape(1, -1)
        lo, hi = self._range(x)
        if self.symmetric:
            hi = torch.maximum(-lo, hi)
            scale = hi / self.qmax  # the max maps onto the largest code, never clipped
        else:
            n = self.qmax - self.qmin
            span = hi - lo  # overflows only for ranges wider than the dtype's max: then divide first
            scale = torch.where(torch.isfinite(span), span / n, hi / n - lo / n)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        if self.scale == "pow2":
            top = 1023 if x.dtype == torch.float64 else 127  # the largest power of two the dtype holds
            scale = torch.exp2(torch.ceil(torch.log2(scale)).clamp(max=top))
        if self.symmetric:
            zp = torch.zeros_like(scale)
        else:
            zp = (self.qmin - torch.round(lo / scale)).clamp(self.qmin, self.qmax)
        if self.scale == "mse":
            scale = self._mse_search(x, scale, zp)
        if not channel:  # a 0-dim tensor is one channel: its scale is a scalar
            return scale.reshape(()), zp.reshape(())
        return scale.reshape(-1), zp.reshape(-1)

    def _range(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Per-row clipping range (lo <= 0 <= hi) of ``rows`` (channels, n); NaN/Inf ignored."""
        if rows.shape[1] == 0:
            zero = rows.new_zeros(rows.shape[0])
            return zero, zero
        if self.scale == "percentile" and self.percentile < 100:
            rows = torch.where(torch.isfinite(rows), rows, 0.0)
            k = max(1, min(rows.shape[1], math.ceil(self.percentile / 100 * rows.shape[1])))
            if self.symmetric:
                hi = rows.abs().kthvalue(k, dim=1).values
                return -hi, hi
            return -(-rows).clamp(min=0).kthvalue(k, dim=1).values, rows.clamp(min=0).kthvalue(k, dim=1).values
        lo, hi = torch.aminmax(rows, dim=1)  # one pass; the masked retry below is the rare case
        if not bool(torch.isfinite(lo).all() & torch.isfinite(hi).all()):
            lo, hi = torch.aminmax(torch.where(torch.isfinite(rows), rows, 0.0), dim=1)
        return lo.clamp(max=0), hi.clamp(min=0)

    def _mse_search(self, x: Tensor, scale: Tensor, zp: Tensor) -> Tensor:
        best_err = torch.full_like(scale, float("inf"))
        best_s = scale
        for ratio in torch.linspace(1.0, 0.2, 32).tolist():
            # Shrinking both ends of the range by the same ratio keeps the zero point.
            s = scale * ratio
            q = F._quantize_int(x, s, zp, self.qmin, self.qmax, 0, "nearest", None)  # x is (rows, n)
            err = (q - x).pow(2).mean(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, s, best_s)
        return best_s

    def quantize(
        self,
        x: Tensor,
        *,
        axis: int | None = None,
        qparams: tuple[Tensor, Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Fake-quantize ``x`` with scale from ``qparams`` or, by default, from ``x`` itself.

        ``x`` must be a float16, bfloat16, float32 or float64 tensor (else ``ValueError``).
        """
        F._check_input(x)
        if qparams is not None:  # from outside: checked like any scale
            scale, zp = qparams
            ax = axis if scale.dim() > 0 or zp.dim() > 0 else None
            return F.quantize_int(x, scale, zp, self.qmin, self.qmax, axis=ax, rounding=self.rounding,
                                  generator=generator)
        scale, zp = self.qparams(x, axis)  # positive and finite by construction: no sync to check them
        ax = axis if scale.dim() > 0 else None
        wd = torch.float64 if x.dtype == torch.float64 else torch.float32
        return F._quantize_int(x, scale.to(wd), zp.to(wd), self.qmin, self.qmax, ax, self.rounding, generator)


@dataclass(frozen=True)
class FixedFormat:
    """Signed fixed point (Q-format): ``bits`` total, ``frac`` of them after the binary point.

    >>> FixedFormat(8, 4).quantize(torch.tensor([0.3, 100.0]))
    tensor([0.3125, 7.9375])
    """

    bits: int
    frac: int
    rounding: str = "nearest"

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 32:
            raise ValueError(f"fixed point bits must be an integer in 2..32, got {self.bits!r}")
        if not isinstance(self.frac, int) or not -32 <= self.frac <= 64:
            raise ValueError(f"fixed point frac must be an integer in -32..64, got {self.frac!r}")
        _choice("rounding", self.rounding, F.ROUNDINGS)

    @property
    def name(self) -> str:
        return f"fixed{self.bits}_{self.frac}"

    @property
    def storage_bits(self) -> float:
        return self.bits

    @property
    def max_value(self) -> float:
        return (2.0 ** (self.bits - 1) - 1) * 2.0**-self.frac

    @property
    def step(self) -> float:
        return 2.0**-self.frac

    def quantize(self, x: Tensor, *, generator: torch.Generator | None = None, **_: object) -> Tensor:
        return F.quantize_fixed(x, self.bits, self.frac, rounding=self.rounding, generator=generator)


@dataclass(frozen=True)
class FloatFormat:
    """Float with ``exp`` exponent and ``man`` mantissa bits (plus a sign bit).

    >>> FloatFormat(4, 3).max_value, FloatFormat(4, 3, max_value=448.0).quantize(torch.tensor([300.0]))
    (240.0, tensor([288.]))
    """

    exp: int
    man: int
    max_value: float = None  # type: ignore[assignment]  # None -> IEEE-style maximum
    subnormals: bool = True
    rounding: str = "nearest"

    def __post_init__(self) -> None:
        # One exponent bit has no normal numbers once the top exponent is reserved: e1m1
        # would be {0, 1} under a maximum of 1.5. int/fixed formats give such uniform grids.
        if not isinstance(self.exp, int) or not 2 <= self.exp <= 8:
            raise ValueError(f"float exponent bits must be an integer in 2..8, got {self.exp!r}")
        if not isinstance(self.man, int) or not 0 <= self.man <= 23:
            raise ValueError(f"float mantissa bits must be an integer in 0..23, got {self.man!r}")
        _choice("rounding", self.rounding, F.ROUNDINGS)
        try:
            mv = F.float_max_value(self.exp, self.man) if self.max_value is None else float(self.max_value)
        except (TypeError, ValueError):
            raise ValueError(f"max_value must be a positive finite number, got {self.max_value!r}") from None
        if not mv > 0 or math.isinf(mv):
            raise ValueError(f"max_value must be a positive finite number, got {self.max_value!r}")
        F.float_grid_check(self.exp, self.man, mv, self.subnormals)  # saturation must land on the grid
        object.__setattr__(self, "max_value", mv)

    @property
    def bits(self) -> int:
        return 1 + self.exp + self.man

    @property
    def storage_bits(self) -> float:
        return self.bits

    @property
    def name(self) -> str:
        for alias, (e, m) in _FLOAT_ALIASES.items():
            if (e, m) == (self.exp, self.man) and self.max_value == _alias_max(alias):
                return alias
        return f"e{self.exp}m{self.man}"

    @property
    def min_normal(self) -> float:
        return 2.0 ** (2 - 2 ** (self.exp - 1))

    @property
    def step(self) -> float:
        """Smallest positive value (the subnormal step, or the smallest normal without subnormals)."""
        return self.min_normal * 2.0**-self.man if self.subnormals else self.min_normal

    def quantize(self, x: Tensor, *, generator: torch.Generator | None = None, **_: object) -> Tensor:
        return F.quantize_float(
            x, self.exp, self.man, max_value=self.max_value, subnormals=self.subnormals,
            rounding=self.rounding, generator=generator,
        )


_SCALE_BITS = {"fp16": 16, "bf16": 16, "fp32": 32}


def _check_block(block: object) -> None:
    if isinstance(block, bool) or block not in B.BLOCK_SIZES:
        raise ValueError(f"block must be one of {B.BLOCK_SIZES} (16, 32, 64 and 128 are the usual), got {block!r}")


@dataclass(frozen=True)
class GroupIntFormat:
    """Group-wise integer: ``bits``-bit codes with one scale per group of ``block`` values.

    Groups run along the last dimension (a weight's input dimension; see
    :mod:`bitwidth.blocks` for conv weights). ``symmetric`` (default): scale
    ``absmax / qmax``; else a zero point per group too. The scale is stored in
    ``scale_dtype`` ("fp16", "bf16", "fp32") and counts in ``storage_bits``.

    >>> f = GroupIntFormat(4, block=128)
    >>> f.name, f.storage_bits, GroupIntFormat(4, block=128, symmetric=False).storage_bits
    ('int4_g128', 4.125, 4.15625)
    """

    bits: int
    block: int = 128
    symmetric: bool = True
    scale_dtype: str = "fp16"
    rounding: str = "nearest"

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 16:
            raise ValueError(f"group-wise integer bits must be an integer in 2..16, got {self.bits!r}")
        _check_block(self.block)
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric must be true or false, got {self.symmetric!r}")
        _choice("scale_dtype", self.scale_dtype, tuple(B.SCALE_DTYPES))
        _choice("rounding", self.rounding, F.ROUNDINGS)

    @property
    def name(self) -> str:
        return f"int{self.bits}_g{self.block}"

    @property
    def storage_bits(self) -> float:
        """Element bits plus the group's scale (and zero point, asymmetric) shared by ``block`` values."""
        return self.bits + (_SCALE_BITS[self.scale_dtype] + (0 if self.symmetric else self.bits)) / self.block

    def quantize(self, x: Tensor, *, axis: int | None = None, generator: torch.Generator | None = None,
                 **_: object) -> Tensor:
        return B.quantize_group_int(x, self.bits, self.block, symmetric=self.symmetric, scale_dtype=self.scale_dtype,
                                    axis=axis, rounding=self.rounding, generator=generator)

    def block_scales(self, x: Tensor, *, axis: int | None = None) -> Tensor:
        """The scale of each group of ``x`` (what the report's scale-spread plot shows)."""
        return B.block_scales(x, "group_int", self.block, axis=axis, bits=self.bits, symmetric=self.symmetric,
                              scale_dtype=self.scale_dtype)


MX_NAMES = {"mxfp8_e4m3": "e4m3", "mxfp8_e5m2": "e5m2", "mxfp6_e2m3": "e2m3", "mxfp6_e3m2": "e3m2",
            "mxfp4": "e2m1", "mxint8": "int8"}
_MX_SHORT = {"mxfp8": "e4m3", "mxfp6": "e2m3"}  # shorthands for the first encoding of each width


@dataclass(frozen=True)
class MXFormat:
    """OCP Microscaling: ``element`` values sharing a power-of-two E8M0 scale per ``block``.

    ``element``: "e4m3", "e5m2" (MXFP8), "e2m3", "e3m2" (MXFP6), "e2m1" (MXFP4), "int8"
    (MXINT8). ``scale_mode``: "floor" (the OCP spec), "ceil", "even" (torchao's options).

    >>> MXFormat("e2m1").name, MXFormat("e4m3", block=64).name, MXFormat("e2m3").bits
    ('mxfp4', 'mxfp8_e4m3_b64', 6)
    """

    element: str = "e2m1"
    block: int = 32
    scale_mode: str = "floor"
    rounding: str = "nearest"

    def __post_init__(self) -> None:
        _choice("element", self.element, tuple(B.MX_ELEMENTS))
        _check_block(self.block)
        _choice("scale_mode", self.scale_mode, B.SCALE_MODES)
        _choice("rounding", self.rounding, F.ROUNDINGS)

    @property
    def bits(self) -> int:
        exp, man, _ = B.MX_ELEMENTS[self.element]
        return 8 if self.element == "int8" else 1 + exp + man

    @property
    def name(self) -> str:
        base = next(n for n, e in MX_NAMES.items() if e == self.element)
        return base if self.block == 32 else f"{base}_b{self.block}"

    @property
    def storage_bits(self) -> float:
        """Element bits plus the 8-bit E8M0 scale shared by ``block`` values."""
        return self.bits + 8 / self.block

    def quantize(self, x: Tensor, *, axis: int | None = None, generator: torch.Generator | None = None,
                 **_: object) -> Tensor:
        return B.quantize_mx(x, self.element, self.block, scale_mode=self.scale_mode, axis=axis,
                             rounding=self.rounding, generator=generator)

    def block_scales(self, x: Tensor, *, axis: int | None = None) -> Tensor:
        """The power-of-two scale of each block of ``x``."""
        return B.block_scales(x, "mx", self.block, axis=axis, element=self.element, scale_mode=self.scale_mode)


@dataclass(frozen=True)
class NVFP4Format:
    """NVFP4: e2m1 values, an e4m3 scale per ``block`` (16) values and one fp32 scale per tensor.

    >>> NVFP4Format().name, NVFP4Format().bits, NVFP4Format(block=32).storage_bits
    ('nvfp4', 4, 4.25)
    """

    block: int = 16
    rounding: str = "nearest"

    def __post_init__(self) -> None:
        _check_block(self.block)
        _choice("rounding", self.rounding, F.ROUNDINGS)

    @property
    def bits(self) -> int:
        return 4

    @property
    def name(self) -> str:
        return "nvfp4" if self.block == 16 else f"nvfp4_b{self.block}"

    @property
    def storage_bits(self) -> float:
        """Element bits plus the 8-bit e4m3 block scale (the tensor's one fp32 scale is not counted)."""
        return 4 + 8 / self.block

    def quantize(self, x: Tensor, *, axis: int | None = None, generator: torch.Generator | None = None,
                 **_: object) -> Tensor:
        return B.quantize_nvfp4(x, self.block, axis=axis, rounding=self.rounding, generator=generator)

    def block_scales(self, x: Tensor, *, axis: int | None = None) -> Tensor:
        """The effective scale (tensor scale x e4m3 block scale) of each block of ``x``."""
        return B.block_scales(x, "nvfp4", self.block, axis=axis)


Format = IntFormat | FixedFormat | FloatFormat | GroupIntFormat | MXFormat | NVFP4Format
BLOCK_FORMATS = (GroupIntFormat, MXFormat, NVFP4Format)
FORMAT_TYPES = (IntFormat, FixedFormat, FloatFormat, *BLOCK_FORMATS)


def block_grid(fmt: GroupIntFormat | MXFormat | NVFP4Format) -> tuple[str, str]:
    """The largest magnitude and smallest step of a block format, relative to its block scale.

    >>> block_grid(parse_format("mxfp4")), block_grid(parse_format("int4_g128"))
    (('6 x 2^k', '0.5 x 2^k'), ('7 x scale', '1 x scale'))
    """
    if isinstance(fmt, GroupIntFormat):
        return f"{2 ** (fmt.bits - 1) - 1} x scale", "1 x scale"
    if isinstance(fmt, NVFP4Format):
        return "6 x scale", "0.5 x scale"
    exp, man, top = B.MX_ELEMENTS[fmt.element]
    step = 2.0**-6 if fmt.element == "int8" else 2.0 ** (2 - 2 ** (exp - 1) - man)
    return f"{top:g} x 2^k", f"{step:g} x 2^k"

_OCP_MAX = {"e4m3": 448.0, "e5m2": 57344.0, "e2m3": 7.5, "e3m2": 28.0, "e2m1": 6.0}
_FLOAT_ALIASES = {"fp16": (5, 10), "bf16": (8, 7), **{k: (int(k[1]), int(k[3])) for k in _OCP_MAX}}


def _alias_max(alias: str) -> float:
    e, m = _FLOAT_ALIASES[alias]
    return _OCP_MAX.get(alias, F.float_max_value(e, m))


def _with_block(m: re.Match, kw: dict) -> dict:
    if m["block"] is None:
        return kw
    if "block" in kw:
        raise ValueError(f"the block size is given twice: {m[0]!r} and block={kw['block']!r}")
    return {**kw, "block": int(m["block"])}


def _mx(m: re.Match, kw: dict) -> MXFormat:
    if "element" in kw:
        raise ValueError(f"{m['name']!r} names its element format; drop element={kw['element']!r}")
    return MXFormat(MX_NAMES.get(m["name"]) or _MX_SHORT[m["name"]], **_with_block(m, kw))


_MX_RE = "|".join(sorted([*MX_NAMES, *_MX_SHORT], key=len, reverse=True))
_PATTERNS = [
    (re.compile(r"int(\d+)_g(?P<block>\d+)"), lambda m, kw: GroupIntFormat(int(m[1]), **_with_block(m, kw))),
    (re.compile(rf"(?P<name>{_MX_RE})(?:_b(?P<block>\d+))?"), _mx),
    (re.compile(r"nvfp4(?:_b(?P<block>\d+))?"), lambda m, kw: NVFP4Format(**_with_block(m, kw))),
    (re.compile(r"(u?)int(\d+)"), lambda m, kw: IntFormat(int(m[2]), signed=not m[1], **kw)),
    (re.compile(r"fixed(\d+)_(-?\d+)"), lambda m, kw: FixedFormat(int(m[1]), int(m[2]), **kw)),
    (re.compile(r"e(\d+)m(\d+)"), lambda m, kw: FloatFormat(int(m[1]), int(m[2]), **kw)),
]


def parse_format(name: str | Format | None, **options: object) -> Format | None:
    """Build a format from its name; ``fp32``/``none`` mean full precision (``None``).

    Keyword options set the dataclass fields (``rounding="stochastic"``, ``scale="pow2"``…).

    >>> parse_format("uint8", scale="pow2").scale
    'pow2'
    >>> parse_format("e2m1").max_value
    6.0
    >>> parse_format("mxfp8_e5m2", block=64).name, parse_format("int4_g32", symmetric=False).symmetric
    ('mxfp8_e5m2_b64', False)
    """
    if name is None or isinstance(name, FORMAT_TYPES):
        return dataclasses.replace(name, **options) if name is not None and options else name
    if not isinstance(name, str):
        raise ValueError(f"a format is a name like 'int8' or a format object, got {name!r}")
    key = name.strip().lower()
    if key in ("fp32", "none", "float32", "full"):
        return None
    try:
        if key in _FLOAT_ALIASES:
            e, m = _FLOAT_ALIASES[key]
            return FloatFormat(e, m, **{"max_value": _alias_max(key), **options})
        for pattern, build in _PATTERNS:
            match = pattern.fullmatch(key)
            if match:
                return build(match, options)
    except TypeError as err:  # an unknown option name
        raise ValueError(f"bad option for format {name!r}: {err}") from None
    raise ValueError(f"unknown format {name!r}; allowed forms: {', '.join(FORMAT_FORMS)}")


def format_from_dict(d: dict | str | None) -> Format | None:
    """Inverse of :func:`format_to_dict`; also accepts a plain name.

    >>> format_from_dict(format_to_dict(parse_format("mxfp6_e3m2", scale_mode="ceil"))).scale_mode
    'ceil'
    """
    if d is None or isinstance(d, str):
        return parse_format(d)
    d = dict(d)
    kind = d.pop("type", None)
    if kind not in _TYPE_NAMES.values():
        raise ValueError(f"a format dict's type must be one of {tuple(_TYPE_NAMES.values())}, got {kind!r}")
    cls = next(c for c, k in _TYPE_NAMES.items() if k == kind)
    try:
        return cls(**d)
    except TypeError as err:  # an unknown field
        raise ValueError(f"bad field for a {kind!r} format: {err}") from None


def format_to_dict(fmt: Format | None) -> dict | None:
    """A JSON-ready dict with every field, so stored plans rebuild the exact format.

    >>> format_to_dict(parse_format("fixed8_4"))
    {'type': 'fixed', 'bits': 8, 'frac': 4, 'rounding': 'nearest'}
    """
    if fmt is None:
        return None
    return {"type": _TYPE_NAMES[type(fmt)], **dataclasses.asdict(fmt)}


_TYPE_NAMES = {IntFormat: "int", FixedFormat: "fixed", FloatFormat: "float", GroupIntFormat: "group_int",
               MXFormat: "mx", NVFP4Format: "nvfp4"}

