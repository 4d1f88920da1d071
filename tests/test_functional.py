"""Numerics of the pure quantizers against independent references.

Float formats against ml_dtypes casts (every representable value, every midpoint,
random values over the whole range); fp16/bf16 against torch's own casts; integer
against torch's fake-quant ops; fixed point against a reference formula kept here.
"""

import math

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitwidth import functional as F
from bitwidth.formats import parse_format

# name -> (exp, man, max_value, ml_dtypes type)
FLOATS = {
    "e4m3": (4, 3, 448.0, ml_dtypes.float8_e4m3fn),
    "e5m2": (5, 2, 57344.0, ml_dtypes.float8_e5m2),
    "e4m3_ieee": (4, 3, None, ml_dtypes.float8_e4m3),
    "e3m4": (3, 4, None, ml_dtypes.float8_e3m4),
    "e2m3": (2, 3, 7.5, ml_dtypes.float6_e2m3fn),
    "e3m2": (3, 2, 28.0, ml_dtypes.float6_e3m2fn),
    "e2m1": (2, 1, 6.0, ml_dtypes.float4_e2m1fn),
    "bf16": (8, 7, None, ml_dtypes.bfloat16),
    "fp16": (5, 10, None, np.float16),
}


def representable(dtype) -> np.ndarray:
    """Every finite value of an ml_dtypes type (from all its bit patterns), sorted, as float32."""
    nbytes = np.dtype(dtype).itemsize
    codes = np.arange(2 ** (8 * nbytes), dtype=f"u{nbytes}")
    vals = codes.view(dtype).astype(np.float32)
    return np.unique(vals[np.isfinite(vals)])


def reference_cast(x: np.ndarray, dtype, max_value: float) -> np.ndarray:
    """ml_dtypes RNE cast; values beyond max saturate (ml_dtypes gives inf/NaN there)."""
    with np.errstate(over="ignore"):
        y = x.astype(dtype).astype(np.float32)
    over = np.abs(x) > max_value
    y[over] = np.sign(x[over]) * max_value
    return y


@pytest.mark.parametrize("name", FLOATS)
def test_float_matches_ml_dtypes_on_grid_midpoints_and_random(name):
    exp, man, max_value, dtype = FLOATS[name]
    mv = max_value if max_value is not None else float(ml_dtypes.finfo(dtype).max)
    grid = representable(dtype)
    grid = grid[np.abs(grid) <= mv]
    mids = (grid[:-1].astype(np.float64) + grid[1:]) / 2  # every tie
    rng = np.random.default_rng(0)
    # random magnitudes log-uniform over the whole range, both signs, plus values past max
    lo = math.log2(float(ml_dtypes.finfo(dtype).smallest_subnormal)) - 2
    mags = np.exp2(rng.uniform(lo, min(math.log2(mv) + 1, 126), 20000))
    rand = mags * rng.choice([-1, 1], mags.size)
    x = np.concatenate([grid, mids, rand]).astype(np.float32)
    ours = F.quantize_float(torch.from_numpy(x), exp, man, max_value=max_value).numpy()
    ref = reference_cast(x, dtype, mv)
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(np.signbit(ours[ours == 0]), np.signbit(x[ours == 0]))


