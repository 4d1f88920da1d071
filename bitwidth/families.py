"""Format families: which quantity of a format a search varies, as one integer.

A search walks one integer per (layer, kind); the family says what that integer means:

| family       | searched integer | fixed by options                                   |
| ------------ | ---------------- | -------------------------------------------------- |
| ``int``      | total bits       | ``signed``, ``scale``, ``granularity``, ``rounding``… |
| ``fixed``    | word length      | ``frac`` chosen from the layer's ``absmax``        |
| ``fixed_frac`` | fraction bits  | word length ``word`` (default 16)                  |
| ``float``    | mantissa bits    | exponent width ``exp`` (default 4)                 |
| ``float_exp`` | exponent bits   | mantissa width ``man`` (default 3)                 |
| ``group_int`` | integer bits    | ``block`` (default 128), ``symmetric``, ``scale_dtype`` |
| ``mx``       | element bits: 4, 6 or 8 | ``fp6`` (e2m3 or e3m2), ``fp8`` (e4m3, e5m2 or int8), ``block`` |
| ``block``    | scales per 256 values: block = 256 // n | ``format`` (default ``mxfp4``) and its options |

``mx`` walks mxfp4 → mxfp6 → mxfp8 (candidates ``[4, 6, 8]``). ``block`` searches the
block size of a block format at fixed element bits; its integer grows with precision, as
every family's must for the search to find a minimum: 1 → block 256, 2 → 128, 4 → 64,
8 → 32, 16 → 16, 32 → 8 (candidates powers of two in 1..32). Given ``symmetric`` or
``scale_dtype`` and no ``format``, its base is ``int4_g128``.

Costs use the format's storage width (``fmt.storage_bits``: element bits plus block
scales), whatever the family searches.

>>> make_format("int", 4).name, make_format("fixed", 8, absmax=3.0).name, make_format("float", 2, exp=5).name
('int4', 'fixed8_5', 'e5m2')
>>> make_format("group_int", 3).name, make_format("mx", 6, fp6="e3m2").name
('int3_g128', 'mxfp6_e3m2')
>>> make_format("block", 16, format="int4_g128").name, make_format("block", 1).name
('int4_g16', 'mxfp4_b256')
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from .formats import BLOCK_FORMATS, FixedFormat, FloatFormat, Format, GroupIntFormat, IntFormat, MXFormat, parse_format

__all__ = ["BLOCK_FAMILIES", "FAMILIES", "fixed_frac_for", "make_format", "needs_absmax"]

FAMILIES = ("int", "fixed", "fixed_frac", "float", "float_exp", "group_int", "mx", "block")
BLOCK_FAMILIES = ("group_int", "mx", "block")  # families of block-scaled formats
_MX_ELEMENTS = {4: ("e2m1",), 6: ("e2m3", "e3m2"), 8: ("e4m3", "e5m2", "int8")}  # the first is the default
_BLOCK_SPAN = 256  # the block family's integer counts scales per this many values


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
        if family == "float_exp":
            return FloatFormat(bits, int(opts.pop("man", 3)), **opts)
        if family == "group_int":
            return GroupIntFormat(bits, **opts)
        if family == "mx":
            return _mx_format(bits, opts)
        return _block_format(bits, opts)
    except TypeError as err:  # an option the family's format does not have
        raise ValueError(f"bad option for family {family!r}: {err}") from None


def _mx_format(bits: int, opts: dict[str, Any]) -> MXFormat:
    if bits not in _MX_ELEMENTS:
        raise ValueError(f"family 'mx' searches element widths {tuple(_MX_ELEMENTS)} (mxfp4, mxfp6, mxfp8), got {bits}")
    if "element" in opts:
        raise ValueError("family 'mx' picks the element from the searched width: set fp6 or fp8 instead of element")
    fp6, fp8 = opts.pop("fp6", "e2m3"), opts.pop("fp8", "e4m3")
    for key, value in (("fp6", fp6), ("fp8", fp8)):
        allowed = _MX_ELEMENTS[int(key[2])]
        if value not in allowed:
            raise ValueError(f"{key} must be one of {allowed}, got {value!r}")
    return MXFormat({4: "e2m1", 6: fp6, 8: fp8}[bits], **opts)


def _block_format(n: int, opts: dict[str, Any]) -> Format:
    if n < 1 or n > 32 or n & (n - 1):
        raise ValueError(f"family 'block' searches scales per {_BLOCK_SPAN} values, a power of two in 1..32 "
                         f"(block {_BLOCK_SPAN}..{_BLOCK_SPAN // 32}), got {n}")
    if "block" in opts:
        raise ValueError("family 'block' searches the block size: drop the block option")
    # group-wise int options without a format mean a group-wise int base
    base = opts.pop("format", "int4_g128" if {"symmetric", "scale_dtype"} & set(opts) else "mxfp4")
    fmt = parse_format(base, **opts)
    if not isinstance(fmt, BLOCK_FORMATS):
        raise ValueError(f"family 'block' needs a block format (int4_g128, mxfp4, nvfp4, …), got format={base!r}")
    return dataclasses.replace(fmt, block=_BLOCK_SPAN // n)  # the searched block replaces the name's
