"""Pure tensor functions for fake quantization: integer, fixed point and ExMy float.

Every function returns a tensor of the same shape and dtype as its input, with each
value moved to the nearest point of the format's grid (or to a random neighbour, with
``rounding="stochastic"``). NaN stays NaN; infinities saturate to the largest value.

Gradients follow the straight-through estimator: the gradient passes unchanged where
the input was inside the representable range and is zero where it was clipped.

Inputs must be float16, bfloat16, float32 or float64 tensors (anything else raises
``ValueError``: integers would be truncated, complex numbers lose their imaginary part).
The arithmetic runs in float32, or in float64 for float64 input, so float64 values beyond
float32's range keep their precision. Empty tensors give empty tensors of the same shape.

On the CPU each quantizer is one compiled pass over memory at every size (numba kernels in
:mod:`bitwidth.kernels`, compiled once per machine); elsewhere it runs the tensor ops below,
fused by torch.compile from :data:`FUSE_MIN_NUMEL` elements on. Every path gives the same
results bit for bit, stochastic rounding included: its noise is a hash of one seed drawn
from ``generator`` and of each element's index.

>>> import torch
>>> quantize_fixed(torch.tensor([0.3, 5.0]), bits=4, frac=2)
tensor([0.2500, 1.7500])
"""

from __future__ import annotations

import functools
import math
import os
import warnings

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DTYPES",
    "ROUNDINGS",
    "float_grid_check",
    "float_max_value",
    "quantize_fixed",
    "quantize_float",
    "quantize_gradient",
    "quantize_int",
]

ROUNDINGS = ("nearest", "stochastic")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_F32_MAX = torch.finfo(torch.float32).max

# On the CPU every quantizer runs as one compiled pass over memory at any size (numba
# kernels in bitwidth.kernels, compiled once per machine and cached on disk). On other
# devices, tensors at least this large (16 MB of float32) go through kernels fused by
# torch.compile; smaller ones stay eager, where compiling (seconds per process, tens of
# seconds cold) would cost more than it saves. BITWIDTH_COMPILE=0 turns both off: the
# eager tensor ops below run everywhere, with the same results bit for bit.
FUSE_MIN_NUMEL = 1 << 22
_fuse = {"enabled": os.environ.get("BITWIDTH_COMPILE", "1") != "0", "cache": {}}


def _check_rounding(rounding: str) -> None:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")


def _check_input(x: Tensor) -> None:
    """A quantizer's input must be a tensor of one of :data:`DTYPES` (an attribute check: free)."""
    if not isinstance(x, Tensor):
        raise ValueError(f"quantizers take a torch.Tensor, got {type(x).__name__}")  # noqa: TRY004
    if x.dtype not in DTYPES:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in DTYPES)
        raise ValueError(f"quantizers take floating-point tensors ({allowed}), got {x.dtype}")


# ----------------------------------------------------------------------------- kernels
# Pure functions of tensors only (no Python scalars), so one compiled graph serves every
# bit width, scale and shape. Each computes in float32 (float64 for float64 input) and
# casts back, so half-precision inputs see exact grid arithmetic.

# lowbias32's multipliers (C. Wellons' 32-bit integer hash), the second as a negative int32: a
# product with a 32-bit value then stays within int64, and its low 32 bits are the same.
_LB1, _LB2, _GOLDEN32, _M32 = 0x7FEB352D, 0x846CA68B - 2**32, 0x9E3779B9, 0xFFFFFFFF


def _lowbias32(v: Tensor) -> Tensor:
    """lowbias32 of 32-bit values held in int64 (every intermediate masked back to 32 bits)."""
    v = ((v ^ (v >> 16)) * _LB1) & _M32
    v = ((v ^ (v >> 15)) * _LB2) & _M32
    return v ^ (v >> 16)


