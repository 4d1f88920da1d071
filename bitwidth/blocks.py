"""Block-scaled fake quantization: group-wise integers, OCP Microscaling (MX) and NVFP4.

Pure tensor functions, like :mod:`bitwidth.functional`: each returns a tensor of the
input's shape and dtype, every value moved onto the grid of its block. A block is
``block`` consecutive values along one dimension that share one scale:

- ``axis=None`` (activations, gradients): blocks run along the **last** dimension, the
  input features of a linear layer (for an NCHW convolution input that is the width).
- ``axis=a`` (weights; ``a`` is the output-channel axis): the tensor is seen as
  (channels, everything else) in memory order and blocks run along the second part, the
  reduction dimension of the layer's GEMM: ``in`` of a Linear weight, ``in·kh·kw`` of a
  Conv2d weight (so a block of 32 spans about 3.5 input channels of a 3x3 kernel).

When that dimension is not a multiple of ``block``, the remainder forms a **smaller
block** of its own (computed by padding with zeros, which changes no scale: every scale
rule here includes 0 in its range).

Scales (the reference each agrees with, bit for bit on CPU, is in ``tests/test_blocks.py``):

- group-wise integer: ``absmax / qmax`` per group (symmetric; the largest value is never
  clipped, as :class:`bitwidth.formats.IntFormat`), or ``(max - min) / (2**bits - 1)``
  with a zero point (asymmetric; torchao's ``choose_qparams_affine`` rule). The scale is
  stored in ``scale_dtype`` (fp16 by default, as GPTQ/AWQ checkpoints store it), so the
  fake quantization uses that rounded scale.
- MX (OCP MX v1.0 section 6.3): ``X = 2**(floor(log2 amax) - emax_elem)`` in E8M0
  (``2**-127 .. 2**127``), elements cast with round-half-to-even and saturation to the
  element's maximum; ``scale_mode`` "ceil" and "even" are torchao's alternatives.
- NVFP4: e2m1 elements, a per-tensor fp32 scale ``amax / (448 · 6)`` from the tensor's
  largest finite magnitude and an e4m3 scale per block of ``amax_block / 6`` relative to
  it, with torchao's float32 operation order (in float32 for every input dtype: its scales
  are fp32 by definition).

NaN in a block makes the whole MX or NVFP4 block NaN (its scale is NaN, as in torchao); a
group-wise integer keeps NaN where it was and ignores NaN/Inf when choosing the scale.
±Inf stays ±Inf under MX (its block's other values flush to zero), saturates under
NVFP4 and group-wise integers. Gradients are straight-through: ``g`` where the value
was inside its block's range, 0 where it saturated.

>>> quantize_mx(torch.tensor([1.0, 0.3, -5.0, 40.0]), "e2m1", block=2)  # 40 = 5 x 2**3: a tie, to 4 x 2**3
tensor([ 1.0000,  0.2500, -4.0000, 32.0000])
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from . import block_kernels as K
from . import functional as F

__all__ = [
    "BLOCK_SIZES",
    "MX_ELEMENTS",
    "SCALE_DTYPES",
    "SCALE_MODES",
    "block_scales",
    "quantize_group_int",
    "quantize_mx",
    "quantize_nvfp4",
]

BLOCK_SIZES = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# element -> (exponent bits, mantissa bits, largest magnitude); int8 is MXINT8: two's
# complement with an implicit 2**-6, saturating symmetrically at ±127/64 as the OCP
# reference code (microsoft/microxcaling) does.
MX_ELEMENTS: dict[str, tuple[int, int, float]] = {
    "e4m3": (4, 3, 448.0),
    "e5m2": (5, 2, 57344.0),
    "e2m3": (2, 3, 7.5),
    "e3m2": (3, 2, 28.0),
    "e2m1": (2, 1, 6.0),
    "int8": (0, 6, 127 / 64),
}
SCALE_MODES = ("floor", "ceil", "even")
SCALE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_E4M3_MAX, _E2M1_MAX = 448.0, 6.0
_E4M3_TINY = 2.0**-6  # torchao clamps NVFP4 block scales to e4m3's smallest normal
_E2M1_STEPS = K.element_steps(0, 1, _E2M1_MAX)

# blocks, need_mask, may_fuse -> (q, STE mask, scales; None from a fused kernel)
Core = Callable[[Tensor, bool, bool], tuple[Tensor, Tensor | None, Tensor | None]]

# From this many elements a float32 CPU tensor rounded to nearest goes through the fused
# numba kernels of bitwidth.block_kernels (bit-exact with the torch code here); below it
# the torch code is as fast and a process that never quantizes a large tensor compiles nothing.
FUSE_MIN_NUMEL = 1 << 16


def _check(block: int, rounding: str) -> None:
    if isinstance(block, bool) or block not in BLOCK_SIZES:
        raise ValueError(f"block must be one of {BLOCK_SIZES}, got {block!r}")
    F._check_rounding(rounding)


def _choice(name: str, value: object, allowed: tuple | dict) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


# ----------------------------------------------------------------------------- layout
def _layout(x: Tensor, block: int, axis: int | None) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """``x`` as (blocks, block) in its working precision, and the map back to ``x``'s layout."""
    if axis is not None:
        ndim = max(x.dim(), 1)
        if isinstance(axis, bool) or not isinstance(axis, int) or not -ndim <= axis < ndim:
            raise ValueError(f"axis must be an integer in {-ndim}..{ndim - 1} for a {x.dim()}-dim tensor, got {axis!r}")
    moved = x.movedim(axis, 0) if axis is not None and x.dim() > 1 else x
    shape = moved.shape
    if axis is not None and x.dim() > 1:
        rows = moved.reshape(shape[0], -1)  # (channels, reduction dims in memory order)
    else:
        rows = moved.reshape(-1, shape[-1] if x.dim() else 1)
    wd = torch.float64 if x.dtype == torch.float64 else torch.float32
    rows = rows.to(wd)
    k = rows.shape[1]
    pad = -k % block
    padded = torch.nn.functional.pad(rows, (0, pad)) if pad else rows
    blocks = padded.reshape(-1, block)

    def back(b: Tensor) -> Tensor:
        r = b.reshape(padded.shape)
        if pad:
            r = r[:, :k]
        out = r.reshape(shape)
        return out.movedim(0, axis) if axis is not None and x.dim() > 1 else out

    return blocks, back


