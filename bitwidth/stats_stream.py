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

from .stats_kernels import batch_stats, reservoir_plan

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


def _compiled(x: Tensor) -> bool:
    """Whether ``x``'s statistics go through the compiled kernels (CPU data) or tensor ops."""
    return x.device.type == "cpu"


def hist_edges() -> np.ndarray:
    """Edges of the |x| histogram bins (2041 values from 0 to inf, 8 bins per octave).

    >>> hist_edges()[[1016, 1017, 1024]].tolist()
    [1.0, 1.125, 2.0]
    """
    return _EDGES.copy()


class StreamStats:
    """Running statistics of one (layer, kind, quantized, step), merged batch by batch."""

    __slots__ = ("count", "nan", "inf", "zeros", "min", "max", "mean", "m2", "m3", "m4",
                 "hist", "sample", "seen", "k", "seed", "rng", "lstate", "w", "nxt", "buf", "buf_n", "buf_cap")

    def __init__(self, sample_size: int, seed: Sequence[int]) -> None:
        self.count = self.nan = self.inf = self.zeros = self.seen = 0
        self.min, self.max = math.inf, -math.inf
        self.mean = self.m2 = self.m3 = self.m4 = 0.0
        self.hist = np.zeros(2048, np.int64)  # counts per bin code, zeros included, whatever the device
        self.sample = torch.empty(0)
        self.buf: Tensor | None = None  # pooled small batches, (buf_cap,) with buf_cap <= _DIRECT
        self.buf_n = self.buf_cap = 0
        self.k = sample_size
        self.seed = list(seed)
        self.rng: np.random.Generator | None = None  # made when the sample first overflows: cheap streams
        self.lstate = np.zeros(1, np.uint64)  # Algorithm L's generator, seeded from rng
        self.w, self.nxt = 0.0, -1  # Algorithm L's threshold key and next index; -1: not running

    def add(self, x: Tensor, pool: bool = True) -> None:
        """Merge a batch in; on an accelerator small ones are pooled in a buffer and merged together."""
        x = x.detach()  # every op below then runs without autograd (cheaper than no_grad())
        n = x.numel()
        if n >= _DIRECT or not pool or _compiled(x):
            # On the CPU the kernels' cost per call is a few microseconds, less than
            # copying into a pool, and the data is still in cache.
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
        """Merge the buffered batches; ``release`` also frees the buffer."""
        if self.buf_n:
            n, self.buf_n = self.buf_n, 0
            self._update(self.buf[:n])  # type: ignore[index]
        if release:
            self.buf, self.buf_cap = None, 0

    def _update(self, x: Tensor) -> None:
        """Merge one flat float32 batch: compiled kernels on the CPU, tensor ops elsewhere."""
        if _compiled(x):
            n, mean, m2, m3, m4, lo, hi, zeros = batch_stats(x.numpy(), self.hist)
            if n < 0:
                x = self._drop_nonfinite(x)
                n, mean, m2, m3, m4, lo, hi, zeros = batch_stats(x.numpy(), self.hist)
        else:
            total = float(x.sum(dtype=torch.float64))
            if not math.isfinite(total):
                x = self._drop_nonfinite(x)
                total = float(x.sum(dtype=torch.float64))
            n = x.numel()
            mean = total / max(n, 1)
            zeros, (lo, hi, m2, m3, m4) = self._update_torch(x, mean) if n else (0, [0.0] * 5)
        if n == 0:
            return
        self._merge(n, mean, m2, m3, m4)
        if lo < self.min:
            self.min = lo
        if hi > self.max:
            self.max = hi
        self.zeros += zeros
        if self.k:
            self._sample(x, n)

    def _drop_nonfinite(self, x: Tensor) -> Tensor:
        # Only batches holding NaN/Inf take this path; the non-finite values are counted
        # here and left out of every other figure.
        finite = torch.isfinite(x)
        nan = int(torch.isnan(x).sum())
        self.nan += nan
        self.inf += x.numel() - nan - int(finite.sum())
        return x[finite]

    def _update_torch(self, x: Tensor, mean: float) -> tuple[int, list[float]]:
        # The same figures with tensor ops, for data on an accelerator.
        d = x - mean  # centred first, so the power sums do not cancel
        d2 = d * d
        s2 = d2.sum(dtype=torch.float64)
        s3 = d.mul_(d2).sum(dtype=torch.float64)
        s4 = d2.mul_(d2).sum(dtype=torch.float64)
        mn, mx = torch.aminmax(x)
        codes = x.view(torch.int32) >> _SHIFT
        codes.bitwise_and_(0x7FF)  # drop the sign: a histogram of |x|
        self.hist += torch.bincount(codes, minlength=2048).cpu().numpy()
        zeros = x.numel() - torch.count_nonzero(x)
        *figures, z = torch.stack([mn.double(), mx.double(), s2, s3, s4, zeros.double()]).tolist()  # one sync
        return int(z), figures

    def _merge(self, nb: int, mb: float, m2b: float, m3b: float, m4b: float) -> None:
        # Pairwise update of central moments (Pébay 2008): exact in exact arithmetic, and
        # stable in floats because each batch is centred on its own mean first.
        na = self.count
        n = na + nb
        d = mb - self.mean
        self.m4 += (m4b + d**4 * na * nb * (na * na - na * nb + nb * nb) / n**3
                    + 6 * d**2 * (na * na * m2b + nb * nb * self.m2) / n**2 + 4 * d * (na * m3b - nb * self.m3) / n)
        self.m3 += m3b + d**3 * na * nb * (na - nb) / n**2 + 3 * d * (na * m2b - nb * self.m2) / n
        self.m2 += m2b + d * d * na * nb / n
        self.mean += d * nb / n
        self.count = n

    def _sample(self, x: Tensor, n: int) -> None:
        # The first k values fill the sample; after that it stays a uniform sample of all
        # values seen, by one of two exact methods, whichever is cheaper for the batch.
        k, seen = self.k, self.seen
        self.seen = seen + n
        fill = min(n, max(0, k - seen))
        if fill:
            self.sample = torch.cat([self.sample, x[:fill].cpu()])
        seen, n = seen + fill, n - fill
        if n == 0:
            return
        if self.rng is None:
            self.rng = np.random.default_rng(self.seed)
        rng = self.rng
        if k * n < _SPARSE * (seen + n):
            # Few values enter: draw the gaps between them (Algorithm L). Its state, the
            # k-th smallest of the keys so far, is independent of which values are in
            # the sample, so it can start here with a fresh draw from its distribution.
            if self.nxt < 0:
                self.lstate = rng.integers(2**63, size=1, dtype=np.uint64)
                self.w = rng.beta(k, seen - k + 1)
            pos, slots, self.w, self.nxt = reservoir_plan(self.lstate, k, seen, n, self.w, self.nxt)
            if x.device.type == "cpu":
                self.sample.numpy()[slots] = x.numpy()[pos + fill]
            elif len(pos):
                self.sample[torch.from_numpy(slots)] = x[torch.from_numpy(pos + fill).to(x.device)].cpu()
            return
        self.nxt = -1  # many enter: the other method, vectorised; Algorithm L restarts later
        # How many of the k come from the new data is hypergeometric; they are drawn
        # uniformly and replace uniformly chosen old ones.
        if seen < _HUGE and n < _HUGE:
            new = k - int(rng.hypergeometric(seen, n, k))
        else:  # populations this large make the binomial indistinguishable
            new = int(rng.binomial(k, n / (seen + n)))
        if new:
            picked = x[torch.from_numpy(rng.choice(n, new, replace=False) + fill).to(x.device)].cpu()
            self.sample[torch.from_numpy(rng.choice(k, new, replace=False))] = picked

    def histogram(self) -> np.ndarray:
        """Counts of nonzero finite |x| per bin of :func:`hist_edges`."""
        h = self.hist[:_NBINS].copy()
        h[0] -= self.zeros  # zeros share bin 0 with the tiniest subnormals
        return h

    def summary(self) -> dict[str, float]:
        c, nan = self.count, math.nan
        row = {"count": c, "nan_count": self.nan, "inf_count": self.inf}
        if c == 0:
            return {**row, **{k: nan for k in STAT_COLUMNS if k not in row}}
        absmax = max(-self.min, self.max)
        pct = _abs_percentiles(self.histogram(), self.zeros, c, absmax, PERCENTILES)
        return {
            **row, "min": self.min, "max": self.max, "absmax": absmax, "mean": self.mean,
            "std": math.sqrt(self.m2 / c), "kurtosis": c * self.m4 / self.m2**2 - 3 if self.m2 > 0 else nan,
            "zero_frac": self.zeros / c, "p99": pct[0], "p999": pct[1], "p9999": pct[2],
        }

    def state(self) -> dict[str, Any]:
        h = self.histogram()
        nz = np.flatnonzero(h)
        lo, hi = (int(nz[0]), int(nz[-1]) + 1) if nz.size else (0, 0)
        fields = {s: getattr(self, s) for s in self.__slots__ if s not in _NOT_SAVED}
        return {**fields, "hist_lo": lo, "hist": torch.from_numpy(h[lo:hi]), "sample": self.sample.clone()}

    @classmethod
    def from_state(cls, st: dict[str, Any]) -> StreamStats:
        s = cls(st["k"], [0])
        for name in cls.__slots__:
            if name not in _NOT_SAVED:
                setattr(s, name, st[name])
        hist = np.zeros(2048, np.int64)
        hist[st["hist_lo"]:st["hist_lo"] + len(st["hist"])] = st["hist"].numpy()
        hist[0] += s.zeros
        s.hist, s.sample = hist, st["sample"]
        return s


_NOT_SAVED = ("hist", "rng", "lstate", "w", "nxt", "sample", "buf", "buf_n", "buf_cap")


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
