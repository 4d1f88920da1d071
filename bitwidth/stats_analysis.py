"""Quantization-error analysis on recorded samples: what each format would do to each layer's data.

Every figure is computed on a recorder's reservoir sample with the real quantizer of
:mod:`bitwidth.formats`. Integer formats take their scale from the recorded range of
the whole stream (its min and max, plus the sample for percentile/MSE scales), as
static calibration does; per-channel integer formats are analyzed per tensor.

>>> format_range(parse_format("fixed8_4"), -1.0, 1.0)
(0.0625, -8.0, 7.9375)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from torch import Tensor

from . import blocks as B
from .families import FAMILIES, make_format, needs_absmax
from .formats import (
    BLOCK_FORMATS,
    FORMAT_TYPES,
    FixedFormat,
    FloatFormat,
    Format,
    GroupIntFormat,
    IntFormat,
    MXFormat,
    NVFP4Format,
    parse_format,
)
from .predict import predict_min_bits  # the calibrated rule lives in predict.py; re-exported here

if TYPE_CHECKING:
    from .stats import Recorder

__all__ = ["analyze", "sweep", "predict_min_bits", "format_range", "resolve_format", "family_of", "block_effects"]

_METRICS = ["n_sample", "sqnr_db", "mse", "clip_frac", "flush_frac"]


def family_of(fmt: Format) -> str:
    """``int``, ``fixed``, ``float``, ``group_int``, ``mx`` or (NVFP4) ``block``.

    >>> family_of(parse_format("e4m3")), family_of(parse_format("mxfp4"))
    ('float', 'mx')
    """
    return {IntFormat: "int", FixedFormat: "fixed", FloatFormat: "float", GroupIntFormat: "group_int",
            MXFormat: "mx", NVFP4Format: "block"}[type(fmt)]


def _int_qparams(fmt: IntFormat, sample: Tensor, lo: float, hi: float) -> tuple[Tensor, Tensor]:
    ends = torch.tensor([lo, hi], dtype=torch.float32)
    # max/pow2 scales depend on the range only; percentile/MSE scales also on the data.
    return fmt.qparams(ends if fmt.scale in ("max", "pow2") else torch.cat([sample.float(), ends]))


def format_range(fmt: Format, lo: float, hi: float, sample: Tensor | None = None) -> tuple[float, float, float]:
    """``(step, smallest, largest)`` of ``fmt`` applied to data in ``[lo, hi]``.

    ``step`` is its smallest positive magnitude: anything below ``step / 2`` flushes to
    zero; values outside ``[smallest, largest]`` saturate.

    >>> format_range(parse_format("int4"), -7.0, 3.5)
    (1.0, -8.0, 7.0)
    """
    if isinstance(fmt, IntFormat):
        scale, zp = _int_qparams(fmt, torch.empty(0) if sample is None else sample, lo, hi)
        s, z = float(scale), float(zp)
        return s, (fmt.qmin - z) * s, (fmt.qmax - z) * s
    if isinstance(fmt, FixedFormat):
        return fmt.step, -(2.0 ** (fmt.bits - 1)) * fmt.step, fmt.max_value
    if isinstance(fmt, BLOCK_FORMATS):
        return _block_range(fmt, lo, hi)
    return fmt.step, -fmt.max_value, fmt.max_value


def _block_range(fmt: GroupIntFormat | MXFormat | NVFP4Format, lo: float, hi: float) -> tuple[float, float, float]:
    """The grid of the block holding ``lo`` and ``hi``: the coarsest one (blocks of smaller values are finer)."""
    ends = torch.tensor([lo, hi], dtype=torch.float32)
    scale = float(fmt.block_scales(ends)[0])
    if isinstance(fmt, GroupIntFormat):
        if fmt.symmetric:
            top = (2 ** (fmt.bits - 1) - 1) * scale
            return scale, -top, top
        return scale, min(lo, 0.0), max(hi, 0.0)  # the asymmetric grid spans the range
    if isinstance(fmt, NVFP4Format):
        return 0.5 * scale, -6.0 * scale, 6.0 * scale
    exp, man, top = B.MX_ELEMENTS[fmt.element]
    step = 2.0**-6 if fmt.element == "int8" else 2.0 ** (2 - 2 ** (exp - 1) - man)
    return step * scale, -top * scale, top * scale


def _error(fmt: Format, x: Tensor, lo: float, hi: float) -> dict[str, float]:
    """SQNR, MSE, clipped and flushed fractions of quantizing the sample ``x`` (1-d, finite)."""
    nan = math.nan
    if x.numel() == 0:
        return dict(zip(_METRICS, [0, nan, nan, nan, nan], strict=True))
    if isinstance(fmt, IntFormat):
        qp = _int_qparams(fmt, x, lo, hi)
        q = fmt.quantize(x, qparams=qp)
    else:
        q = fmt.quantize(x)
    _, smallest, largest = format_range(fmt, lo, hi, x)
    x64 = x.double()
    mse = float((q.double() - x64).square().mean())
    signal = float(x64.square().mean())
    sqnr = math.inf if mse == 0 else (10 * math.log10(signal / mse) if signal > 0 else nan)
    clip = float(((x > largest) | (x < smallest)).double().mean())
    flush = float(((q == 0) & (x != 0)).double().mean())
    return dict(zip(_METRICS, [x.numel(), sqnr, mse, clip, flush], strict=True))


def _as_formats(formats: str | Format | Iterable[str | Format]) -> list[Format]:
    items = [formats] if isinstance(formats, (str, *FORMAT_TYPES)) else list(formats)
    out = []
    for f in items:
        fmt = parse_format(f)
        if fmt is None:
            raise ValueError(f"analyze needs number formats (int8, fixed8_4, e4m3, …), got {f!r}")
        out.append(fmt)
    if not out:
        raise ValueError("analyze needs at least one format")
    return out


def _streams(recorder: Recorder, quantized: bool | None) -> pd.DataFrame:
    df = recorder.to_frame()
    return df if quantized is None else df[df["quantized"] == quantized]


def _key_cols(df: pd.DataFrame) -> list[str]:
    return [c for c in ("layer", "kind", "quantized", "step") if c in df.columns]


def _sample_of(recorder: Recorder, row: pd.Series) -> Tensor:
    step = int(row["step"]) if "step" in row.index else None
    return recorder.sample(row["layer"], row["kind"], quantized=bool(row["quantized"]), step=step)


def analyze(recorder: Recorder, formats: str | Format | Iterable[str | Format], *,
            quantized: bool | None = False) -> pd.DataFrame:
    """SQNR (dB), MSE, clipped and flushed-to-zero fractions per (layer, kind[, step], format).

    ``quantized`` picks the raw rows (default), the recorded quantized ones, or both (None).

    >>> import torch.nn as nn
    >>> from bitwidth.stats import record
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(64, 8))
    >>> with record(model, kinds="weight") as rec:
    ...     _ = model(torch.randn(2, 64))
    >>> df = analyze(rec, ["int8", "int4"])
    >>> df["format"].tolist(), bool(df.sqnr_db[0] > df.sqnr_db[1] + 18)
    (['int8', 'int4'], True)
    """
    fmts = _as_formats(formats)
    return _error_table(recorder, quantized, lambda row: [(fmt, family_of(fmt), fmt.bits) for fmt in fmts])


def _error_table(recorder: Recorder, quantized: bool | None,
                 formats_for: Callable[[pd.Series], list[tuple[Format, str, int]]]) -> pd.DataFrame:
    """One row per recorded stream and ``(format, family, bits)`` that ``formats_for(stream)`` gives."""
    streams = _streams(recorder, quantized)
    keys = _key_cols(streams)
    rows = []
    for _, row in streams.iterrows():
        x = _sample_of(recorder, row)
        for fmt, family, bits in formats_for(row):
            err = _error(fmt, x, row["min"], row["max"])
            rows.append({**row[keys].to_dict(), "format": fmt.name, "family": family, "bits": bits, **err})
    return pd.DataFrame(rows, columns=keys + ["format", "family", "bits"] + _METRICS)


def resolve_format(spec: str | Format | tuple[str, int], absmax: float) -> Format:
    """A format, or a ``(family, n)`` pair made for data of magnitude up to ``absmax``.

    Pairs follow :func:`bitwidth.families.make_format`: ``n`` is the family's searched
    integer, and ``fixed`` places its binary point where ``absmax`` just fits.

    >>> resolve_format(("fixed", 8), 3.0).name, resolve_format("int4", 1.0).name
    ('fixed8_5', 'int4')
    """
    if not isinstance(spec, tuple):
        return _as_formats(spec)[0]
    family, n = spec
    return make_format(family, n, **({"absmax": absmax} if needs_absmax(family) else {}))


def sweep(recorder: Recorder, family: str, candidates: Iterable[int], **options: Any) -> pd.DataFrame:
    """Error of each candidate of one format family on each raw (layer, kind[, step]).

    ``candidates`` are the family's searched integers and ``options`` its fixed fields,
    exactly as the search builds formats (:func:`bitwidth.families.make_format`); the
    ``fixed`` family takes each stream's recorded absmax. Columns as :func:`analyze`,
    with ``bits`` the candidate and ``format`` the format it made.

    >>> import torch.nn as nn
    >>> from bitwidth.stats import record
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(64, 8))
    >>> with record(model, kinds="weight") as rec:
    ...     _ = model(torch.randn(2, 64))
    >>> sweep(rec, "fixed", [4, 8])[["bits", "format"]].values.tolist()
    [[4, 'fixed4_5'], [8, 'fixed8_9']]
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    ns = sorted(set(candidates))
    if not ns or not all(isinstance(b, int) and not isinstance(b, bool) for b in ns):
        raise ValueError(f"candidates must be integers, got {candidates!r}")

    def formats_for(row: pd.Series) -> list[tuple[Format, str, int]]:
        extra = {"absmax": float(row["absmax"]) if row["count"] else 0.0} if needs_absmax(family) else {}
        return [(make_format(family, n, **extra, **options), family, n) for n in ns]

    return _error_table(recorder, False, formats_for)


