"""Compiled CPU kernels behind the quantizers of :mod:`bitwidth.functional` (numba).

Each kernel reads its input once and writes its output once: the forward quantizers
(integer/fixed point, ExMy float; nearest or stochastic rounding) and the backward
straight-through masks. They compute exactly what the tensor-op kernels in
``functional`` compute, operation for operation in the same precision (float32, or
float64 for float64 input), so results are bit-identical; stochastic rounding draws the
same lowbias32 noise from the same seed and element index.

Each kernel is a serial loop that releases the GIL; :func:`launch` splits a large tensor
into one chunk per torch intra-op thread and runs the chunks on Python threads. That keeps
them safe in forked workers and from any thread, which numba's own OpenMP and workqueue
thread pools are not (a process pool's forked workers abort once the parent used OpenMP).
Stochastic noise follows the global element index, so a split never changes a value.

Compiled code is cached on disk in :data:`CACHE_DIR` (``$BITWIDTH_CACHE_DIR``, else
``$XDG_CACHE_HOME/bitwidth``, else ``~/.cache/bitwidth``): the first use on a machine
compiles every kernel at once (a few seconds, announced by one log line); every later
process, pool worker or Ray actor loads them in milliseconds.

>>> import numpy as np
>>> x = np.array([[[0.26, -3.0, np.nan]]], dtype=np.float32)  # (outer, channel, inner)
>>> out, p = np.empty_like(x), lambda v: np.array([v], np.float32)
>>> int_forward(x, out, p(0.5), p(0.0), p(-4), p(3), -1, 0)  # scale, zero point, qmin, qmax; seed -1: nearest
>>> out
array([[[ 0.5, -2. ,  nan]]], dtype=float32)
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numba
import numpy as np
import torch
from llvmlite import binding, ir
from numba import njit
from numba.core import config as numba_config
from numba.extending import intrinsic, overload

try:
    import fcntl
except ImportError:  # not POSIX: concurrent cold starts may each compile
    fcntl = None

__all__ = ["CACHE_DIR", "KERNELS", "PARALLEL_MIN_NUMEL", "float_backward", "float_forward", "int_backward",
           "int_forward", "launch", "warm"]

log = logging.getLogger("bitwidth.kernels")


def _cache_dir() -> Path:
    if os.environ.get("BITWIDTH_CACHE_DIR"):
        return Path(os.environ["BITWIDTH_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bitwidth"


CACHE_DIR = _cache_dir()


def _compiled(fn):
    """``njit`` caching in :data:`CACHE_DIR`: numba places a function's cache when it is decorated,
    in ``NUMBA_CACHE_DIR`` if set, else beside the source file (site-packages); ours overrides both."""
    before = numba_config.CACHE_DIR
    numba_config.CACHE_DIR = str(CACHE_DIR / "numba")
    try:
        return njit(cache=True, nogil=True, error_model="numpy")(fn)
    finally:
        numba_config.CACHE_DIR = before


# ----------------------------------------------------------------------------- bit casts

@intrinsic
def _bits(typingctx, x):
    """The bit pattern of a float as a signed integer of the same width."""
    ity = numba.int64 if x.bitwidth == 64 else numba.int32

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], context.get_value_type(ity))

    return ity(x), codegen


@intrinsic
def _float_from_bits(typingctx, i):
    """The float whose bit pattern is the integer ``i`` (int32 -> float32, int64 -> float64)."""
    fty = numba.float64 if i.bitwidth == 64 else numba.float32

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], context.get_value_type(fty))

    return fty(i), codegen


# ----------------------------------------------------------------------------- rounding

# The noise of element j is lowbias32 (C. Wellons' 32-bit integer hash) of lo32(j ^ seed) under a
# key hashed from hi32(j ^ seed), as functional._hash_uniform computes it. 32-bit arithmetic: a
# vector register multiplies twice as many lanes of it as of 64 bits (AVX2 has no 64-bit multiply
# at all); the key is one value per block of 2^32 elements, so the loop over a block hashes once.
_M32 = 0xFFFFFFFF
_GOLDEN32 = np.uint32(0x9E3779B9)  # float64's second draw hashes its key with this


@intrinsic
def _lowbias32(typingctx, i, base, key):
    """lowbias32((uint32(i) + base) ^ key) in 32-bit arithmetic: numba widens uint32 arithmetic to
    64 bits; truncating a loop's index itself here lets LLVM count it in 32-bit vector lanes."""

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        v = builder.xor(builder.add(builder.trunc(args[0], i32), args[1]), args[2])
        for shift, multiplier in ((16, 0x7FEB352D), (15, 0x846CA68B)):
            v = builder.mul(builder.xor(v, builder.lshr(v, ir.Constant(i32, shift))), ir.Constant(i32, multiplier))
        return builder.xor(v, builder.lshr(v, ir.Constant(i32, 16)))

    return numba.uint32(i, numba.uint32, numba.uint32), codegen


