"""Inputs the quantizers must refuse or handle: wrong dtypes, float64 beyond float32's range,
empty and 0-dim tensors, invalid scales, and float formats whose outputs must stay on their grid.

References are kept here: numpy float64 formulas for the integer quantizer and an
enumeration of every ExMy grid (or, for grids too large to list, the textbook membership
rule, itself checked against the enumeration where both exist).
"""

import math

import numpy as np
import pytest
import torch

from bitwidth import functional as F
from bitwidth.formats import FixedFormat, FloatFormat, IntFormat, parse_format

BAD_DTYPES = [torch.int8, torch.uint8, torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128]

QUANTIZERS = {
    "quantize_int": lambda x: F.quantize_int(x, 0.5, 0, -8, 7),
    "quantize_int_channel": lambda x: F.quantize_int(x, torch.ones(2), torch.zeros(2), -8, 7, axis=0),
    "quantize_fixed": lambda x: F.quantize_fixed(x, 8, 4),
    "quantize_float": lambda x: F.quantize_float(x, 4, 3),
    "IntFormat": lambda x: IntFormat(8).quantize(x),
    "IntFormat_channel": lambda x: IntFormat(8, granularity="channel").quantize(x, axis=0),
    "IntFormat_qparams": lambda x: IntFormat(8).quantize(x, qparams=(torch.tensor(0.5), torch.tensor(0.0))),
    "IntFormat.qparams": lambda x: IntFormat(8).qparams(x),
    "FixedFormat": lambda x: FixedFormat(8, 4).quantize(x),
    "FloatFormat": lambda x: FloatFormat(4, 3).quantize(x),
}


# ----------------------------------------------------------------------------- 1. dtypes

@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=str)
@pytest.mark.parametrize("name", QUANTIZERS)
def test_unsupported_dtypes_raise_naming_dtype_and_allowed(name, dtype):
    x = torch.ones(2, 3).to(dtype)
    with pytest.raises(ValueError) as err:
        QUANTIZERS[name](x)
    assert str(dtype) in str(err.value) and "float16, bfloat16, float32, float64" in str(err.value)


def test_unsupported_dtype_rejected_before_the_fused_path():
    x = torch.ones(F.FUSE_MIN_NUMEL, dtype=torch.int8)
    with pytest.raises(ValueError, match="int8"):
        F.quantize_int(x, 0.5, 0, -8, 7)


def test_non_tensor_input_raises():
    with pytest.raises(ValueError, match="torch.Tensor"):
        F.quantize_float(np.ones(3, dtype=np.float32), 4, 3)


# ----------------------------------------------------------------------------- 2. float64 precision

def int_reference(x: np.ndarray, scale, zp, qmin: int, qmax: int) -> np.ndarray:
    """Affine fake quantization in float64 numpy (np.round is half-to-even)."""
    return (np.clip(np.round(x / scale) + zp, qmin, qmax) - zp) * scale


HUGE = np.array([1e300, -3.7e299, 2.5e250, 1e-300, 0.0, -1e200, 7.1e299, 1.7976931348623157e308])


def test_float64_int_keeps_values_beyond_float32_range():
    x = torch.from_numpy(HUGE)
    y = F.quantize_int(x, 1e296, 0, -32768, 32767)
    assert y.dtype == torch.float64 and torch.isfinite(y).all()
    np.testing.assert_array_equal(y.numpy(), int_reference(HUGE, 1e296, 0, -32768, 32767))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("scale", ["max", "pow2"])
def test_float64_intformat_scale_in_float64(symmetric, scale):
    fmt = IntFormat(16, symmetric=symmetric, scale=scale)
    x = torch.from_numpy(HUGE[:-1])  # leave room: (hi - lo) of the last one overflows even float64
    s, zp = fmt.qparams(x)
    assert s.dtype == torch.float64 and math.isfinite(s.item()) and s.item() > 1e290
    y = fmt.quantize(x)
    assert torch.isfinite(y).all()
    np.testing.assert_array_equal(y.numpy(), int_reference(HUGE[:-1], s.item(), zp.item(), fmt.qmin, fmt.qmax))
    assert np.allclose(y.numpy(), HUGE[:-1], rtol=2 * s.item() / 1e300, atol=s.item())


