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

from .families import FAMILIES, make_format, needs_absmax
from .formats import FixedFormat, FloatFormat, Format, IntFormat, parse_format

if TYPE_CHECKING:
    from .stats import Recorder

__all__ = ["analyze", "sweep", "predict_min_bits", "format_range", "resolve_format", "family_of"]

_METRICS = ["n_sample", "sqnr_db", "mse", "clip_frac", "flush_frac"]


def family_of(fmt: Format) -> str:
    """``int``, ``fixed`` or ``float``.

    >>> family_of(parse_format("e4m3"))
    'float'
    """
    return {IntFormat: "int", FixedFormat: "fixed", FloatFormat: "float"}[type(fmt)]


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
    return fmt.step, -fmt.max_value, fmt.max_value


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
    items = [formats] if isinstance(formats, (str, IntFormat, FixedFormat, FloatFormat)) else list(formats)
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


def predict_min_bits(recorder: Recorder, family: str, candidates: Iterable[int], *,
                     sqnr_db: float = 30.0, **options: Any) -> pd.DataFrame:
    """The smallest candidate whose SQNR on the recorded sample reaches ``sqnr_db``.

    Formats as :func:`sweep` makes them. ``min_bits`` is missing (and ``format`` None)
    where no candidate meets the threshold; ``sqnr_db`` is then the best one reached.
    30 dB is about five bits of a uniform quantizer on a full-range signal (6.02 dB/bit).

    >>> import torch.nn as nn
    >>> from bitwidth.stats import record
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(64, 8))
    >>> with record(model, kinds="weight") as rec:
    ...     _ = model(torch.randn(2, 64))
    >>> predict_min_bits(rec, "int", range(2, 9), sqnr_db=30)[["layer", "min_bits", "format"]].values.tolist()
    [['0', 6, 'int6']]
    """
    sw = sweep(recorder, family, candidates, **options)
    keys = [c for c in ("layer", "kind", "quantized", "step") if c in sw.columns]
    rows = []
    for _, g in sw.groupby(keys, sort=False):
        ok = g[g["sqnr_db"] >= sqnr_db]
        hit = ok.iloc[0] if len(ok) else None
        rows.append({**g.iloc[0][keys].to_dict(), "family": family,
                     "min_bits": None if hit is None else int(hit["bits"]),
                     "format": None if hit is None else hit["format"],
                     "sqnr_db": float(g["sqnr_db"].max() if hit is None else hit["sqnr_db"])})
    df = pd.DataFrame(rows, columns=keys + ["family", "min_bits", "format", "sqnr_db"])
    return df.astype({"min_bits": "Int64"})