@pytest.mark.parametrize("name,cast", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_fp16_bf16_match_torch_casts(name, cast):
    fmt = parse_format(name)
    x = torch.randn(100000) * torch.exp2(torch.randint(-30, 15, (100000,)).float())
    expected = x.to(cast).float()
    finite = expected.isfinite()
    assert torch.equal(fmt.quantize(x)[finite], expected[finite])


@pytest.mark.parametrize("exp,man,expected", [(4, 3, 240.0), (3, 4, 15.5), (5, 2, 57344.0), (2, 1, 3.0)])
def test_default_max_value_is_ieee_style(exp, man, expected):
    assert F.float_max_value(exp, man) == expected
    assert F.quantize_float(torch.tensor([1e9]), exp, man).item() == expected


def test_float_without_subnormals_rounds_to_zero_or_min_normal():
    x = torch.tensor([0.0, 0.004, 0.0078125, 0.0079, 0.012, 0.015625, -0.012])
    y = F.quantize_float(x, 4, 3, subnormals=False)  # min normal 2^-6 = 0.015625
    assert y.tolist() == [0.0, 0.0, 0.0, 0.015625, 0.015625, 0.015625, -0.015625]


def test_nan_stays_nan_and_inf_saturates():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0])
    for y in (
        F.quantize_float(x, 4, 3),
        F.quantize_fixed(x, 8, 4),
        F.quantize_int(x, 0.1, 0, -128, 127),
    ):
        assert torch.isnan(y[0]) and y[1] > 0 and y[2] < 0 and torch.isfinite(y[1:]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_same_shape_and_dtype(dtype):
    x = torch.randn(3, 4, 5).to(dtype)
    for y in (F.quantize_float(x, 4, 3), F.quantize_fixed(x, 8, 4), F.quantize_int(x, 0.1, 0, -8, 7)):
        assert y.shape == x.shape and y.dtype == dtype


# ----------------------------------------------------------------------------- integer

@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8], ids=lambda b: f"int{b}")
@pytest.mark.parametrize("zp", [0, 1])
def test_int_per_tensor_matches_torch_fake_quant(bits, zp):
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    x = torch.randn(50000) * 3
    scale = 0.37  # x/scale and x*(1/scale) can differ only at ties; random data has none
    ours = F.quantize_int(x, scale, zp, qmin, qmax)
    ref = torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax)
    codes_ours = torch.round(ours / scale)
    codes_ref = torch.round(ref / scale)
    assert (codes_ours != codes_ref).sum() == 0


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_int_per_channel_matches_torch_and_gradient_matches(bits):
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    x = (torch.randn(6, 5, 7) * 2).requires_grad_()
    scale = torch.rand(5) * 0.5 + 0.05
    zp = torch.randint(qmin, qmax + 1, (5,), dtype=torch.int32)
    ours = F.quantize_int(x, scale, zp, qmin, qmax, axis=1)
    ref = torch.fake_quantize_per_channel_affine(x, scale, zp, 1, qmin, qmax)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    g = torch.randn_like(x)
    (gx,) = torch.autograd.grad(ours, x, g)
    (gref,) = torch.autograd.grad(ref, x, g)
    assert torch.equal(gx, gref)  # STE: passes in range, zero where clipped


def test_int_ties_round_half_to_even():
    y = F.quantize_int(torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5]), 1.0, 0, -8, 7)
    assert y.tolist() == [0.0, 2.0, 2.0, -0.0, -2.0]


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="rounding"):
        F.quantize_fixed(torch.zeros(2), 8, 4, rounding="up")
    with pytest.raises(ValueError, match="qmin"):
        F.quantize_int(torch.zeros(2), 1.0, 0, 5, 5)
    with pytest.raises(ValueError, match="exp"):
        F.quantize_float(torch.zeros(2), 9, 3)


# ----------------------------------------------------------------------------- fixed point

def fixed_reference(x: np.ndarray, bits: int, frac: int) -> np.ndarray:
    """Q-format by the textbook formula, in float64 numpy."""
    step = 2.0**-frac
    lo, hi = -(2 ** (bits - 1)) * step, (2 ** (bits - 1) - 1) * step
    return np.clip(np.round(x.astype(np.float64) / step) * step, lo, hi)  # np.round is half-even


@pytest.mark.parametrize("bits,frac", [(4, 2), (8, 4), (8, 7), (12, 0), (16, 8), (16, 14), (8, -2)])
def test_fixed_matches_reference_formula(bits, frac):
    rng = np.random.default_rng(bits * 100 + frac)
    step = 2.0**-frac
    grid = np.arange(-(2 ** (bits - 1)) - 3, 2 ** (bits - 1) + 3) * step
    x = np.concatenate([grid, grid + step / 2, rng.normal(0, 2 ** (bits - 1 - frac), 20000)]).astype(np.float32)
    ours = F.quantize_fixed(torch.from_numpy(x), bits, frac).numpy()
    np.testing.assert_array_equal(ours, fixed_reference(x, bits, frac).astype(np.float32))


