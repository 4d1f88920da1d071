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
    NXT,
    PENDING,
    SEEN,
    ZEROS,
    W,
    dense_plan,
    fold,
    merge,
    new_partials,
    new_state,
    reservoir_plan,
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
_HUGE = 10**9  # numpy's hypergeometric sampler refuses populations from here on
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

    __slots__ = ("acc", "nan", "inf", "hist", "part", "sample", "k", "seed", "rng", "lstate", "buf", "buf_n", "buf_cap")

    def __init__(self, sample_size: int, seed: Sequence[int]) -> None:
        self.acc = new_state()  # count, moments, extremes, zeros, values sampled, Algorithm L's state
        self.nan = self.inf = 0
        self.hist = np.zeros(2048, np.int64)  # counts per bin code, zeros included, whatever the device
        self.part: np.ndarray | None = None  # the CPU kernels' partial histograms, while the stream is open
        self.sample = np.zeros(0, np.float32)  # the first k values, then a uniform sample of k
        self.buf: Tensor | None = None  # pooled small batches, (buf_cap,) with buf_cap <= _DIRECT
        self.buf_n = self.buf_cap = 0
        self.k = sample_size
        self.seed = list(seed)
        self.rng: np.random.Generator | None = None  # made when the sample first overflows: cheap streams
        self.lstate = np.zeros(1, np.uint64)  # Algorithm L's generator, seeded from rng

    count = property(lambda self: int(self.acc[COUNT]))
    zeros = property(lambda self: int(self.acc[ZEROS]))
    seen = property(lambda self: int(self.acc[SEEN]))
    min = property(lambda self: float(self.acc[MIN]))
    max = property(lambda self: float(self.acc[MAX]))
    mean = property(lambda self: float(self.acc[MEAN]))

    def add(self, x: Tensor, pool: bool = True) -> None:
        """Merge a batch in; on an accelerator small ones are pooled in a buffer and merged together."""
        if x.is_cpu and _KERNELS:
            # One compiled call of a few microseconds: cheaper than copying into a pool,
            # and the data is still in cache. This path runs for every recorded tensor, so
            # the view is made the cheapest way: numpy(force=True) detaches in the same call,
            # and NumPy's reshape costs less than torch's.
            a = (x.numpy(force=True) if x.dtype is torch.float32 else x.detach().float().numpy()).reshape(-1)
            if self.part is None:
                self.part = new_partials()
            done = update(a, self.part, self.hist, self.acc, self.sample, self.lstate, self.k, _SPARSE)
            if done:
                self._finish_cpu(torch.from_numpy(a), done)
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

    def _finish_cpu(self, x: Tensor, done: int) -> None:
        # What the compiled update left: a batch holding NaN/Inf (done < 0), merged again
        # without them, or a sample to draw in Python (done > 0).
        if done < 0:
            x = self._drop_nonfinite(x)
            done = update(x.numpy(), self.part, self.hist, self.acc, self.sample, self.lstate, self.k, _SPARSE)
        if done > 0:
            self._sample(x, x.numel())

    def _update(self, x: Tensor) -> None:
        """Merge one flat float32 batch with tensor ops (data on an accelerator)."""
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
        # The first k values fill the sample; after that it stays a uniform sample of all
        # values seen, by one of two exact methods, whichever is cheaper for the batch.
        k, seen, acc = self.k, self.seen, self.acc
        acc[SEEN] = seen + n
        if not k:
            return
        fill = min(n, max(0, k - seen))
        if fill:
            self.sample = np.concatenate([self.sample, x[:fill].cpu().numpy()])
        seen, n = seen + fill, n - fill
        if n == 0:
            return
        if self.rng is None:
            self.rng = np.random.default_rng(self.seed)
            self.lstate = self.rng.integers(2**63, size=1, dtype=np.uint64)
        rng = self.rng
        if k * n < _SPARSE * (seen + n):
            # Few values enter: draw the gaps between them (Algorithm L). Its state, the
            # k-th smallest of the keys so far, is independent of which values are in
            # the sample, so it can start here with a fresh draw from its distribution.
            if acc[NXT] < 0:
                acc[W] = rng.beta(k, seen - k + 1)
            pos, slots, acc[W], acc[NXT] = reservoir_plan(self.lstate, k, seen, n, acc[W], int(acc[NXT]))
        else:
            acc[NXT] = -1  # many enter: Algorithm L restarts later
            # How many of the k come from the new data is hypergeometric; they are drawn
            # uniformly and replace uniformly chosen old ones.
            if seen < _HUGE and n < _HUGE:
                new = k - int(rng.hypergeometric(seen, n, k))
            else:  # populations this large make the binomial indistinguishable
                new = int(rng.binomial(k, n / (seen + n)))
            pos, slots = dense_plan(self.lstate, k, n, new)
        if x.is_cpu:
            self.sample[slots] = x.numpy()[pos + fill]
        elif len(pos):
            self.sample[slots] = x[torch.from_numpy(pos + fill).to(x.device)].cpu().numpy()

    def _fold(self) -> None:
        if self.part is not None and self.acc[PENDING]:
            fold(self.part, self.hist)
            self.acc[PENDING] = 0

    def histogram(self) -> np.ndarray:
        """Counts of nonzero finite |x| per bin of :func:`hist_edges`."""
        self._fold()
        h = self.hist[:_NBINS].copy()
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
        h = self.histogram()
        nz = np.flatnonzero(h)
        lo, hi = (int(nz[0]), int(nz[-1]) + 1) if nz.size else (0, 0)
        acc = dict(zip(_SAVED, self.acc[_SAVED_AT].tolist(), strict=True))
        return {**acc, "nan": self.nan, "inf": self.inf, "k": self.k, "seed": self.seed,
                "hist_lo": lo, "hist": torch.from_numpy(h[lo:hi]), "sample": torch.from_numpy(self.sample.copy())}

    @classmethod
    def from_state(cls, st: dict[str, Any]) -> StreamStats:
        s = cls(st["k"], st["seed"])
        s.acc[_SAVED_AT] = [st[name] for name in _SAVED]
        s.nan, s.inf = st["nan"], st["inf"]
        s.hist[st["hist_lo"]:st["hist_lo"] + len(st["hist"])] = st["hist"].numpy()
        s.hist[0] += s.zeros
        s.sample = st["sample"].numpy().copy()
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