def test_float64_per_channel_rows_far_apart():
    x = torch.tensor([[1e300, -2e299, 3e299], [1e-300, 5e-301, -1e-300]], dtype=torch.float64)
    fmt = IntFormat(8, granularity="channel")
    y = fmt.quantize(x, axis=0)
    for row, out in zip(x.numpy(), y.numpy(), strict=True):
        s = np.abs(row).max() / 127
        np.testing.assert_array_equal(out, int_reference(row, s, 0, -128, 127))


def test_float64_float_format_rounds_once():
    # 1 + 2**-4 is the e4m3 midpoint between 1 and 1.125; the extra 2**-30 (lost in float32)
    # decides: rounding through float32 first would give the tie and then 1.0.
    x = torch.tensor([1 + 2**-4 + 2**-30, -(1 + 2**-4 + 2**-30), 1 + 2**-4 - 2**-30, 1e300, -1e300],
                     dtype=torch.float64)
    y = F.quantize_float(x, 4, 3)
    assert y.tolist() == [1.125, -1.125, 1.0, 240.0, -240.0]
    y32 = F.quantize_float(x.float(), 4, 3)
    assert y32[0].item() == 1.0  # in float32 the input itself is the tie


def test_float64_float_format_matches_grid_reference_on_random_values():
    rng = np.random.default_rng(3)
    mags = np.exp2(rng.uniform(-12, 9, 20000)) * (1 + rng.uniform(-1e-12, 1e-12, 20000))
    x = mags * rng.choice([-1, 1], mags.size)
    grid = enumerate_grid(4, 3, 240.0)
    y = F.quantize_float(torch.from_numpy(x), 4, 3).numpy()
    np.testing.assert_array_equal(y, nearest_even(x, grid, 4, 3, 240.0))


def test_float64_gradient_beyond_float32_range():
    x = torch.tensor([1e300, 100.0, -1e300], dtype=torch.float64, requires_grad=True)
    F.quantize_float(x, 8, 7).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 0.0]


# ----------------------------------------------------------------------------- 3. empty and 0-dim

EMPTY_SHAPES = [(0,), (0, 3), (3, 0), (2, 0, 4)]


@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=str)
@pytest.mark.parametrize("fmt", ["int8", "uint4", "fixed8_4", "e4m3", "int4_channel", "int8_mse_channel"])
def test_empty_in_empty_out(shape, fmt):
    if fmt == "int4_channel":
        f = IntFormat(4, granularity="channel")
    elif fmt == "int8_mse_channel":
        f = IntFormat(8, granularity="channel", scale="mse")
    else:
        f = parse_format(fmt)
    x = torch.empty(shape, requires_grad=True)
    for axis in range(len(shape)):
        y = f.quantize(x, axis=axis)
        assert y.shape == x.shape and y.dtype == x.dtype
        y.sum().backward()
        assert x.grad.shape == x.shape


@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=str)
def test_empty_per_channel_functional(shape):
    x = torch.empty(shape)
    for axis in range(len(shape)):
        c = shape[axis]
        y = F.quantize_int(x, torch.ones(c), torch.zeros(c), -8, 7, axis=axis)
        assert y.shape == x.shape