def _hash_uniform(seed: Tensor, like: Tensor) -> Tensor:
    """U[0, 1) noise shaped like ``like``: a 32-bit hash of (seed, element index), see :func:`_uniform_at`.

    A fused kernel computes it in registers, instead of reading a noise tensor that ``torch.rand``
    first had to write.
    """
    index = torch.arange(like.numel(), device=like.device, dtype=torch.int64).view(like.shape)
    return _uniform_at(index, seed, like.dtype)


def _uniform_at(index: Tensor, seed: Tensor | int, dtype: torch.dtype) -> Tensor:
    """The U[0, 1) noise of the elements at flat ``index`` (int64) for ``seed``, in ``dtype``.

    Element j draws ``lowbias32(lo32(v) ^ lowbias32(hi32(v)))`` with ``v = j ^ seed``: the inner
    hash is one key per block of 2^32 elements, which the CPU kernels hash once per block, and
    32-bit arithmetic vectorises at twice the width of 64-bit. float32 takes the draw's top 24
    bits; float64 53 bits, 32 of them from a second draw under another key. Every value is exact.

    >>> _uniform_at(torch.arange(3), 7, torch.float32).tolist()
    [0.5802555680274963, 0.6558200716972351, 0.36044055223464966]
    """
    # The seed first: Inductor turns arithmetic on an index into index expressions, which its
    # one-thread CPU code has vectorised wrongly (torch 2.14, ``index * constant``).
    v = index ^ seed
    lo, hi = v & _M32, v >> 32
    draw = _lowbias32(lo ^ _lowbias32(hi))
    if dtype == torch.float32:
        return (draw >> 8).to(torch.float32) * 2.0**-24  # the mantissa: every value exact, none reaches 1
    second = _lowbias32(lo ^ _lowbias32(hi ^ _GOLDEN32))
    return ((draw >> 11) << 32 | second).to(dtype) * 2.0**-53


def _rnd(y: Tensor, noise: Tensor | None) -> Tensor:
    """Half-to-even, or up with probability frac(y) given ``noise`` ~ U[0, 1) (or an int64 seed for it)."""
    if noise is None:
        return torch.round(y)
    if not noise.is_floating_point():
        noise = _hash_uniform(noise, y)
    f = torch.floor(y)
    return f + (noise < y - f).to(y.dtype)  # y - floor(y) is exact, so P(up) == frac(y)


