"""Fused CPU kernels (numba) behind :mod:`bitwidth.blocks`: one pass per block, bit-exact with its torch path.

The torch path of a block format costs eight to ten passes over memory (the block
maxima, the scaled values, the element rounding's temporaries, the rescale); these
loops read each block once into cache, compute its scale and write its values (and,
when autograd needs it, the straight-through mask). They run on one thread and release
the GIL: numba's parallel loops use GNU OpenMP here, which kills a process pool's workers
forked after the parent used it, and under contention they ran slower. They take
float32 (blocks, block) arrays and round half to even; every float32 operation that
rounds is done in float32 in the torch path's order, and the exact ones (power-of-two
scaling, rounding onto a grid) in float64, so results agree bit for bit
(``tests/test_blocks.py`` checks it on adversarial data). ``cache=True`` keeps the
compiled code on disk: only the first use on a machine compiles (a few seconds).

>>> import numpy as np
>>> out, mask = np.empty((2, 2), np.float32), np.empty((2, 2), np.bool_)  # two blocks of two, mxfp4
>>> mx(np.array([[1.0, 0.3], [-5.0, 40.0]], np.float32), out, mask, True, element_steps(0, 1, 6.0), 0, 1, 6.0,
...    2, 0, False)
>>> out.tolist(), mask.tolist()
([[1.0, 0.25], [-4.0, 32.0]], [[True, True], [True, True]])
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

__all__ = ["element_steps", "group_int", "mx", "nvfp4", "round_grid"]

_F32_MAX = float(np.finfo(np.float32).max)


@njit(cache=True, inline="always")
def round_grid(v: float, emin: int, man: int, top: float) -> float:
    """``v`` rounded half to even onto the floats with ``man`` mantissa bits, exponents >= ``emin``
    (subnormals below), saturating at ``top`` (a point of the grid). NaN stays NaN.

    Exact in float64 for float32 ``v``: scaling by powers of two and ``rint`` do not round.
    """
    a = abs(v)
    if a != a:
        return v
    if a >= top:
        return math.copysign(top, v)
    if a == 0.0:
        return v
    e = max(math.frexp(a)[1] - 1, emin)
    step = math.ldexp(1.0, e - man)
    return math.copysign(np.rint(a / step) * step, v)


@njit(cache=True, inline="always")
def _round_elements(row: np.ndarray, steps: np.ndarray, emin: int, top: np.float32) -> None:
    """Round the float32 values of ``row`` in place onto an element grid, half to even.

    ``steps[e - emin]`` is the grid step of binade ``e``: the binade comes from the
    float32 exponent bits (no frexp call), which lets the loop vectorize.
    """
    bits = row.view(np.int32)
    last = steps.size - 1
    for i in range(row.size):
        y = row[i]
        a = abs(y)
        e = min(max(((bits[i] >> 23) & 0xFF) - 127 - emin, 0), last)
        step = steps[e]
        q = np.rint(a / step) * step  # exact: power-of-two scaling and an integer
        q = top if a >= top else q
        row[i] = y if a != a else math.copysign(q, y)


def element_steps(emin: int, man: int, top: float) -> np.ndarray:
    """The grid step of each binade ``emin..floor(log2 top)`` of an element format, as float32.

    >>> element_steps(0, 1, 6.0).tolist()  # e2m1: steps 0.5, 1, 2
    [0.5, 1.0, 2.0]
    """
    return np.array([2.0 ** (e - man) for e in range(emin, math.floor(math.log2(top)) + 1)], np.float32)


@njit(cache=True, inline="always")
def _block_absmax(b: np.ndarray, r: int) -> tuple:
    """Row ``r``'s largest magnitude (float32), and whether it holds a NaN (which decides the block)."""
    amax = np.float32(0.0)
    nan = False
    for i in range(b.shape[1]):
        a = abs(b[r, i])
        if a != a:
            nan = True
        elif a > amax:
            amax = a
    return amax, nan