def test_zero_dim_is_one_channel():
    x = torch.tensor(0.3)
    for axis in (0, -1):
        y = F.quantize_int(x, torch.tensor([0.25]), torch.tensor([0]), -8, 7, axis=axis)
        assert y.shape == () and y.item() == 0.25
    fmt = IntFormat(4, granularity="channel")
    scale, zp = fmt.qparams(x, axis=0)
    assert scale.shape == () and zp.shape == ()
    assert fmt.quantize(x, axis=0).item() == pytest.approx(0.3)
    assert fmt.quantize(x, axis=0).shape == ()


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: F.quantize_int(torch.tensor(0.3), torch.ones(1), 0, -8, 7, axis=1), "axis"),
        (lambda: F.quantize_int(torch.tensor(0.3), torch.ones(2), 0, -8, 7, axis=0), "one channel"),
        (lambda: F.quantize_int(torch.ones(2, 3), torch.ones(3), 0, -8, 7, axis=2), "axis"),
        (lambda: F.quantize_int(torch.ones(2, 3), torch.ones(3), 0, -8, 7, axis=0), "2 channels"),
        (lambda: F.quantize_int(torch.ones(3), torch.ones(3), 0, -8, 7), "need an axis"),
        (lambda: IntFormat(8, granularity="channel").quantize(torch.ones(2, 3), axis=2), "axis"),
    ],
    ids=["0dim_axis1", "0dim_two_scales", "axis_out_of_range", "channel_mismatch", "no_axis", "format_axis"],
)
def test_bad_axis_or_scale_shape_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ----------------------------------------------------------------------------- 4. scales

@pytest.mark.parametrize("scale", [math.inf, -math.inf, math.nan, 0.0, -0.5, 1e300, 1e-50],
                         ids=["inf", "-inf", "nan", "zero", "negative", "over_float32", "under_float32"])
def test_bad_scale_raises_for_float32(scale):
    with pytest.raises(ValueError, match="scale must be positive and finite in float32"):
        F.quantize_int(torch.ones(3), scale, 0, -8, 7)
    with pytest.raises(ValueError, match="scale must be positive and finite"):
        F.quantize_int(torch.ones(3), torch.tensor(scale, dtype=torch.float64), 0, -8, 7)


def test_scale_range_follows_input_precision():
    assert F.quantize_int(torch.ones(1, dtype=torch.float64), 1e300, 0, -8, 7).item() == 0.0
    assert F.quantize_int(torch.ones(1, dtype=torch.float64), 1e-300, 0, -8, 7).item() == 7e-300


@pytest.mark.parametrize("bad", [math.inf, 0.0, -1.0, math.nan])
def test_bad_per_channel_scale_or_zero_point_raises(bad):
    s = torch.tensor([0.5, bad])
    with pytest.raises(ValueError, match="scale must be positive"):
        F.quantize_int(torch.ones(2, 3), s, torch.zeros(2), -8, 7, axis=0)
    with pytest.raises(ValueError, match="scale must be positive"):
        IntFormat(8).quantize(torch.ones(2, 3), axis=0, qparams=(s, torch.zeros(2)))
    with pytest.raises(ValueError, match="zero_point finite"):
        F.quantize_int(torch.ones(3), 0.5, math.nan, -8, 7)


def test_formats_never_make_bad_scales_from_extreme_data():
    big = torch.finfo(torch.float32).max
    x = torch.tensor([-big, big, 1.0])
    for fmt in (IntFormat(8, signed=False, symmetric=False), IntFormat(2, scale="pow2"), IntFormat(8)):
        s, _ = fmt.qparams(x)
        assert torch.isfinite(s).all() and (s > 0).all()
        # The outputs may not be: the top code times the scale can round past float32's max.
        assert torch.isfinite(fmt.quantize(x)[2])


# ----------------------------------------------------------------------------- 5. float grids

@pytest.mark.parametrize("name", ["e1m0", "e1m1", "e1m2", "e1m23", "e0m3", "e9m0"])
def test_float_formats_without_a_grid_are_rejected(name):
    with pytest.raises(ValueError, match=r"2\.\.8"):
        parse_format(name)
    e, m = (int(v) for v in name[1:].split("m"))
    with pytest.raises(ValueError, match="2 <= exp <= 8"):
        F.quantize_float(torch.ones(3), e, m)


