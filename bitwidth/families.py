"""Format families: which quantity of a format a search varies, as one integer.

A search walks one integer per (layer, kind); the family says what that integer means:

| family       | searched integer | fixed by options                                   |
| ------------ | ---------------- | -------------------------------------------------- |
| ``int``      | total bits       | ``signed``, ``scale``, ``granularity``, ``rounding``… |
| ``fixed``    | word length      | ``frac`` chosen from the layer's ``absmax``        |
| ``fixed_frac`` | fraction bits  | word length ``word`` (default 16)                  |
| ``float``    | mantissa bits    | exponent width ``exp`` (default 4)                 |
| ``float_exp`` | exponent bits   | mantissa width ``man`` (default 3)                 |

Costs always use the format's total width (``fmt.bits``), whatever the family searches.

>>> make_format("int", 4).name, make_format("fixed", 8, absmax=3.0).name, make_format("float", 2, exp=5).name
('int4', 'fixed8_5', 'e5m2')
"""

from __future__ import annotations

import math
from typing import Any

from .formats import FixedFormat, FloatFormat, Format, IntFormat

__all__ = ["FAMILIES", "fixed_frac_for", "make_format", "needs_absmax"]

FAMILIES = ("int", "fixed", "fixed_frac", "float", "float_exp")


def fixed_frac_for(bits: int, absmax: float) -> int:
    """The most fraction bits a ``bits``-bit word can have and still hold ``absmax`` unclipped.

    That is the finest grid whose largest value ``(2**(bits-1) - 1) * 2**-frac`` reaches
    ``absmax``; an all-zero tensor gets the range [-1, 1).

    >>> fixed_frac_for(8, 0.9), fixed_frac_for(8, 1.0), fixed_frac_for(16, 100.0), fixed_frac_for(4, 3.7)
    (7, 6, 8, 0)
    """
    if not math.isfinite(absmax) or absmax < 0:
        raise ValueError(f"absmax must be a finite number >= 0, got {absmax!r}")
    if not isinstance(bits, int) or bits < 2:
        raise ValueError(f"fixed-point word length must be an integer >= 2 (a sign and one more bit), got {bits!r}")
    top = 2 ** (bits - 1) - 1
    if absmax == 0:
        return bits - 1
    frac = math.floor(math.log2(top / absmax))
    # log2 may round across an integer: settle on the exact boundary.
    while top * 2.0**-frac < absmax:
        frac -= 1
    while top * 2.0 ** -(frac + 1) >= absmax:
        frac += 1
    return max(-32, min(64, frac))


def needs_absmax(family: str) -> bool:
    """Whether ``make_format(family, ...)`` needs the data's ``absmax``.

    >>> needs_absmax("fixed"), needs_absmax("int")
    (True, False)
    """
    _check_family(family)
    return family == "fixed"


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown format family {family!r}; allowed: {', '.join(FAMILIES)}")


def make_format(family: str, bits: int, **options: Any) -> Format:
    """The format of ``family`` whose searched integer is ``bits``; other options pass through.

    >>> make_format("int", 3, rounding="stochastic").rounding
    'stochastic'
    >>> make_format("fixed_frac", 6, word=12).name, make_format("float_exp", 5, man=2).name
    ('fixed12_6', 'e5m2')
    """
    _check_family(family)
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise ValueError(f"bits must be an integer, got {bits!r}")  # noqa: TRY004  # config errors are ValueErrors
    opts = dict(options)
    try:
        if family == "int":
            return IntFormat(bits, **opts)
        if family == "fixed":
            if "absmax" not in opts:
                raise ValueError("family 'fixed' chooses frac from the data: pass absmax=<the layer's max |x|>")
            return FixedFormat(bits, fixed_frac_for(bits, float(opts.pop("absmax"))), **opts)
        if family == "fixed_frac":
            return FixedFormat(int(opts.pop("word", 16)), bits, **opts)
        if family == "float":
            return FloatFormat(int(opts.pop("exp", 4)), bits, **opts)
        return FloatFormat(bits, int(opts.pop("man", 3)), **opts)
    except TypeError as err:  # an option the family's format does not have
        raise ValueError(f"bad option for family {family!r}: {err}") from None