@njit(inline="always")
def _noise_keys(seed: int, j: int, n: int):
    """The noise of the elements from global index ``j`` on, as far as its block of 2^32 reaches,
    and how many of the next ``n`` that is: (lo32(j), the block's key of each 32-bit draw), count.

    Element ``j + i`` draws ``lowbias32((uint32(i) + keys[0]) ^ keys[d])``."""
    hi, zero, k0 = (j ^ seed) >> 32, np.uint32(0), np.uint32(seed & _M32)
    keys = (np.uint32(j & _M32), np.uint32(k0 ^ _lowbias32(hi, zero, zero)),
            np.uint32(k0 ^ _lowbias32(hi, zero, _GOLDEN32)))
    return keys, min(n, (1 << 32) - (j & _M32))


def _unit(i, keys, like):
    """U[0, 1) noise of element ``i`` of the run ``keys`` belong to, in the precision of ``like`` (every
    value exact): the top 24 bits of one draw for float32, 21 + 32 bits of two draws for float64."""


@overload(_unit)
def _unit_impl(i, keys, like):
    if like.bitwidth == 64:
        def wide(i, keys, like):
            top = np.int64(_lowbias32(i, keys[0], keys[1]) >> np.uint32(11))
            return np.float64((top << 32) | np.int64(_lowbias32(i, keys[0], keys[2]))) * 2.0**-53

        return wide
    return lambda i, keys, like: np.float32(np.int32(_lowbias32(i, keys[0], keys[1]) >> np.uint32(8))) * np.float32(
        2.0**-24)


@njit(inline="always")
def _stochastic(y, i: int, keys):
    """Round up with probability frac(y), the noise of element ``i`` of the run ``keys`` belong to."""
    f = np.floor(y)
    # y - floor(y) is exact, so P(up) == frac(y); a float32 one adds in either precision, exactly
    return f + np.float32(1.0) if _unit(i, keys, y) < y - f else f


def _exponent(a):
    """floor(log2(a)) for a normal positive float, read from its exponent field; and the largest such value."""


@overload(_exponent)
def _exponent_impl(a):
    if a.bitwidth == 64:
        return lambda a: ((_bits(a) >> 52) - 1023, 1023)
    return lambda a: ((_bits(a) >> 23) - 127, 127)


def _pow2(k, like):
    """2.0**k in the precision of ``like``, built from bits: k in [-149, 127] (float32) or [-149, 1023]."""


@overload(_pow2)
def _pow2_impl(k, like):
    if like.bitwidth == 64:  # -149 is a normal float64 exponent: no subnormal case
        return lambda k, like: _float_from_bits(np.int64(k + 1023) << 52)
    return lambda k, like: _float_from_bits(np.int32((k + 127) << 23 if k >= -126 else 1 << (k + 149)))


# ----------------------------------------------------------------------------- kernels
# Arguments are NumPy arrays: the data, contiguous (integer kernels: (outer, channel, inner),
# one scale and zero point per channel), and the parameters as 1-element arrays of the
# working precision, like the tensors of the tensor-op kernels. Each loop runs over a 1-d
# contiguous slice, which LLVM vectorises; error_model="numpy" lets a division follow IEEE
# (Python's model checks every divisor for zero, which stops vectorisation). Clamps are
# comparisons, so that a NaN passes them as it passes torch.minimum/maximum (which NaN: its
# bits are unspecified, in torch as here: its vector and scalar paths return different ones).


@njit(inline="always")
def _dequantized(code, s, z, qmin, qmax):
    code = qmin if code < qmin else code
    code = qmax if code > qmax else code
    return (code - z) * s


@_compiled
def int_forward(x, out, scale, zp, qmin, qmax, seed, offset):
    """Affine integer fake quantization of ``x`` (outer, channel, inner) into ``out``; ``seed < 0``: nearest.

    ``offset``: the flat index of ``x[0, 0, 0]`` in the whole tensor (a chunk's noise is the whole's)."""
    lo, hi = qmin[0], qmax[0]
    outer, channels, inner = x.shape
    for o in range(outer):
        for c in range(channels):
            s, z = scale[c], zp[c]
            xs, ys = x[o, c], out[o, c]
            # Two loops, not a branch per element: each vectorises on its own.
            if seed < 0:
                for i in range(inner):
                    ys[i] = _dequantized(np.rint(xs[i] / s) + z, s, z, lo, hi)
            else:
                first = (o * channels + c) * inner + offset  # the noise follows the flat element index
                while xs.size:  # one block, but where a row crosses a multiple of 2^32
                    keys, count = _noise_keys(seed, first, xs.size)
                    for i in range(count):  # from 0: an index LLVM knows is not negative
                        ys[i] = _dequantized(_stochastic(xs[i] / s, i, keys) + z, s, z, lo, hi)
                    xs, ys, first = xs[count:], ys[count:], first + count