def _wd(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _int_kernel(x: Tensor, scale: Tensor, zp: Tensor, qmin: Tensor, qmax: Tensor, noise: Tensor | None) -> Tensor:
    code = _rnd(x.to(_wd(x)) / scale, noise) + zp
    return ((torch.minimum(torch.maximum(code, qmin), qmax) - zp) * scale).to(x.dtype)


def _int_grad(g: Tensor, x: Tensor, scale: Tensor, zp: Tensor, qmin: Tensor, qmax: Tensor) -> Tensor:
    code = torch.round(x.to(_wd(x)) / scale) + zp
    return torch.where((code >= qmin) & (code <= qmax), g, 0.0)


def _pow2(k: Tensor, dtype: torch.dtype) -> Tensor:
    """Exact powers of two for integer exponents in [-149, 127] (float32) or [-149, 1023] (float64), built from bits."""
    if dtype == torch.float64:  # -149 is a normal float64 exponent: no subnormal case
        return ((k + 1023) << 52).view(torch.float64)
    normal = (k + 127).clamp(min=0) << 23
    sub = torch.ones_like(k) << (k + 149).clamp(0, 22)
    return torch.where(k >= -126, normal, sub).view(torch.float32)


def _float_kernel(
    x: Tensor, man: Tensor, emin: Tensor, kmin: Tensor, max_value: Tensor, noise: Tensor | None
) -> Tensor:
    wd = _wd(x)
    xf = x.to(wd)
    a = xf.abs()
    # floor(log2|x|) for normal values, read from the exponent field; in float64 for float64
    # input, since rounding it to float32 first would round twice (and overflow past 3.4e38).
    if wd == torch.float64:
        e, top = (a.view(torch.int64) >> 52) - 1023, 1023
    else:
        e, top = (a.view(torch.int32) >> 23) - 127, 127
    e = torch.minimum(torch.maximum(e, emin), torch.full_like(e, top))
    # Below the smallest normal the step is fixed: 2**kmin (subnormal step, or min normal).
    k = torch.where(e > emin, e - man, kmin)
    step = _pow2(k, wd)
    q = _rnd(a / step, noise) * step
    return torch.minimum(q, max_value).copysign(xf).to(x.dtype)


def _float_grad(g: Tensor, x: Tensor, man: Tensor, emin: Tensor, kmin: Tensor, max_value: Tensor) -> Tensor:
    return torch.where(x.to(_wd(x)).abs() <= max_value, g, 0.0)


def _kernel(fn):
    """``fn`` itself, or its compiled form; a failed compilation falls back to eager for good."""
    if not _fuse["enabled"]:
        return fn
    compiled = _fuse["cache"].get(fn)
    if compiled is None:
        compiled = _fuse["cache"][fn] = torch.compile(fn, dynamic=True, fullgraph=True)

    def run(*args):
        try:
            return compiled(*args)
        except Exception as err:  # no C++ compiler, unsupported device, …
            msg = f"bitwidth: fused kernels unavailable ({type(err).__name__}: {err}); using eager ops"
            warnings.warn(msg, stacklevel=2)
            _fuse["enabled"] = False
            return fn(*args)

    return run


class _STE(torch.autograd.Function):
    """Quantize in forward; in backward pass the gradient where the input was in range."""

    @staticmethod
    def forward(ctx, x: Tensor, fwd, grad_fn, noise, *params: Tensor) -> Tensor:  # type: ignore[override]
        ctx.grad_fn = grad_fn
        ctx.save_for_backward(x, *params)  # x, not a mask: no extra memory while x is alive anyway
        return fwd(x, *params, noise)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        x, *params = ctx.saved_tensors
        return (ctx.grad_fn(g, x, *params), None, None, None) + (None,) * len(params)


def _run(fwd, grad, x: Tensor, params: tuple[Tensor, ...], rounding: str, generator, flat_shape,
         arrays: tuple | None = None) -> Tensor:
    """Reshape ``x`` to the kernel's layout, run forward (and STE backward), reshape back.

    ``arrays``: ``params`` as the compiled CPU kernels take them, where the caller has them made.
    """
    noise = None
    if rounding == "stochastic":  # every kernel hashes its noise from one seed (see _hash_uniform)
        noise = torch.randint(2**62, (), generator=generator, device=x.device)
    grad_on = x.requires_grad and torch.is_grad_enabled()
    cpu = _cpu_kernels(x)
    if cpu is not None:
        fwd_c, grad_c = cpu[fwd]
        if arrays is None:
            # Once, for forward and backward; contiguous (ravel copies where needed), as the kernels
            # were compiled for: a per-channel zero point broadcast from one number has stride 0.
            arrays = tuple(p.detach().numpy().ravel() for p in params)
        seed = -1 if noise is None else int(noise)
        if grad_on:
            return _CpuSTE.apply(x, (fwd_c, grad_c, arrays, seed, flat_shape, grad, params))
        return _cpu_forward(fwd_c, x, flat_shape, arrays, seed)[0]
    if _fuse["enabled"] and x.numel() >= FUSE_MIN_NUMEL:
        fwd, grad = _kernel(fwd), _kernel(grad)
    xs = x.reshape(flat_shape)
    out = _STE.apply(xs, fwd, grad, noise, *params) if grad_on else fwd(xs, *params, noise)
    return out.reshape(x.shape)


def _cpu_kernels(x: Tensor) -> dict | None:
    """Tensor-op kernel -> its compiled CPU kernels (forward, backward), where they apply to ``x``."""
    # A tensor subclass (FakeTensor while torch.compile traces) needs the tensor ops.
    if not _fuse["enabled"] or x.device.type != "cpu" or type(x) is not Tensor or torch.compiler.is_compiling():
        return None
    cpu = _fuse.get("cpu")
    if cpu is None:
        try:
            from bitwidth import kernels

            kernels.warm()
            _fuse["launch"] = kernels.launch
            cpu = {_int_kernel: (kernels.int_forward, kernels.int_backward),
                   _float_kernel: (kernels.float_forward, kernels.float_backward)}
        except Exception as err:  # numba cannot compile here: the tensor ops give the same results
            warnings.warn(f"bitwidth: compiled CPU kernels unavailable ({type(err).__name__}: {err}); "
                          "using eager ops", stacklevel=4)
            cpu = {}
        _fuse["cpu"] = cpu
    return cpu or None


def _cpu_forward(kernel, x: Tensor, flat_shape, arrays: tuple, seed: int) -> tuple[Tensor, np.ndarray | None]:
    """Run a compiled CPU forward kernel (``seed`` -1: nearest) on ``x`` in the kernel's layout ``flat_shape``.

    Returns the result and, where ``x`` is contiguous in its working precision, ``x`` as the kernel
    read it (a view, which a backward kernel can read again without converting anew)."""
    xw = x.detach()
    same = xw.dtype == _wd(xw) and xw.is_contiguous()
    if not same:
        xw = xw.to(_wd(xw)).contiguous()  # half precision computes in float32, as the tensor ops do
    # NumPy arrays and reshapes: views, made faster than torch's.
    xn, y = xw.numpy().reshape(flat_shape), torch.empty_like(xw)
    _fuse["launch"](kernel, (xn, y.numpy().reshape(flat_shape)), arrays, seed)
    return (y if y.dtype == x.dtype else y.to(x.dtype)), (xn if same else None)


# Gradient kernels copy bits (or zero): they see a gradient as integers of its width, so every
# value passes exactly, half precision included, without a conversion.
_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16,
         torch.float32: torch.int32, torch.float64: torch.int64}


