"""Pure tensor functions for fake quantization: integer, fixed point and ExMy float.

Every function returns a tensor of the same shape and dtype as its input, with each
value moved to the nearest point of the format's grid (or to a random neighbour, with
``rounding="stochastic"``). NaN stays NaN; infinities saturate to the largest value.

Gradients follow the straight-through estimator: the gradient passes unchanged where
the input was inside the representable range and is zero where it was clipped.

>>> import torch
>>> quantize_fixed(torch.tensor([0.3, 5.0]), bits=4, frac=2)
tensor([0.2500, 1.7500])
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "ROUNDINGS",
    "quantize_int",
    "quantize_fixed",
    "quantize_float",
    "quantize_gradient",
    "float_max_value",
]

ROUNDINGS = ("nearest", "stochastic")


def _check_rounding(rounding: str) -> None:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")


def _round_(y: Tensor, rounding: str, generator: torch.Generator | None) -> Tensor:
    """Round ``y`` in place: half-to-even, or stochastically (up with probability frac(y))."""
    if rounding == "nearest":
        return y.round_()
    u = torch.rand(y.shape, generator=generator, device=y.device, dtype=y.dtype)
    f = torch.floor(y)
    # frac = y - floor(y) is exact in float32 below 2^23, so P(round up) == frac exactly.
    return f.add_(u.lt_(y.sub_(f)).to(f.dtype))


def _work_dtype(x: Tensor) -> torch.dtype:
    # Half-precision inputs are computed in float32 so the grid arithmetic stays exact.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _broadcast(v: Tensor | float, x: Tensor, axis: int | None) -> Tensor | float:
    if not isinstance(v, Tensor) or v.dim() == 0 or axis is None:
        return v
    shape = [1] * x.dim()
    shape[axis] = -1
    return v.reshape(shape)


class _STE(torch.autograd.Function):
    """Forward: a precomputed quantized tensor. Backward: gradient masked to the in-range inputs."""

    @staticmethod
    def forward(ctx, x: Tensor, out: Tensor, mask: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(mask)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None


def _finish(x: Tensor, out: Tensor, in_range) -> Tensor:
    """Cast back to the input dtype and attach the straight-through gradient when needed."""
    out = out.to(x.dtype)
    if x.requires_grad and torch.is_grad_enabled():
        return _STE.apply(x, out.detach(), in_range())
    return out


def quantize_int(
    x: Tensor,
    scale: Tensor | float,
    zero_point: Tensor | int,
    qmin: int,
    qmax: int,
    *,
    axis: int | None = None,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Affine integer fake quantization: ``(clamp(round(x/scale) + zp, qmin, qmax) - zp) * scale``.

    ``scale`` and ``zero_point`` are scalars, or 1-d tensors along ``axis`` (per channel).
    Agrees with ``torch.fake_quantize_per_tensor_affine`` except where ``x/scale`` lies
    within one float ulp of a tie: torch multiplies by ``1/scale`` instead of dividing,
    so its code can differ by one step there.

    >>> quantize_int(torch.tensor([0.26, -3.0]), 0.5, 0, -4, 3)
    tensor([ 0.5000, -2.0000])
    """
    _check_rounding(rounding)
    if qmin >= qmax:
        raise ValueError(f"qmin must be below qmax, got qmin={qmin}, qmax={qmax}")
    wd = _work_dtype(x)
    s = _broadcast(scale.to(wd) if isinstance(scale, Tensor) else scale, x, axis)
    zp = _broadcast(zero_point.to(wd) if isinstance(zero_point, Tensor) else zero_point, x, axis)
    code = _round_(x.to(wd) / s, rounding, generator)  # fresh tensor, safe to modify
    has_zp = isinstance(zp, Tensor) or zp != 0
    if has_zp:
        code.add_(zp)
    out = code.clamp(qmin, qmax)
    if has_zp:
        out.sub_(zp)
    out.mul_(s)
    return _finish(x, out, lambda: (code >= qmin) & (code <= qmax))