class _BlockSTE(torch.autograd.Function):
    """Block quantization in forward; the straight-through mask in backward."""

    @staticmethod
    def forward(ctx, x: Tensor, run: Callable[[Tensor, bool], tuple[Tensor, Tensor | None]]) -> Tensor:  # type: ignore[override]
        q, mask = run(x, ctx.needs_input_grad[0])
        if mask is not None:
            ctx.save_for_backward(mask)
        return q

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        return torch.where(mask, g, 0.0), None


def _apply(x: Tensor, block: int, axis: int | None, core: Core) -> Tensor:
    F._check_input(x)
    if x.numel() == 0:
        return x.clone()

    def run(t: Tensor, need_mask: bool) -> tuple[Tensor, Tensor | None]:
        with torch.no_grad():
            blocks, back = _layout(t, block, axis)
            q, mask, _ = core(blocks, need_mask, True)
            return back(q).to(t.dtype), back(mask) if mask is not None else None

    return _BlockSTE.apply(x, run)


def _scales(x: Tensor, block: int, axis: int | None, core: Core) -> Tensor:
    F._check_input(x)
    if x.numel() == 0:
        return x.new_zeros(0, dtype=torch.float32)
    with torch.no_grad():
        blocks, _ = _layout(x, block, axis)
        scales = core(blocks, False, False)[2]
        assert scales is not None  # the unfused path always gives them
        return scales.reshape(-1)