def test_fixed_gradient_is_straight_through_and_zero_when_saturated():
    x = torch.tensor([0.3, 7.9, 8.5, -8.0, -8.2], requires_grad=True)  # fixed8_4: range [-8, 7.9375]
    F.quantize_fixed(x, 8, 4).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 1.0, 0.0]


def test_float_gradient_zero_beyond_max_value():
    x = torch.tensor([1.0, 300.0, -500.0], requires_grad=True)
    F.quantize_float(x, 4, 3).sum().backward()  # max 240
    assert x.grad.tolist() == [1.0, 0.0, 0.0]


# ----------------------------------------------------------------------------- stochastic rounding

QUANTIZERS = {
    "int": lambda x, **kw: F.quantize_int(x, 0.25, 0, -128, 127, **kw),
    "fixed": lambda x, **kw: F.quantize_fixed(x, 8, 2, **kw),
    "float": lambda x, **kw: F.quantize_float(x, 4, 3, **kw),
}


@pytest.mark.parametrize("kind", QUANTIZERS)
def test_stochastic_rounding_unbiased_on_grid_reproducible(kind):
    q = QUANTIZERS[kind]
    x = torch.full((200000,), 1.3)  # between grid points in every format here
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    y1 = q(x, rounding="stochastic", generator=g1)
    y2 = q(x, rounding="stochastic", generator=g2)
    assert torch.equal(y1, y2)
    values = y1.unique()
    assert values.numel() == 2  # only the two grid neighbours of 1.3
    lo, hi = values.tolist()
    assert lo < 1.3 < hi and lo == q(torch.tensor([lo])).item() and hi == q(torch.tensor([hi])).item()
    assert abs(y1.mean().item() - 1.3) < 3 * (hi - lo) / math.sqrt(x.numel())


def test_stochastic_rounding_keeps_grid_values_exact():
    x = torch.tensor([0.25, -1.5, 3.0])
    assert torch.equal(F.quantize_fixed(x, 8, 2, rounding="stochastic"), x)


# ----------------------------------------------------------------------------- properties

finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)
FORMATS = ["int4", "int8", "uint4", "fixed8_4", "fixed16_8", "e4m3", "e5m2", "e3m4", "e2m1", "bf16", "fp16"]


@settings(max_examples=60, deadline=None)
@given(st.lists(finite, min_size=1, max_size=64), st.sampled_from(FORMATS))
def test_idempotent_and_monotone(values, name):
    fmt = parse_format(name)
    x = torch.tensor(values, dtype=torch.float32)
    if fmt.__class__.__name__ == "IntFormat":
        scale_zp = fmt.qparams(x)
        y = fmt.quantize(x, qparams=scale_zp)
        assert torch.equal(fmt.quantize(y, qparams=scale_zp), y)
    else:
        y = fmt.quantize(x)
        assert torch.equal(fmt.quantize(y), y)
    order = torch.argsort(x)
    assert (y[order].diff() >= 0).all()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-7.5, 7.5, allow_nan=False, width=32), min_size=1, max_size=64), st.integers(3, 12))
def test_error_at_most_half_step_and_more_bits_never_worse(values, frac):
    x = torch.tensor(values, dtype=torch.float32)
    # fixed point with 4 integer bits covers [-8, 8): inside the range the error is <= step/2
    y = F.quantize_fixed(x, 4 + frac, frac)
    assert ((y - x).abs() <= 2.0 ** (-frac - 1)).all()
    # one more fraction bit refines the grid, so the error never grows
    y2 = F.quantize_fixed(x, 5 + frac, frac + 1)
    assert ((y2 - x).abs() <= (y - x).abs() + 1e-7).all()
    for man in range(1, 6):
        a = F.quantize_float(x, 4, man)
        b = F.quantize_float(x, 4, man + 1)
        assert ((b - x).abs() <= (a - x).abs()).all()