class _CpuSTE(torch.autograd.Function):
    """:class:`_STE` on compiled CPU kernels. The parameters travel as NumPy arrays, and the
    kernel's layout stays inside: two reshapes on the graph would cost more than the kernels
    on 4,096 values. ``call`` is (forward kernel, backward kernel, arrays, seed, layout, and the
    tensor-op gradient with its parameters): one argument, since each costs ``apply`` time. A
    backward that must itself be differentiable (``create_graph=True``) runs that tensor-op
    gradient, with the same values."""

    @staticmethod
    def forward(ctx, x: Tensor, call: tuple) -> Tensor:  # type: ignore[override]
        fwd, _, arrays, seed, flat_shape, _, _ = call
        ctx.call = call
        ctx.save_for_backward(x)  # x, for autograd's check that nothing changed it in place since
        y, ctx.x_read = _cpu_forward(fwd, x, flat_shape, arrays, seed)
        return y

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        _, grad_kernel, arrays, _, flat, grad_fn, params = ctx.call
        if torch.is_grad_enabled():
            return grad_fn(g.reshape(flat), x.reshape(flat), *params).reshape(x.shape), None
        xn = ctx.x_read
        if xn is None:  # forward converted or copied x: again, rather than keep a copy alive till now
            xn = x.detach().to(_wd(x)).contiguous().numpy().reshape(flat)
        bits = g.contiguous().view(_BITS[g.dtype])
        out = torch.empty_like(bits)
        _fuse["launch"](grad_kernel, (bits.numpy().reshape(flat), xn, out.numpy().reshape(flat)), arrays)
        return out.view(g.dtype), None


def _as_param(v: Tensor | float, dtype: torch.dtype, device: torch.device) -> Tensor:
    if isinstance(v, Tensor):
        return v.to(device=device, dtype=dtype)
    return _numbers((v,), (dtype,), device)[0][0]