def quantize_fixed(
    x: Tensor,
    bits: int,
    frac: int,
    *,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Signed two's-complement fixed point with ``frac`` fraction bits, saturating.

    Step ``2**-frac``; range ``[-2**(bits-1), 2**(bits-1) - 1] * 2**-frac``.

    >>> quantize_fixed(torch.tensor([0.3, -9.0]), bits=8, frac=4)
    tensor([ 0.3125, -8.0000])
    """
    _check_rounding(rounding)
    if bits < 2:
        raise ValueError(f"fixed point needs at least 2 bits, got {bits}")
    hi = 2.0 ** (bits - 1) - 1
    lo = -(2.0 ** (bits - 1))
    wd = _work_dtype(x)
    code = _round_(x.to(wd) * 2.0**frac, rounding, generator)  # power-of-two scaling is exact
    out = code.clamp(lo, hi).mul_(2.0**-frac)
    return _finish(x, out, lambda: (code >= lo) & (code <= hi))


def float_max_value(exp: int, man: int) -> float:
    """Largest finite value of an IEEE-style ExMy format (top exponent reserved for inf/NaN).

    >>> float_max_value(4, 3), float_max_value(5, 2)
    (240.0, 57344.0)
    """
    bias = 2 ** (exp - 1) - 1
    return (2.0 - 2.0**-man) * 2.0 ** (2**exp - 2 - bias)


def _pow2(k: Tensor) -> Tensor:
    """Exact float32 powers of two for integer exponents in [-149, 127], built from bits."""
    normal = (k + 127).clamp_(min=0) << 23
    sub = torch.ones_like(k) << (k + 149).clamp_(0, 22)
    return torch.where(k >= -126, normal, sub).view(torch.float32)


def quantize_float(
    x: Tensor,
    exp: int,
    man: int,
    *,
    max_value: float | None = None,
    subnormals: bool = True,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Float with 1 sign, ``exp`` exponent (bias ``2**(exp-1)-1``) and ``man`` mantissa bits.

    Rounds half to even; magnitudes above ``max_value`` (default: IEEE-style, top exponent
    reserved) saturate to it. Without ``subnormals`` the values below the smallest normal
    round to zero or to the smallest normal.

    >>> quantize_float(torch.tensor([0.3, 1000.0]), 4, 3)
    tensor([  0.3125, 240.0000])
    """
    _check_rounding(rounding)
    if not (1 <= exp <= 8 and 0 <= man <= 23):
        raise ValueError(f"float formats need 1 <= exp <= 8 and 0 <= man <= 23, got e{exp}m{man}")
    if max_value is None:
        max_value = float_max_value(exp, man)
    emin = 2 - 2 ** (exp - 1)  # exponent of the smallest normal
    xf = x.to(torch.float32)
    a = xf.abs()
    e = (a.view(torch.int32) >> 23) - 127  # floor(log2|x|) for normal float32
    e.clamp_(emin, 127)
    # Below the smallest normal the step is fixed: 2**(emin-man), or 2**emin without subnormals.
    k = e - man if subnormals else torch.where(e > emin, e - man, emin)
    step = _pow2(k)
    q = _round_(a / step, rounding, generator).mul_(step)
    out = q.clamp_(max=max_value).copysign_(xf)
    return _finish(x, out, lambda: a <= max_value)


class _GradQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, fn) -> Tensor:  # type: ignore[override]
        ctx.fn = fn
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return ctx.fn(grad), None


def quantize_gradient(x: Tensor, fn) -> Tensor:
    """Identity in forward; in backward the incoming gradient is replaced by ``fn(grad)``.

    >>> x = torch.tensor([1.0], requires_grad=True)
    >>> quantize_gradient(x * 0.3, lambda g: quantize_fixed(g, 8, 2)).sum().backward()
    >>> x.grad
    tensor([0.2500])
    """
    return _GradQuant.apply(x, fn)