def _fusable(b: Tensor, rounding: str, may_fuse: bool) -> bool:
    return (may_fuse and rounding == "nearest" and b.dtype == torch.float32 and b.device.type == "cpu"
            and b.numel() >= FUSE_MIN_NUMEL)


def _fused(kernel: Callable, b: Tensor, need_mask: bool, *params: object) -> tuple[Tensor, Tensor | None, None]:
    b = b.contiguous()
    out = torch.empty_like(b)
    mask = torch.empty(b.shape if need_mask else (1, 1), dtype=torch.bool)
    kernel(b.numpy(), out.numpy(), mask.numpy(), need_mask, *params)
    return out, mask if need_mask else None, None


def _rnd(y: Tensor, rounding: str, generator: torch.Generator | None) -> Tensor:
    if rounding == "nearest":
        return torch.round(y)  # half to even
    f = torch.floor(y)
    u = torch.rand(y.shape, generator=generator, dtype=y.dtype, device=y.device)
    return f + (u < y - f).to(y.dtype)  # up with probability frac(y)


# ----------------------------------------------------------------------------- group-wise int
def _finite_range(b: Tensor) -> tuple[Tensor, Tensor]:
    """Per-block (lo <= 0, hi >= 0), NaN and Inf ignored; shapes (blocks, 1)."""
    lo, hi = torch.aminmax(b, dim=1, keepdim=True)
    if not bool(torch.isfinite(lo).all() & torch.isfinite(hi).all()):  # the masked pass is the rare case
        lo, hi = torch.aminmax(torch.where(torch.isfinite(b), b, 0.0), dim=1, keepdim=True)
    return lo.clamp(max=0), hi.clamp(min=0)


