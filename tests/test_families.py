"""Format families: the searched integer of each family, and the options that pass through."""

from __future__ import annotations

import pytest
import torch

from bitwidth.families import FAMILIES, fixed_frac_for, make_format, needs_absmax
from bitwidth.formats import FixedFormat, FloatFormat, IntFormat


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
def test_each_family_varies_its_own_quantity(bits):
    assert make_format("int", bits) == IntFormat(bits)
    assert make_format("fixed_frac", bits, word=20) == FixedFormat(20, bits)
    assert make_format("float", bits, exp=5) == FloatFormat(5, bits)
    assert make_format("float_exp", min(bits, 8), man=2) == FloatFormat(min(bits, 8), 2)
    fixed = make_format("fixed", bits, absmax=5.0)
    assert fixed.bits == bits and fixed.max_value >= 5.0 > FixedFormat(bits, fixed.frac + 1).max_value


@pytest.mark.parametrize("absmax", [1e-3, 0.49, 0.5, 0.9, 1.0, 3.7, 100.0, 4096.0])
@pytest.mark.parametrize("bits", [4, 8, 16])
def test_fixed_frac_holds_absmax_without_clipping_and_no_coarser_than_needed(bits, absmax):
    frac = fixed_frac_for(bits, absmax)
    fmt = FixedFormat(bits, frac)
    assert fmt.max_value >= absmax or frac == -32
    # One fraction bit more would clip absmax: the choice is the finest grid that fits.
    assert FixedFormat(bits, frac + 1).max_value < absmax
    assert fmt.quantize(torch.tensor([absmax])).item() == pytest.approx(absmax, abs=fmt.step / 2)


def test_fixed_of_all_zeros_and_bad_absmax():
    assert fixed_frac_for(8, 0.0) == 7
    with pytest.raises(ValueError, match="absmax"):
        fixed_frac_for(8, float("nan"))
    with pytest.raises(ValueError, match="absmax"):
        make_format("fixed", 8)


def test_options_pass_through_and_bad_ones_name_the_family():
    fmt = make_format("int", 4, rounding="stochastic", granularity="channel", scale="pow2")
    assert (fmt.rounding, fmt.granularity, fmt.scale) == ("stochastic", "channel", "pow2")
    assert make_format("fixed", 8, absmax=1.0, rounding="stochastic").rounding == "stochastic"
    assert make_format("float", 3, exp=4, max_value=448.0).max_value == 448.0
    with pytest.raises(ValueError, match="bad option for family 'float'"):
        make_format("float", 3, granularity="channel")
    with pytest.raises(ValueError, match="allowed: int, fixed, fixed_frac, float, float_exp"):
        make_format("posit", 8)
    with pytest.raises(ValueError, match="integer"):
        make_format("int", 4.0)
    assert [f for f in FAMILIES if needs_absmax(f)] == ["fixed"]