@_compiled
def int_backward(g, x, out, scale, zp, qmin, qmax):
    """The straight-through gradient: ``g`` where ``x``'s nearest code is within [qmin, qmax], else 0.

    ``g`` and ``out`` are bit patterns (integer views of the gradient's dtype): copying bits
    keeps every gradient value exact, NaN payloads and half precision included.
    """
    lo, hi = qmin[0], qmax[0]
    outer, channels, inner = x.shape
    for o in range(outer):
        for c in range(channels):
            s, z = scale[c], zp[c]
            gs, xs, ys = g[o, c], x[o, c], out[o, c]
            for i in range(inner):
                code = np.rint(xs[i] / s) + z
                ys[i] = gs[i] if lo <= code <= hi else 0


@njit(inline="always")
def _float_step(a, man, emin, kmin):
    """The grid step at magnitude ``a``: 2**(floor(log2 a) - man), fixed below the smallest normal."""
    e, top = _exponent(a)
    e = min(max(e, emin), top)
    return _pow2(e - man if e > emin else kmin, a)


@njit(inline="always")
def _saturated(q, mv, x):
    return np.copysign(mv if q > mv else q, x)


@_compiled
def float_forward(x, out, man, emin, kmin, max_value, seed, offset):
    """ExMy fake quantization of the flat ``x`` into ``out``, saturating at ``max_value``; ``seed < 0``: nearest.

    ``offset``: the index of ``x[0]`` in the whole tensor, as in :func:`int_forward`."""
    m, e0, k0, mv = man[0], emin[0], kmin[0], max_value[0]
    if seed < 0:
        for i in range(x.size):
            a = abs(x[i])
            step = _float_step(a, m, e0, k0)
            out[i] = _saturated(np.rint(a / step) * step, mv, x[i])
    else:
        while x.size:  # one block, but where a chunk crosses a multiple of 2^32
            keys, count = _noise_keys(seed, offset, x.size)
            for i in range(count):  # from 0: an index LLVM knows is not negative
                a = abs(x[i])
                step = _float_step(a, m, e0, k0)
                out[i] = _saturated(_stochastic(a / step, i, keys) * step, mv, x[i])
            x, out, offset = x[count:], out[count:], offset + count


@_compiled
def float_backward(g, x, out, man, emin, kmin, max_value):
    """The straight-through gradient: ``g`` where ``|x| <= max_value``, else 0, on bit patterns as in
    :func:`int_backward` (the grid parameters go unused: a tensor-op kernel's signature)."""
    mv = max_value[0]
    for i in range(x.size):
        out[i] = g[i] if abs(x[i]) <= mv else 0


# ----------------------------------------------------------------------------- threads

# Below this a thread hand-off costs more than it saves (a chunk of 2^19 values takes ~0.1 ms).
PARALLEL_MIN_NUMEL = 1 << 20
_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}


def _pool(threads: int) -> ThreadPoolExecutor:
    """This process's pool of ``threads`` threads (a forked child makes its own: it inherits no threads)."""
    key = (os.getpid(), threads)
    if key not in _pools:
        _pools.clear()
        _pools[key] = ThreadPoolExecutor(threads, thread_name_prefix="bitwidth-kernel")
    return _pools[key]


def _split(shape: tuple[int, ...], n: int) -> tuple[int, int] | None:
    """(axis, values per index step along it) to cut a kernel's layout into ``n`` chunks, or None.

    A 1-d array is cut anywhere; an (outer, channel, inner) one along ``outer``, or along the
    channels (their parameters cut with them) or ``inner`` when the axes before are 1, so
    every chunk is contiguous and its first value's flat index is ``start × step``.

    >>> _split((1, 1, 4096), 2), _split((1, 64, 9), 2), _split((8, 4, 9), 2), _split((1,), 2)
    ((2, 1), (1, 9), (0, 36), None)
    """
    if len(shape) == 1:
        return (0, 1) if shape[0] >= n else None
    outer, channels, inner = shape
    if outer >= n:
        return 0, channels * inner
    if outer == 1 and channels >= n:
        return 1, inner
    if outer == 1 and channels == 1 and inner >= n:
        return 2, 1
    return None