_BLOCK_COLUMNS = ["format", "n_blocks", "flush_frac", "scale_log2_lo", "scale_log2_mid", "scale_log2_hi",
                  "spread_octaves"]


def block_effects(recorder: Recorder, formats: str | Format | Iterable[str | Format], *,
                  quantized: bool | None = False) -> pd.DataFrame:
    """What block formats do inside their blocks, per recorded (layer, kind[, step]) and format.

    ``flush_frac``: the fraction of nonzero values that become zero (small values in a
    block whose scale a large one sets); ``scale_log2_lo/mid/hi``: the 5th, 50th and 95th
    percentiles of log2 of the per-block scales, ``spread_octaves`` their distance. Blocks
    are consecutive values of the recorded sample, that is random values of the layer:
    they show its distribution, not the neighbour structure of the real tensor (a weight
    whose channels differ in scale spreads more than this).

    >>> import torch.nn as nn
    >>> from bitwidth.stats import record
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(64, 8))
    >>> with record(model, kinds="weight") as rec:
    ...     _ = model(torch.randn(2, 64))
    >>> df = block_effects(rec, ["mxfp4", "int4_g32"])
    >>> df["format"].tolist(), bool((df["flush_frac"] < 0.2).all())
    (['mxfp4', 'int4_g32'], True)
    """
    fmts = _as_formats(formats)
    bad = [f.name for f in fmts if not isinstance(f, BLOCK_FORMATS)]
    if bad:
        raise ValueError(f"block_effects needs block formats (int4_g128, mxfp4, nvfp4, …), got {bad}")
    streams = _streams(recorder, quantized)
    keys = _key_cols(streams)
    rows = []
    for _, row in streams.iterrows():
        x = _sample_of(recorder, row).float()
        for fmt in fmts:
            rows.append({**row[keys].to_dict(), **_block_row(fmt, x)})
    return pd.DataFrame(rows, columns=keys + _BLOCK_COLUMNS)


def _block_row(fmt: GroupIntFormat | MXFormat | NVFP4Format, x: Tensor) -> dict[str, Any]:
    nan = math.nan
    if x.numel() == 0:
        return dict(zip(_BLOCK_COLUMNS, [fmt.name, 0, nan, nan, nan, nan, nan], strict=True))
    q = fmt.quantize(x)
    nonzero = x != 0
    flush = float(((q == 0) & nonzero).sum() / nonzero.sum()) if bool(nonzero.any()) else 0.0
    scales = fmt.block_scales(x)
    # all-zero blocks have no meaningful scale (group-wise integers give them 1)
    live = scales[torch.nn.functional.pad(x.abs(), (0, -x.numel() % fmt.block)).reshape(-1, fmt.block).amax(1) > 0]
    if live.numel() == 0:
        return dict(zip(_BLOCK_COLUMNS, [fmt.name, scales.numel(), flush, nan, nan, nan, nan], strict=True))
    lo, mid, hi = torch.quantile(live.double().log2(), torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)).tolist()
    return dict(zip(_BLOCK_COLUMNS, [fmt.name, scales.numel(), flush, lo, mid, hi, hi - lo], strict=True))

