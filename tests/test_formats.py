"""Format objects: names, parsing, errors, and how IntFormat chooses its scale from data."""

import math

import pytest
import torch

import bitwidth as bw
from bitwidth.formats import FixedFormat, FloatFormat, IntFormat, format_from_dict, format_to_dict, parse_format


@pytest.mark.parametrize(
    "name,cls,bits",
    [("int2", IntFormat, 2), ("int32", IntFormat, 32), ("uint4", IntFormat, 4), ("fixed16_8", FixedFormat, 16),
     ("e3m4", FloatFormat, 8), ("e4m3", FloatFormat, 8), ("e2m1", FloatFormat, 4), ("fp16", FloatFormat, 16),
     ("bf16", FloatFormat, 16), ("E5M2", FloatFormat, 8)],
)
def test_parse_names(name, cls, bits):
    fmt = parse_format(name)
    assert isinstance(fmt, cls) and fmt.bits == bits
    assert parse_format(fmt.name) == fmt  # names round-trip


@pytest.mark.parametrize("name,max_value", [("e4m3", 448.0), ("e5m2", 57344.0), ("e2m3", 7.5), ("e3m2", 28.0),
                                            ("e2m1", 6.0), ("fp16", 65504.0), ("e3m4", 15.5), ("e4m4", 248.0)])
def test_ocp_and_ieee_maxima(name, max_value):
    assert parse_format(name).max_value == max_value
    assert parse_format(name).quantize(torch.tensor([1e6])).item() == max_value


@pytest.mark.parametrize("name", ["fp32", "none", "FP32"])
def test_full_precision_is_none(name):
    assert parse_format(name) is None


@pytest.mark.parametrize("bad,match", [("int1", "2..32"), ("int33", "2..32"), ("float8", "allowed forms"),
                                       ("e9m2", "2..8"), ("e1m1", "2..8"), ("e1m0", "2..8"), ("e4m30", "0..23"),
                                       ("fixed1_0", "2..32"), ("", "allowed")])
def test_bad_names_raise_with_allowed_forms(bad, match):
    with pytest.raises(ValueError, match=match):
        parse_format(bad)


def test_bad_options_raise():
    with pytest.raises(ValueError, match="rounding must be one of"):
        parse_format("int8", rounding="up")
    with pytest.raises(ValueError, match="scale must be one of"):
        IntFormat(8, scale="minmax")
    with pytest.raises(ValueError, match="bad option"):
        parse_format("int8", bogus=1)
    with pytest.raises(ValueError, match="max_value"):
        FloatFormat(4, 3, max_value=-1.0)


def test_dict_round_trip_keeps_every_option():
    for fmt in [IntFormat(4, signed=False, symmetric=False, scale="mse", rounding="stochastic"),
                FixedFormat(12, 6, "stochastic"), FloatFormat(4, 3, 448.0, subnormals=False)]:
        assert format_from_dict(format_to_dict(fmt)) == fmt


def test_max_scale_maps_absmax_to_top_code():
    x = torch.tensor([-3.0, 0.5, 1.5])
    scale, zp = IntFormat(4).qparams(x)
    assert scale.item() == pytest.approx(3.0 / 7) and zp.item() == 0
    assert IntFormat(4).quantize(x).abs().max().item() == pytest.approx(3.0)


def test_pow2_scale_is_power_of_two_covering_the_range():
    x = torch.randn(1000) * 5
    scale, _ = IntFormat(8, scale="pow2").qparams(x)
    max_scale, _ = IntFormat(8).qparams(x)
    assert math.log2(scale.item()).is_integer() and max_scale <= scale < 2 * max_scale


def test_percentile_scale_ignores_outliers():
    x = torch.cat([torch.randn(100000), torch.tensor([1000.0])])
    s_max, _ = IntFormat(8).qparams(x)
    s_pct, _ = IntFormat(8, scale="percentile", percentile=99.9).qparams(x)
    expected = torch.quantile(x.abs()[:50000], 0.999) / 127  # a 3.3-sigma point, not the outlier
    assert s_pct < s_max / 100 and s_pct == pytest.approx(expected.item(), rel=0.05)


def test_mse_scale_never_worse_than_max():
    torch.manual_seed(0)
    x = torch.distributions.Laplace(0, 1).sample((20000,))
    for bits in (2, 3, 4, 6):
        err_max = (IntFormat(bits).quantize(x) - x).pow(2).mean()
        err_mse = (IntFormat(bits, scale="mse").quantize(x) - x).pow(2).mean()
        assert err_mse <= err_max
    err3 = (IntFormat(3).quantize(x) - x).pow(2).mean()
    assert (IntFormat(3, scale="mse").quantize(x) - x).pow(2).mean() < 0.8 * err3


def test_asymmetric_unsigned_covers_range_and_keeps_zero():
    x = torch.tensor([-0.2, 0.0, 0.3, 5.0])
    fmt = IntFormat(8, signed=False, symmetric=False)
    y = fmt.quantize(x)
    assert y[1].item() == 0.0
    assert y[0].item() == pytest.approx(-0.2, abs=0.011) and y[3].item() == pytest.approx(5.0, abs=0.011)


def test_unsigned_symmetric_clips_negatives():
    y = IntFormat(4, signed=False).quantize(torch.tensor([-1.0, 0.5, 3.0]))
    assert y.tolist() == [0.0, pytest.approx(0.4), 3.0]  # 0.5 / 0.2 = 2.5 rounds to even


def test_per_channel_scale_per_row():
    w = torch.stack([torch.linspace(-1, 1, 9), torch.linspace(-10, 10, 9)])
    fmt = IntFormat(4, granularity="channel")
    scale, _ = fmt.qparams(w, axis=0)
    assert scale.tolist() == pytest.approx([1 / 7, 10 / 7])
    y = fmt.quantize(w, axis=0)
    assert torch.allclose(y[0], IntFormat(4).quantize(w[0])) and torch.allclose(y[1], IntFormat(4).quantize(w[1]))


def test_nan_and_inf_do_not_set_the_scale():
    x = torch.tensor([float("nan"), float("inf"), 1.0, -2.0])
    scale, _ = IntFormat(8).qparams(x)
    assert scale.item() == pytest.approx(2 / 127)
    y = IntFormat(8).quantize(x)
    assert y[0].isnan() and y[1].item() == pytest.approx(2.0) and y[3].item() == pytest.approx(-2.0)


def test_public_api_exports():
    for name in ["parse_format", "IntFormat", "FixedFormat", "FloatFormat", "QuantSpec", "wrap", "unwrap",
                 "set_plan", "plan_of", "calibrate"]:
        assert name in bw.__all__ and hasattr(bw, name)