_sign = functools.partial(math.copysign, 1.0)


def _numbers(values: tuple[float, ...], dtypes: tuple[torch.dtype, ...], device: torch.device
             ) -> tuple[tuple[Tensor, ...], tuple[np.ndarray, ...] | None]:
    """Numbers as 0-dim parameter tensors of ``dtypes``, and on the CPU as the compiled kernels'
    1-element arrays of them as well (None elsewhere).

    >>> _numbers((0.5, -3), (torch.float32, torch.int32), torch.device("cpu"))
    ((tensor(0.5000), tensor(-3, dtype=torch.int32)), (array([0.5], dtype=float32), array([-3], dtype=int32)))
    """
    if torch.compiler.is_compiling():  # a traced graph makes its own constants
        return tuple(torch.tensor(v, dtype=d, device=device) for v, d in zip(values, dtypes, strict=True)), None
    # The signs tell 0.0 from -0.0, which are one key to a dict.
    return _cached_numbers(values, tuple(map(_sign, values)), dtypes, device)


@functools.lru_cache(maxsize=1024)
def _cached_numbers(values: tuple, signs: tuple, dtypes: tuple, device: torch.device) -> tuple:
    """:func:`_numbers`, made once: building them costs more than quantizing 4,096 values (and a
    copy to an accelerator). The kernels never write their parameters. Never inference tensors,
    which autograd could not save later."""
    with torch.inference_mode(False):
        tensors = tuple(torch.tensor(v, dtype=d, device=device) for v, d in zip(values, dtypes, strict=True))
    return tensors, (tuple(t.numpy().reshape(1) for t in tensors) if device.type == "cpu" else None)


# The positive finite range of a scale in each working precision (smallest subnormal to max).
_SCALE_RANGE = {d: (torch.finfo(d).smallest_normal * torch.finfo(d).eps, torch.finfo(d).max)
                for d in (torch.float32, torch.float64)}


def _check_qparams(scale: Tensor | float, zero_point: Tensor | int, s: Tensor | None, zp: Tensor | None,
                   wd: torch.dtype) -> None:
    """Scales must be positive and finite in the working precision, zero points finite.

    A number is checked on the host; a tensor costs one reduction (a sync on an accelerator).
    """
    if isinstance(scale, Tensor) or isinstance(zero_point, Tensor):
        ok = bool((torch.isfinite(s) & (s > 0)).all() & torch.isfinite(zp).all())
    else:
        lo, hi = _SCALE_RANGE[wd]
        ok = lo <= scale <= hi and math.isfinite(zero_point)
    if not ok:
        raise ValueError(
            f"scale must be positive and finite in {str(wd).removeprefix('torch.')} and zero_point finite, "
            f"got scale={scale!r}, zero_point={zero_point!r}"
        )


def _channel_layout(x: Tensor, s: Tensor, zp: Tensor, axis: int | None) -> tuple[tuple[int, ...], Tensor, Tensor]:
    """The kernel's view of ``x`` and the matching shapes of scale and zero point."""
    if axis is None and s.dim() == 0 and zp.dim() == 0:  # the common case, kept to attribute checks
        return (1, 1, -1), s, zp
    per_channel = s.numel() != 1 or zp.numel() != 1  # zero channels (empty x) are per channel too
    if axis is not None:
        # A 0-dim tensor accepts axis 0 or -1 (as torch's reductions do); it is one channel.
        ndim = max(x.dim(), 1)
        if not -ndim <= axis < ndim:
            raise ValueError(f"axis must be in {-ndim}..{ndim - 1} for a {x.dim()}-dim tensor, got {axis}")
    if not per_channel or x.dim() == 0:
        if per_channel:
            raise ValueError(f"a 0-dim tensor has one channel, got {s.numel()} scales and {zp.numel()} zero points")
        return (1, 1, -1), s.reshape(()), zp.reshape(())
    if axis is None:
        raise ValueError(f"{s.numel()} scales and {zp.numel()} zero points need an axis (per-channel), got axis=None")
    axis %= x.dim()
    c = x.shape[axis]
    if s.numel() not in (1, c) or zp.numel() not in (1, c):
        raise ValueError(f"axis {axis} has {c} channels, got {s.numel()} scales and {zp.numel()} zero points")
    # (outer, channel, inner), all sizes explicit so that empty tensors reshape too
    flat = (math.prod(x.shape[:axis]), c, math.prod(x.shape[axis + 1:]))
    return flat, s.reshape(1, -1, 1).expand(1, c, 1), zp.reshape(1, -1, 1).expand(1, c, 1)  # one of each per channel