@pytest.mark.parametrize("exp,man,max_value", [(4, 3, 300.0), (4, 3, 449.0), (2, 1, 7.0), (4, 3, 2.0**9),
                                               (8, 7, 3.5e38)])
def test_max_value_off_the_grid_is_rejected(exp, man, max_value):
    with pytest.raises(ValueError, match="max_value"):
        FloatFormat(exp, man, max_value=max_value)
    with pytest.raises(ValueError, match="max_value"):
        F.quantize_float(torch.ones(2), exp, man, max_value=max_value)


def test_max_value_below_min_normal_needs_subnormals():
    assert FloatFormat(4, 3, max_value=2.0**-7).max_value == 2.0**-7
    with pytest.raises(ValueError, match="max_value"):
        FloatFormat(4, 3, max_value=2.0**-7, subnormals=False)


def enumerate_grid(exp: int, man: int, max_value: float, subnormals: bool = True) -> np.ndarray:
    """Every value of the format, sorted, from its definition (every exponent field, then cut at max_value)."""
    bias = 2 ** (exp - 1) - 1
    emin = 1 - bias
    m = np.arange(2**man, dtype=np.float64)
    pos = [np.ldexp(m, emin - man)] if subnormals else [np.zeros(1)]
    pos += [np.ldexp(2**man + m, e - man) for e in range(emin, 2**exp - bias)]
    pos = np.concatenate(pos)
    pos = pos[pos <= max_value]
    return np.unique(np.concatenate([-pos, pos]))


def on_grid(y: np.ndarray, exp: int, man: int, max_value: float, subnormals: bool = True) -> np.ndarray:
    """The membership rule: |y| is a multiple of its binade's step (the subnormal step below the normals)."""
    emin = 2 - 2 ** (exp - 1)
    a = np.abs(y.astype(np.float64))
    e = np.maximum(np.frexp(a)[1] - 1, emin)
    scaled = np.ldexp(a, man - e)
    ok = (scaled == np.floor(scaled)) & (a <= max_value)
    if not subnormals:
        ok &= (a == 0) | (a >= 2.0**emin)
    return ok


def nearest_even(x: np.ndarray, grid: np.ndarray, exp: int, man: int, max_value: float) -> np.ndarray:
    """Round to the nearest grid value; a tie goes to the neighbour that is an even multiple
    of the step in the binade of the smaller magnitude (IEEE ties-to-even for man >= 1; with
    no mantissa bits, where both neighbours' significands are 1, that is the larger one)."""
    xc = np.clip(x, -max_value, max_value)
    hi = np.clip(np.searchsorted(grid, xc), 1, grid.size - 1)
    lo_v, hi_v = grid[hi - 1], grid[hi]
    d_lo, d_hi = np.abs(xc - lo_v), np.abs(hi_v - xc)
    emin = 2 - 2 ** (exp - 1)
    small = np.minimum(np.abs(lo_v), np.abs(hi_v))
    step = np.ldexp(1.0, np.maximum(np.frexp(small)[1] - 1, emin) - man)
    hi_even = (np.abs(hi_v) / step) % 2 == 0
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & hi_even)
    return np.where(pick_hi, hi_v, lo_v)


def sweep(exp: int, man: int, max_value: float, grid: np.ndarray | None) -> np.ndarray:
    """Dense float32 sweep: log-spaced magnitudes over the whole range and past it, plus grid points and midpoints."""
    emin = 2 - 2 ** (exp - 1)
    lo = max(emin - man - 3, -149)
    hi = min(math.log2(max_value) + 2, 127.9)
    mags = np.exp2(np.linspace(lo, hi, 6001))
    parts = [mags, -mags, np.zeros(1), np.array([np.inf, -np.inf])]
    if grid is not None:
        parts += [grid, (grid[:-1] + grid[1:]) / 2]
    with np.errstate(over="ignore"):
        x = np.concatenate(parts).astype(np.float32)
    return x[np.isfinite(x) | np.isinf(x)]