@njit(cache=True, nogil=True)
def mx(b: np.ndarray, out: np.ndarray, mask: np.ndarray, need_mask: bool, steps: np.ndarray, emin: int,
       man: int, top: float, emax: int, mode: int, int8: bool) -> None:
    """MX blocks: element grid ``steps`` from binade ``emin``; ``mode`` 0 floor, 1 ceil, 2 even; ``int8``: MXINT8."""
    ftop = np.float32(top)
    inv_steps = np.float32(1.0) / steps
    last = steps.size - 1
    for r in range(b.shape[0]):
        amax, nan = _block_absmax(b, r)
        if nan:
            shared = 128
        elif amax == 0:
            shared = -127
        elif math.isinf(amax):
            shared = min(128 - emax, 128)
        else:
            m, e = math.frexp(np.float64(amax))
            k = e - 1
            if mode == 1 and m != 0.5:
                k += 1
            elif mode == 2 and m >= 1 - 2.0 ** -(man + 2):
                k += 1
            shared = min(max(k - emax, -127), 128)
        scale = np.float32(math.nan) if shared == 128 else np.float32(math.ldexp(1.0, shared))
        inv = np.float32(1.0) / scale  # a power of two, exact: y = b * inv equals torch's b / scale
        if int8:  # integer codes: + 0.0 turns a code of -0.0 into 0 (two's complement has no -0)
            lo, hi, unit, zero = np.float32(-127.0), np.float32(127.0), np.float32(64.0), np.float32(0.0)
            for i in range(b.shape[1]):
                y = b[r, i] * inv
                if need_mask:
                    mask[r, i] = abs(y) <= ftop
                q = min(max(np.rint(y * unit) + zero, lo), hi) / unit if y == y else y
                out[r, i] = q * scale
            continue
        bits = b[r].view(np.int32)
        for i in range(b.shape[1]):
            v = b[r, i]
            y = v * inv
            a = abs(y)
            if need_mask:
                mask[r, i] = a <= ftop
            eb = (bits[i] >> 23) & 0xFF
            # y's binade is v's minus the shared exponent, unless v is a float32 subnormal
            e = eb - 127 - shared if eb != 0 else math.frexp(np.float64(a))[1] - 1
            k = min(max(e - emin, 0), last)
            q = np.rint(a * inv_steps[k]) * steps[k]  # exact: power-of-two scaling and an integer
            q = ftop if a >= ftop else q
            out[r, i] = (y if a != a else math.copysign(q, y)) * scale  # a saturated Inf overflows back to Inf


@njit(cache=True, nogil=True)
def nvfp4(b: np.ndarray, out: np.ndarray, mask: np.ndarray, need_mask: bool, pts: np.float32,
          steps: np.ndarray) -> None:
    """NVFP4 blocks under the per-tensor scale ``pts`` (float32), torchao's float32 operation order."""
    six, one = np.float32(6.0), np.float32(1.0)
    for r in range(b.shape[0]):
        amax, nan = _block_absmax(b, r)
        scaled = np.float32(math.nan) if nan else (amax / six) / pts
        if scaled == scaled:
            scaled = min(max(scaled, np.float32(2.0**-6)), np.float32(448.0))
        s8 = np.float32(round_grid(np.float64(scaled), -6, 3, 448.0))
        recip = (one / pts) / s8
        scale = pts * s8
        row = out[r]
        for i in range(b.shape[1]):
            y = b[r, i] * recip
            if need_mask:
                mask[r, i] = abs(y) <= six
            row[i] = y
        _round_elements(row, steps, 0, six)  # saturating at 6 is torchao's clamp
        for i in range(b.shape[1]):
            row[i] = row[i] * scale


@njit(cache=True, nogil=True)
def group_int(b: np.ndarray, out: np.ndarray, mask: np.ndarray, need_mask: bool, qmin: int, qmax: int,
              symmetric: bool, s_emin: int, s_man: int, s_top: float) -> None:
    """Group-wise integers; the scale is rounded onto the grid of its storage dtype (``s_man`` < 0: float32)."""
    fqmin, fqmax, n = np.float32(qmin), np.float32(qmax), np.float32(qmax - qmin)
    zero = np.float32(0.0)
    for r in range(b.shape[0]):
        lo, hi = zero, zero
        for i in range(b.shape[1]):
            v = b[r, i]
            if math.isfinite(v):
                lo = min(lo, v)
                hi = max(hi, v)
        if symmetric:
            scale = max(-lo, hi) / fqmax
        else:
            span = hi - lo
            scale = span / n if math.isfinite(span) else hi / n - lo / n
        if s_man >= 0:
            scale = np.float32(round_grid(np.float64(min(scale, np.float32(s_top))), s_emin, s_man, _F32_MAX))
        if not scale > 0:
            scale = np.float32(1.0)
        zp = zero if symmetric else np.float32(min(max(fqmin - np.rint(lo / scale), fqmin), fqmax))
        for i in range(b.shape[1]):
            v = b[r, i]
            if v != v:
                out[r, i] = v
                if need_mask:
                    mask[r, i] = False
                continue
            code = np.float32(np.rint(v / scale)) + zp
            out[r, i] = (min(max(code, fqmin), fqmax) - zp) * scale
            if need_mask:
                mask[r, i] = fqmin <= code <= fqmax