def _quantize_int(
    x: Tensor, s: Tensor, zp: Tensor, qmin: int, qmax: int, axis: int | None, rounding: str, generator
) -> Tensor:
    """:func:`quantize_int` on parameters already in the working precision and checked."""
    wd, dev = s.dtype, x.device
    flat, s, zp = _channel_layout(x, s, zp, axis)
    params = (s, zp, _as_param(qmin, wd, dev), _as_param(qmax, wd, dev))
    return _run(_int_kernel, _int_grad, x, params, rounding, generator, flat)


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
    Scales must be positive and finite (in float32, or float64 for float64 input) and zero
    points finite, else ``ValueError``: an infinite scale has no grid (it gives NaN), a zero
    or negative one none that rounds toward ``x``. A 0-dim ``x`` is one channel, so it
    accepts ``axis`` 0 or -1 with a single scale.
    Agrees with ``torch.fake_quantize_per_tensor_affine`` except where ``x/scale`` lies
    within one float ulp of a tie: torch multiplies by ``1/scale`` instead of dividing,
    so its code can differ by one step there.

    >>> quantize_int(torch.tensor([0.26, -3.0]), 0.5, 0, -4, 3)
    tensor([ 0.5000, -2.0000])
    """
    _check_input(x)
    _check_rounding(rounding)
    if qmin >= qmax:
        raise ValueError(f"qmin must be below qmax, got qmin={qmin}, qmax={qmax}")
    wd, dev = _wd(x), x.device
    if axis is None and not isinstance(scale, Tensor) and not isinstance(zero_point, Tensor):
        # The common case, made lean: four numbers, one cache lookup, no channel layout.
        _check_qparams(scale, zero_point, None, None, wd)
        params, arrays = _numbers((scale, zero_point, qmin, qmax), (wd,) * 4, dev)
        return _run(_int_kernel, _int_grad, x, params, rounding, generator, (1, 1, -1), arrays)
    s, zp = _as_param(scale, wd, dev), _as_param(zero_point, wd, dev)
    _check_qparams(scale, zero_point, s, zp, wd)
    return _quantize_int(x, s, zp, qmin, qmax, axis, rounding, generator)


def quantize_fixed(
    x: Tensor,
    bits: int,
    frac: int,
    *,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Signed two's-complement fixed point with ``frac`` fraction bits, saturating.

    Step ``2**-frac``; range ``[-2**(bits-1), 2**(bits-1) - 1] * 2**-frac``. This is the
    integer quantizer with a power-of-two scale, which keeps every step exact.

    >>> quantize_fixed(torch.tensor([0.3, -9.0]), bits=8, frac=4)
    tensor([ 0.3125, -8.0000])
    """
    _check_rounding(rounding)
    if bits < 2:
        raise ValueError(f"fixed point needs at least 2 bits, got {bits}")
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return quantize_int(x, 2.0**-frac, 0, lo, hi, rounding=rounding, generator=generator)


def float_max_value(exp: int, man: int) -> float:
    """Largest finite value of an IEEE-style ExMy format (top exponent reserved for inf/NaN).

    >>> float_max_value(4, 3), float_max_value(5, 2)
    (240.0, 57344.0)
    """
    _check_float_bits(exp, man)
    bias = 2 ** (exp - 1) - 1
    return (2.0 - 2.0**-man) * 2.0 ** (2**exp - 2 - bias)