ALL_EXMY = [f"e{e}m{m}" for e in range(2, 9) for m in range(24)] + ["e4m3", "e5m2", "e2m3", "e3m2", "e2m1",
                                                                      "fp16", "bf16"]
ENUMERABLE = 2**16  # positive values of a grid small enough to list


def grid_case(name: str, subnormals: bool = True):
    fmt = parse_format(name, subnormals=subnormals)
    listable = 2 ** (fmt.exp + fmt.man) <= ENUMERABLE
    grid = enumerate_grid(fmt.exp, fmt.man, fmt.max_value, subnormals) if listable else None
    return fmt, grid


def test_every_exmy_name_parse_format_accepts_is_covered():
    accepted = []
    for e in range(0, 12):
        for m in range(0, 30):
            try:
                parse_format(f"e{e}m{m}")
            except ValueError:
                continue
            accepted.append(f"e{e}m{m}")
    assert set(accepted) <= set(ALL_EXMY) and len(accepted) == 7 * 24


@pytest.mark.parametrize("subnormals", [True, False], ids=["sub", "nosub"])
@pytest.mark.parametrize("name", ALL_EXMY)
def test_every_output_is_on_the_format_grid(name, subnormals):
    fmt, grid = grid_case(name, subnormals)
    x = sweep(fmt.exp, fmt.man, fmt.max_value, grid)
    y = fmt.quantize(torch.from_numpy(x)).numpy().astype(np.float64)
    assert np.isfinite(y).all()
    if grid is not None:
        bad = ~np.isin(y, grid)
        assert not bad.any(), f"{name}: {x[bad][:5]} -> {y[bad][:5]} not on the grid"
        np.testing.assert_array_equal(on_grid(grid, fmt.exp, fmt.man, fmt.max_value, subnormals), True)
        if subnormals:  # nearest, ties to even (the no-subnormal rule is tested in test_functional)
            ref = nearest_even(x.astype(np.float64), grid, fmt.exp, fmt.man, fmt.max_value)
            np.testing.assert_array_equal(y, ref)
    else:
        bad = ~on_grid(y, fmt.exp, fmt.man, fmt.max_value, subnormals)
        assert not bad.any(), f"{name}: {x[bad][:5]} -> {y[bad][:5]} not on the grid"
    g = torch.Generator().manual_seed(0)
    ys = F.quantize_float(torch.from_numpy(x), fmt.exp, fmt.man, max_value=fmt.max_value, subnormals=subnormals,
                          rounding="stochastic", generator=g).numpy()
    assert on_grid(ys, fmt.exp, fmt.man, fmt.max_value, subnormals).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("name", ["e2m0", "e4m3", "e5m2", "e8m3", "e8m0", "e5m10", "bf16", "e8m23"])
def test_outputs_on_grid_and_finite_in_every_input_dtype(name, dtype):
    fmt = parse_format(name)
    info = torch.finfo(dtype)
    mv = min(fmt.max_value, float(info.max))
    x = torch.from_numpy(sweep(fmt.exp, fmt.man, mv, None).astype(np.float64)).to(dtype)
    x = torch.cat([x, torch.tensor([info.max, -info.max], dtype=dtype)])
    y = fmt.quantize(x)
    assert y.dtype == dtype and torch.isfinite(y).all()
    if fmt.man <= -math.log2(info.eps):  # the dtype holds every value of the grid
        assert on_grid(y.double().numpy(), fmt.exp, fmt.man, fmt.max_value).all()
    else:  # a grid finer than the dtype: the format's value, rounded once more to the dtype
        expected = fmt.quantize(x.double()).clamp(-info.max, info.max).to(dtype)
        assert torch.equal(y, expected)