def launch(kernel, data: tuple[np.ndarray, ...], params: tuple[np.ndarray, ...], seed: int | None = None) -> None:
    """``kernel(*data, *params[, seed, offset])``, cut into one chunk per torch thread when large.

    ``data`` are the arrays of one shape (inputs and output); ``params`` the kernel's parameter
    arrays, of which an integer kernel's first two (scale, zero point) hold one value per
    channel. A forward kernel takes ``seed`` and its chunk's ``offset``.

    >>> x = np.linspace(-2, 2, 1 << 21, dtype=np.float32).reshape(1, 1, -1)
    >>> out, p = np.empty_like(x), lambda v: np.array([v], np.float32)
    >>> launch(int_forward, (x, out), (p(0.25), p(0.0), p(-8), p(7)), seed=-1)
    >>> float(out.min()), float(out.max())
    (-2.0, 1.75)
    """
    threads = torch.get_num_threads()
    cut = _split(data[0].shape, threads) if threads > 1 and data[0].size >= PARALLEL_MIN_NUMEL else None
    if cut is None:
        kernel(*data, *params, *(() if seed is None else (seed, 0)))
        return
    axis, step = cut
    length = data[0].shape[axis]
    bounds = [(length * i // threads, length * (i + 1) // threads) for i in range(threads)]

    def run(lo: int, hi: int) -> None:
        index = (slice(None),) * axis + (slice(lo, hi),)
        ps = tuple(q[lo:hi] if axis == 1 and i < 2 else q for i, q in enumerate(params))
        kernel(*(d[index] for d in data), *ps, *(() if seed is None else (seed, lo * step)))

    for future in [_pool(threads).submit(run, lo, hi) for lo, hi in bounds]:
        future.result()


# ----------------------------------------------------------------------------- compile once

KERNELS = (int_forward, int_backward, float_forward, float_backward)
_state = {"warm": False}


def _examples(dtype: type) -> list[tuple]:
    """One tiny call of every kernel computing in ``dtype``, for each rounding and each gradient
    width (half precision gradients are int16 patterns): every signature the quantizers use."""
    it = np.int64 if dtype == np.float64 else np.int32
    grads = (np.int64,) if dtype == np.float64 else (np.int32, np.int16)
    x = np.linspace(-3, 3, 8, dtype=dtype)
    p = lambda *v: np.array(v, dtype)  # noqa: E731
    x3 = x.reshape(1, 1, -1)
    fp = (np.array([3], it), np.array([-6], it), np.array([-9], it), p(448.0))
    calls = [(int_forward, (x3, np.empty_like(x3), p(0.5), p(0.0), p(-8), p(7), seed, 0)) for seed in (-1, 1)]
    calls += [(float_forward, (x, np.empty_like(x), *fp, seed, 0)) for seed in (-1, 1)]
    for gt in grads:
        g = np.arange(8, dtype=gt)
        calls += [(int_backward, (g.reshape(1, 1, -1), x3, np.empty((1, 1, 8), gt), p(0.5), p(0.0), p(-8), p(7))),
                  (float_backward, (g, x, np.empty_like(g), *fp))]
    return calls


def _ready_marker() -> Path:
    """A file whose existence says this machine has compiled these kernels (into ``CACHE_DIR``).

    numba keys its cache by source content and CPU; the marker's name does too, so a new
    version of this file or another CPU type compiles once again, saying so.
    """
    source = Path(__file__).read_bytes()
    key = f"{numba.__version__}|{sys.version}|{binding.get_host_cpu_name()}|{binding.get_host_cpu_features()}"
    digest = hashlib.sha256(source + key.encode()).hexdigest()[:16]
    return CACHE_DIR / "numba" / f"ready-{digest}"


def warm() -> None:
    """Make every kernel callable without compiling: at once on a machine that has compiled them, else compile all.

    On a cold machine this compiles every signature in one go (seconds, announced by one
    log line), so no later call pauses to compile, in the middle of a timed loop or not.
    Concurrent processes (a fresh process pool) wait for the first one's compilation under
    a file lock and then load its results. Elsewhere each kernel loads from the cache at its
    first call (milliseconds).

    >>> warm()
    """
    if _state["warm"]:
        return
    marker = _ready_marker()
    if not marker.exists():
        with _compile_lock(marker.parent):
            if not marker.exists():
                log.warning("bitwidth: compiling the fake-quantization kernels for this machine, once "
                            "(seconds; cached in %s, BITWIDTH_CACHE_DIR overrides)", CACHE_DIR)
                for dtype in (np.float32, np.float64):
                    for kernel, args in _examples(dtype):
                        kernel(*args)
                with contextlib.suppress(OSError):  # an unwritable cache: the next process compiles again
                    marker.touch()
    _state["warm"] = True


@contextlib.contextmanager
def _compile_lock(directory: Path):
    """An exclusive lock on ``directory/.lock`` across processes (none where the directory cannot be written)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle = open(directory / ".lock", "a") if fcntl else None  # noqa: SIM115
    except OSError:
        handle = None
    if handle is None:
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