def _group_int_core(bits: int, symmetric: bool, scale_dtype: str, rounding: str,
                    generator: torch.Generator | None) -> Core:
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    sd = SCALE_DTYPES[scale_dtype]

    def core(b: Tensor, need_mask: bool, may_fuse: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
        if _fusable(b, rounding, may_fuse):
            # the scale's storage grid: (smallest normal exponent, mantissa bits, max); fp32 needs none
            grid = {"fp16": (-14, 10, 65504.0), "bf16": (-126, 7, torch.finfo(torch.bfloat16).max),
                    "fp32": (0, -1, 0.0)}[scale_dtype]
            return _fused(K.group_int, b, need_mask, qmin, qmax, symmetric, *grid)
        lo, hi = _finite_range(b)
        if symmetric:
            scale = torch.maximum(-lo, hi) / qmax
        else:
            n = qmax - qmin
            span = hi - lo  # overflows only for ranges wider than the dtype's max: then divide first
            scale = torch.where(torch.isfinite(span), span / n, hi / n - lo / n)
        # The stored scale is what a deployed kernel multiplies by. A group whose scale
        # underflows the scale dtype (or is all zeros) gets scale 1: its values flush to zero.
        scale = scale.clamp(max=torch.finfo(sd).max).to(sd).to(b.dtype)
        scale = torch.where(scale > 0, scale, 1.0)
        zp = torch.zeros_like(scale) if symmetric else (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
        code = _rnd(b / scale, rounding, generator) + zp
        q = (code.clamp(qmin, qmax) - zp) * scale
        mask = ((code >= qmin) & (code <= qmax)) if need_mask else None
        return q, mask, scale

    return core


def quantize_group_int(
    x: Tensor,
    bits: int,
    block: int = 128,
    *,
    symmetric: bool = True,
    scale_dtype: str = "fp16",
    axis: int | None = None,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Signed ``bits``-bit integers with one scale (and, asymmetric, a zero point) per group.

    Codes are ``-2**(bits-1) .. 2**(bits-1)-1``; ``scale_dtype`` is "fp16", "bf16" or "fp32".

    >>> quantize_group_int(torch.tensor([0.1, 0.7, -1.4, 0.0]), 4, block=2, scale_dtype="fp32")
    tensor([ 0.1000,  0.7000, -1.4000,  0.0000])
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"group-wise integer bits must be an integer in 2..16, got {bits!r}")
    _check(block, rounding)
    _choice("scale_dtype", scale_dtype, SCALE_DTYPES)
    return _apply(x, block, axis, _group_int_core(bits, bool(symmetric), scale_dtype, rounding, generator))


# ----------------------------------------------------------------------------- MX
def _e8m0(amax: Tensor, emax: int, mode: str, man: int) -> Tensor:
    """The shared exponent of each block (float, integral; NaN where the scale is NaN)."""
    mant, e = torch.frexp(amax)  # amax = mant * 2**e with mant in [0.5, 1)
    k = (e - 1).to(amax.dtype)  # floor(log2 amax)
    if mode == "ceil":
        k = k + (mant != 0.5).to(k.dtype)
    elif mode == "even":  # round amax to the element's mantissa width (half up) before the floor
        k = k + (mant >= 1 - 2.0 ** -(man + 2)).to(k.dtype)
    k = torch.where(amax == 0, -math.inf, k)  # an all-zero block takes the smallest scale
    k = torch.where(torch.isinf(amax), 128.0, k)  # float32's Inf has the exponent field of 2**128
    shared = (k - emax).clamp(-127, 128)
    # E8M0 holds 2**-127..2**127; 0xFF (2**128) is its NaN, as is a NaN block
    return torch.where((shared == 128) | torch.isnan(amax), math.nan, shared)


def _mx_core(element: str, scale_mode: str, rounding: str, generator: torch.Generator | None) -> Core:
    exp, man, top = MX_ELEMENTS[element]
    emax = math.floor(math.log2(top))
    emin = 2 - 2 ** (exp - 1) if element != "int8" else 0  # the smallest normal's exponent
    steps = K.element_steps(emin, man, top)

    def core(b: Tensor, need_mask: bool, may_fuse: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
        if _fusable(b, rounding, may_fuse):
            return _fused(K.mx, b, need_mask, steps, emin, man, top, emax, SCALE_MODES.index(scale_mode),
                          element == "int8")
        amax = b.abs().amax(dim=1, keepdim=True)  # NaN propagates: a block holding NaN is NaN
        scale = torch.exp2(_e8m0(amax, emax, scale_mode, man))  # exact for integral exponents
        y = b / scale
        if element == "int8":
            q = F.quantize_int(y, 2.0**-6, 0, -127, 127, rounding=rounding, generator=generator)
        else:
            q = F.quantize_float(y, exp, man, max_value=top, rounding=rounding, generator=generator)
        out = q * scale
        if b.dtype == torch.float64:  # float32 overflows the saturated Inf back to Inf; float64 needs telling
            out = torch.where(torch.isinf(b), b, out)
        mask = (y.abs() <= top) if need_mask else None
        return out, mask, scale

    return core


def quantize_mx(
    x: Tensor,
    element: str = "e2m1",
    block: int = 32,
    *,
    scale_mode: str = "floor",
    axis: int | None = None,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> Tensor:
    """OCP MX: ``element`` values (:data:`MX_ELEMENTS`) sharing a power-of-two E8M0 scale per block.

    ``scale_mode``: "floor" (the OCP spec), "ceil" (no element saturates) or "even"
    (the block max rounded to the element's precision first), as torchao names them.

    >>> quantize_mx(torch.tensor([0.1, 0.7, -1.4, 0.0]), "e4m3", block=4)
    tensor([ 0.1016,  0.6875, -1.3750,  0.0000])
    """
    _choice("element", element, MX_ELEMENTS)
    _choice("scale_mode", scale_mode, SCALE_MODES)
    _check(block, rounding)
    return _apply(x, block, axis, _mx_core(element, scale_mode, rounding, generator))


# ----------------------------------------------------------------------------- NVFP4
def _tensor_amax(x: Tensor) -> Tensor:
    """Largest finite magnitude of ``x`` (0 when there is none), in the working precision."""
    lo, hi = torch.aminmax(x.detach())  # one pass, no |x| temporary
    a = torch.maximum(-lo, hi).to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    if not bool(torch.isfinite(a)):  # one Inf or NaN must not wipe out the whole tensor's scale
        a = torch.where(torch.isfinite(x), x.detach().abs(), 0.0).amax().to(a.dtype)
    return a


def _nvfp4_core(tensor_amax: Tensor, rounding: str, generator: torch.Generator | None) -> Core:
    def core(b: Tensor, need_mask: bool, may_fuse: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
        pts = tensor_amax.to(b.dtype) / (_E4M3_MAX * _E2M1_MAX)
        pts = torch.where(pts > 0, pts, 1.0)  # an all-zero tensor: any scale gives zeros
        if _fusable(b, rounding, may_fuse):
            return _fused(K.nvfp4, b, need_mask, pts.numpy()[()], _E2M1_STEPS)
        block_scale = b.abs().amax(dim=1, keepdim=True) / _E2M1_MAX
        s8 = F.quantize_float((block_scale / pts).clamp(_E4M3_TINY, _E4M3_MAX), 4, 3, max_value=_E4M3_MAX)
        y = b * ((1.0 / pts) / s8)  # torchao's order of float operations, for bit-exact results
        q = F.quantize_float(y.clamp(-_E2M1_MAX, _E2M1_MAX), 2, 1, max_value=_E2M1_MAX,
                             rounding=rounding, generator=generator)
        scale = pts * s8
        mask = (y.abs() <= _E2M1_MAX) if need_mask else None
        return q * scale, mask, scale

    return core


def quantize_nvfp4(
    x: Tensor,
    block: int = 16,
    *,
    axis: int | None = None,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> Tensor:
    """NVFP4: e2m1 values, an e4m3 scale per block of ``block`` and a per-tensor fp32 scale.

    >>> quantize_nvfp4(torch.tensor([0.1, 0.7, -1.4, 3.0]), block=4)
    tensor([ 0.0000,  0.7500, -1.5000,  3.0000])
    """
    _check(block, rounding)
    F._check_input(x)
    if x.numel() == 0:
        return x.clone()
    if x.dtype == torch.float64:  # its scales are fp32 by definition: float64 input computes as float32 does
        return quantize_nvfp4(x.float(), block, axis=axis, rounding=rounding, generator=generator).double()
    return _apply(x, block, axis, _nvfp4_core(_tensor_amax(x), rounding, generator))


# ----------------------------------------------------------------------------- scales
def block_scales(x: Tensor, scheme: str, block: int, *, axis: int | None = None, **params: object) -> Tensor:
    """The scale of every block (1-d, in block order) that ``scheme`` gives ``x``.

    ``scheme`` is "group_int" (``bits``, ``symmetric``, ``scale_dtype``), "mx"
    (``element``, ``scale_mode``) or "nvfp4" (the product of tensor and block scales).
    What the report's scale-spread plot shows.

    >>> block_scales(torch.tensor([1.0, 0.5, 3.0, 0.1]), "mx", 2, element="e2m1")
    tensor([0.2500, 0.5000])
    """
    _check(block, "nearest")
    if scheme == "group_int":
        core = _group_int_core(int(params.get("bits", 4)), bool(params.get("symmetric", True)),  # type: ignore[arg-type]
                               str(params.get("scale_dtype", "fp16")), "nearest", None)
    elif scheme == "mx":
        core = _mx_core(str(params.get("element", "e2m1")), str(params.get("scale_mode", "floor")), "nearest", None)
    elif scheme == "nvfp4":
        F._check_input(x)
        core = _nvfp4_core(_tensor_amax(x), "nearest", None)
    else:
        raise ValueError(f"scheme must be one of ('group_int', 'mx', 'nvfp4'), got {scheme!r}")
    return _scales(x, block, axis, core)