def _check_float_bits(exp: int, man: int) -> None:
    # One exponent bit leaves no normal numbers once the top exponent is reserved (e1m1
    # would be {0, 1} with a maximum of 1.5 off that grid); int/fixed formats cover that case.
    if not (2 <= exp <= 8 and 0 <= man <= 23):
        raise ValueError(f"float formats need 2 <= exp <= 8 and 0 <= man <= 23, got e{exp}m{man}")


def float_grid_check(exp: int, man: int, max_value: float, subnormals: bool = True) -> None:
    """Raise ``ValueError`` unless ``max_value`` is a value of the ExMy grid, so saturation stays on it.

    The grid here uses every exponent (OCP formats such as e4m3 with 448 do), within
    float32's range (the quantizers' grids never exceed it).

    >>> float_grid_check(4, 3, 448.0)
    >>> float_grid_check(4, 3, 300.0)
    Traceback (most recent call last):
    ...
    ValueError: max_value 300.0 is not a value of e4m3 (the neighbours are 288.0 and 320.0)
    """
    _check_float_bits(exp, man)
    if not (isinstance(max_value, (int, float)) and 0 < max_value <= _F32_MAX):
        raise ValueError(f"max_value must be a positive number up to float32's max, got {max_value!r}")
    bias = 2 ** (exp - 1) - 1
    emin, emax = 1 - bias, 2**exp - 1 - bias
    e = max(math.frexp(max_value)[1] - 1, emin)  # exponent of the binade holding max_value
    step = 2.0 ** (e - man)
    lower = math.floor(max_value / step) * step
    ok = e <= emax and lower == max_value and (subnormals or max_value >= 2.0**emin)
    if not ok:
        hint = f" (the neighbours are {lower} and {lower + step})" if e <= emax else ""
        raise ValueError(f"max_value {max_value} is not a value of e{exp}m{man}{hint}")


_grid_checked = functools.lru_cache(maxsize=256)(float_grid_check)  # per call: a dict lookup

# dtype -> (its largest finite value, that value's binary exponent), for dtypes narrower than float32
_HALF_TOPS = {d: (torch.finfo(d).max, math.frexp(torch.finfo(d).max)[1] - 1) for d in (torch.float16, torch.bfloat16)}


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
    round to zero or to the smallest normal. ``exp`` is 2..8 and ``man`` 0..23; a
    ``max_value`` must be on the grid (see :func:`float_grid_check`).

    >>> quantize_float(torch.tensor([0.3, 1000.0]), 4, 3)
    tensor([  0.3125, 240.0000])
    """
    _check_input(x)
    _check_rounding(rounding)
    if max_value is None:
        max_value = float_max_value(exp, man)
    else:
        max_value = float(max_value)
        _grid_checked(exp, man, max_value, subnormals)
    emin = 2 - 2 ** (exp - 1)  # exponent of the smallest normal
    top = _HALF_TOPS.get(x.dtype)
    if top is not None and max_value > top[0]:
        # Rounding up past a half type's max would return inf: saturate at the largest grid value it holds.
        step = 2.0 ** (top[1] - man)
        max_value = math.floor(top[0] / step) * step
    wd, dev = _wd(x), x.device
    it = torch.int64 if wd == torch.float64 else torch.int32  # the kernel's exponent arithmetic
    params, arrays = _numbers((man, emin, emin - man if subnormals else emin, max_value), (it, it, it, wd), dev)
    return _run(_float_kernel, _float_grad, x, params, rounding, generator, (-1,), arrays)


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
    >>> (quantize_gradient(x, lambda g: quantize_fixed(g, 8, 2)) * 0.3).sum().backward()
    >>> x.grad
    tensor([0.2500])
    """
    return _GradQuant.apply(x, fn)
