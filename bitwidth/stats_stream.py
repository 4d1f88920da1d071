"""Streaming statistics of one tensor stream: the accumulator behind :mod:`bitwidth.stats`.

A :class:`StreamStats` merges batch after batch into running moments, extremes, a
histogram of |x| with 8 bins per octave and a bounded uniform reservoir sample, in
memory that does not depend on how many values it has seen.

>>> s = StreamStats(sample_size=4, seed=[0])
>>> s.add(torch.tensor([0.0, 1.0, -2.0, float("nan")]))
>>> s.flush()
>>> {k: s.summary()[k] for k in ("count", "absmax", "zero_frac", "nan_count")}
{'count': 3, 'absmax': 2.0, 'zero_frac': 0.3333333333333333, 'nan_count': 1}
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .stats_kernels import (
    COUNT,
    M2,
    M3,
    M4,
    MAX,
    MEAN,
    MIN,
    PENDING,
    SEEN,
    ZEROS,
    fold,
    merge,
    new_partials,
    new_state,
    plan,
    seed_state,
    update,
)

__all__ = ["StreamStats", "hist_edges", "PERCENTILES", "STAT_COLUMNS"]

PERCENTILES = (99.0, 99.9, 99.99)
STAT_COLUMNS = (
    "count", "min", "max", "absmax", "mean", "std", "kurtosis", "zero_frac",
    "nan_count", "inf_count", "p99", "p999", "p9999",
)
# Histogram bins are float32 bit patterns: 8-bit exponent + top 3 mantissa bits, i.e. 8
# bins per octave over every finite float32 magnitude, found with one shift, no log2.
_SHIFT = 20
_NBINS = 255 << 3
_EDGES = (np.arange(_NBINS + 1, dtype=np.uint32) << _SHIFT).view(np.float32).astype(np.float64)
_SPARSE = 512  # Algorithm L samples a batch when fewer of its values than this are expected to enter
_DIRECT = 1 << 16  # batches of at least this many values are merged at once, smaller ones pooled


_KERNELS = True  # CPU data goes through the compiled kernels (tests turn this off to check the tensor ops)


def hist_edges() -> np.ndarray:
    """Edges of the |x| histogram bins (2041 values from 0 to inf, 8 bins per octave).

    >>> hist_edges()[[1016, 1017, 1024]].tolist()
    [1.0, 1.125, 2.0]
    """
    return _EDGES.copy()


class StreamStats:
    """Running statistics of one (layer, kind, quantized, step), merged batch by batch."""

    __slots__ = ("acc", "nan", "inf", "hist", "hist_lo", "part", "reservoir", "k", "seed", "lstate", "buf", "buf_n",
                 "buf_cap")

    def __init__(self, sample_size: int, seed: Sequence[int]) -> None:
        self.acc = new_state()  # count, moments, extremes, zeros, values sampled, Algorithm L's state
        self.nan = self.inf = 0
        self.hist = np.zeros(2048, np.int64)  # counts per bin code, zeros included, whatever the device
        # A released stream keeps only the bins in use, as it saves them: hist becomes the
        # nonzero range of histogram() (zeros left out: they are counted in acc) from hist_lo.
        self.hist_lo = 0
        self.part: np.ndarray | None = None  # the CPU kernels' partial histograms, while the stream is open
        self.reservoir = np.empty(sample_size, np.float32)  # the first k values, then a uniform sample of k
        self.buf: Tensor | None = None  # pooled small batches, (buf_cap,) with buf_cap <= _DIRECT
        self.buf_n = self.buf_cap = 0
        self.k = sample_size
        self.seed = list(seed)
        self.lstate = seed_state(self.seed)  # the sampler's generator

    count = property(lambda self: int(self.acc[COUNT]))
    zeros = property(lambda self: int(self.acc[ZEROS]))
    seen = property(lambda self: int(self.acc[SEEN]))
    min = property(lambda self: float(self.acc[MIN]))
    max = property(lambda self: float(self.acc[MAX]))
    mean = property(lambda self: float(self.acc[MEAN]))

    @property
    def sample(self) -> np.ndarray:
        """The reservoir sample: the first k values seen, then a uniform sample of k of them."""
        return self.reservoir[:min(self.seen, self.k)]

    def add(self, x: Tensor, pool: bool = True) -> None:
        """Merge a batch in; on an accelerator small ones are pooled in a buffer and merged together."""
        if x.is_cpu and _KERNELS:
            # One compiled call of a few microseconds: cheaper than copying into a pool,
            # and the data is still in cache. This path runs for every recorded tensor, so
            # the view is made the cheapest way: numpy(force=True) detaches in the same call,
            # and NumPy's reshape costs less than torch's.
            a = (x.numpy(force=True) if x.dtype is torch.float32 else x.detach().float().numpy()).reshape(-1)
            if self.part is None:
                self._expand()
                self.part = new_partials()
            if update(a, self.part, self.hist, self.acc, self.reservoir, self.lstate, self.k, _SPARSE):
                # A batch holding NaN/Inf, refused untouched: merged again without them.
                a = self._drop_nonfinite(torch.from_numpy(a)).numpy()
                update(a, self.part, self.hist, self.acc, self.reservoir, self.lstate, self.k, _SPARSE)
            return
        x = x.detach()  # every op below then runs without autograd (cheaper than no_grad())
        n = x.numel()
        if n >= _DIRECT or not pool:
            self._update(x.reshape(-1).float())
            return
        # Each merge with tensor ops costs ~10 kernel launches, so small batches are pooled
        # first. The copy is needed anyway: the caller may change its tensor in place
        # later (a residual ``out += x``, reused gradient buffers).
        end = self.buf_n + n
        buf = self.buf
        if buf is None or end > self.buf_cap or buf.device != x.device:
            if buf is not None and (end > _DIRECT or buf.device != x.device):
                self.flush()
                end = n
            # Grow geometrically up to _DIRECT: a stream that only ever sees a few values
            # keeps a small buffer.
            self.buf_cap = min(_DIRECT, max(4096, 2 * end))
            grown = torch.empty(self.buf_cap, device=x.device)
            if self.buf_n:
                grown[:self.buf_n] = buf[:self.buf_n]  # type: ignore[index]
            self.buf = buf = grown
        buf[self.buf_n:end] = x.reshape(-1)
        self.buf_n = end

    def flush(self, release: bool = False) -> None:
        """Merge the buffered batches and partial histograms; ``release`` also frees their memory."""
        if self.buf_n:
            n, self.buf_n = self.buf_n, 0
            self._update(self.buf[:n])  # type: ignore[index]
        self._fold()
        if release:
            self.buf, self.buf_cap, self.part = None, 0, None
            self._compact()

    def _compact(self) -> None:
        # A closed snapshot's histogram spans a few dozen octaves at most: keep those bins;
        # and a sample that never filled keeps only its values.
        if len(self.hist) == 2048:
            self.hist_lo, self.hist = self._bins_in_use()
        if len(self.reservoir) > self.seen:
            self.reservoir = self.reservoir[:self.seen].copy()

    def _expand(self) -> None:
        # A batch for a released stream (a gradient arriving after its step closed): the
        # histogram gets back all its bins, the sample its k slots (the kernels write there).
        if len(self.hist) != 2048:
            self.hist, self.hist_lo = self._full_hist(), 0
        if len(self.reservoir) < self.k:
            grown = np.empty(self.k, np.float32)
            grown[:len(self.reservoir)] = self.reservoir
            self.reservoir = grown

    def _full_hist(self) -> np.ndarray:
        if len(self.hist) == 2048:
            return self.hist
        full = np.zeros(2048, np.int64)
        full[self.hist_lo:self.hist_lo + len(self.hist)] = self.hist
        full[0] += self.zeros
        return full

    def _bins_in_use(self) -> tuple[int, np.ndarray]:
        """The first nonzero bin of :meth:`histogram` and the counts from there to the last."""
        h = self.histogram()
        nz = np.flatnonzero(h)
        lo, hi = (int(nz[0]), int(nz[-1]) + 1) if nz.size else (0, 0)
        return lo, h[lo:hi].copy()

    def _update(self, x: Tensor) -> None:
        """Merge one flat float32 batch with tensor ops (data on an accelerator)."""
        self._expand()
        total = float(x.sum(dtype=torch.float64))
        if not math.isfinite(total):
            x = self._drop_nonfinite(x)
            total = float(x.sum(dtype=torch.float64))
        n = x.numel()
        if n == 0:
            return
        mean = total / n
        d = x - mean  # centred first, so the power sums do not cancel
        d2 = d * d
        s2 = d2.sum(dtype=torch.float64)
        s3 = d.mul_(d2).sum(dtype=torch.float64)
        s4 = d2.mul_(d2).sum(dtype=torch.float64)
        mn, mx = torch.aminmax(x)
        codes = x.view(torch.int32) >> _SHIFT
        codes.bitwise_and_(0x7FF)  # drop the sign: a histogram of |x|
        self.hist += torch.bincount(codes, minlength=2048).cpu().numpy()
        zeros = n - torch.count_nonzero(x)
        lo, hi, m2, m3, m4, z = torch.stack([mn.double(), mx.double(), s2, s3, s4, zeros.double()]).tolist()
        merge(self.acc, n, mean, m2, m3, m4, lo, hi, int(z))
        self._sample(x, n)

    def _drop_nonfinite(self, x: Tensor) -> Tensor:
        # Only batches holding NaN/Inf take this path; the non-finite values are counted
        # here and left out of every other figure.
        finite = torch.isfinite(x)
        nan = int(torch.isnan(x).sum())
        self.nan += nan
        self.inf += x.numel() - nan - int(finite.sum())
        return x[finite]

    def _sample(self, x: Tensor, n: int) -> None:
        # The same plan as the compiled update's, applied with tensor indexing.
        pos, slots = plan(self.lstate, self.acc, self.k, n, _SPARSE)
        if len(pos):
            self.reservoir[slots] = x[torch.from_numpy(pos).to(x.device)].cpu().numpy()

    def _fold(self) -> None:
        if self.part is not None and self.acc[PENDING]:
            fold(self.part, self.hist)
            self.acc[PENDING] = 0

    def histogram(self) -> np.ndarray:
        """Counts of nonzero finite |x| per bin of :func:`hist_edges`."""
        self._fold()
        h = self._full_hist()[:_NBINS].copy()
        h[0] -= self.zeros  # zeros share bin 0 with the tiniest subnormals
        return h

    def summary(self) -> dict[str, float]:
        c, nan = self.count, math.nan
        row = {"count": c, "nan_count": self.nan, "inf_count": self.inf}
        if c == 0:
            return {**row, **{k: nan for k in STAT_COLUMNS if k not in row}}
        m2, m4 = self.acc[M2], self.acc[M4]
        absmax = max(-self.min, self.max)
        pct = _abs_percentiles(self.histogram(), self.zeros, c, absmax, PERCENTILES)
        return {
            **row, "min": self.min, "max": self.max, "absmax": absmax, "mean": self.mean,
            "std": math.sqrt(m2 / c), "kurtosis": float(c * m4 / m2**2 - 3) if m2 > 0 else nan,
            "zero_frac": self.zeros / c, "p99": pct[0], "p999": pct[1], "p9999": pct[2],
        }

    def state(self) -> dict[str, Any]:
        lo, hist = self._bins_in_use()
        acc = dict(zip(_SAVED, self.acc[_SAVED_AT].tolist(), strict=True))
        return {**acc, "nan": self.nan, "inf": self.inf, "k": self.k, "seed": self.seed,
                "hist_lo": lo, "hist": torch.from_numpy(hist), "sample": torch.from_numpy(self.sample.copy())}

    @classmethod
    def from_state(cls, st: dict[str, Any]) -> StreamStats:
        s = cls(st["k"], st["seed"])
        s.acc[_SAVED_AT] = [st[name] for name in _SAVED]
        s.nan, s.inf = st["nan"], st["inf"]
        # Saved as a released stream keeps them: a loaded one reports, and reopens if added to.
        s.hist_lo, s.hist = st["hist_lo"], st["hist"].numpy().copy()
        s.reservoir = st["sample"].numpy().copy()
        return s


_SAVED = ("count", "zeros", "min", "max", "mean", "m2", "m3", "m4", "seen")  # the fields of acc saved
_SAVED_AT = [COUNT, ZEROS, MIN, MAX, MEAN, M2, M3, M4, SEEN]


def _abs_percentiles(hist: np.ndarray, zeros: int, count: int, absmax: float, qs: Iterable[float]) -> list[float]:
    """Percentiles of |x| from the histogram, interpolated linearly inside the bin."""
    cum = zeros + np.cumsum(hist)
    out = []
    for q in qs:
        rank = q / 100 * count
        if rank <= zeros:
            out.append(0.0)
            continue
        i = min(int(np.searchsorted(cum, rank)), len(hist) - 1)
        lo, hi = _EDGES[i], min(_EDGES[i + 1], absmax)
        before = cum[i] - hist[i]
        out.append(float(lo + (hi - lo) * (rank - before) / hist[i]))
    return out
