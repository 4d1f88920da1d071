"""Compiled kernels behind the streaming statistics on CPU (numba), and the reservoir sampler.

Each statistic would cost PyTorch several passes over the data (a temporary per
power, an extra pass for the bin codes, a branchy ``bincount``); on a small model
that is as much compute as the model's own step. These loops do the same work in
two passes, accumulating in float64, and draw the reservoir sample in the same call,
from a splitmix64 generator per stream (no NumPy generator: deterministic for a seed,
and the same plan serves the tensor-op path on accelerators). They are pure functions
of NumPy arrays, checked against NumPy and against their distributions in the tests.
``cache=True`` keeps the compiled code on disk, so only the first use on a machine
pays the compile (6-8 s).

>>> import numpy as np
>>> x = np.array([0.0, 1.0, -2.0, 4.0], dtype=np.float32)
>>> acc, part, hist = new_state(), new_partials(), np.zeros(2048, np.int64)
>>> update(x, part, hist, acc, np.zeros(0, np.float32), np.zeros(1, np.uint64), 0, 512)
0
>>> acc[[COUNT, MEAN, M2, MIN, MAX, ZEROS]].tolist()
[4.0, 0.75, 18.75, -2.0, 4.0, 1.0]
>>> fold(part, hist); int(hist[0x3F8]), int(hist.sum())  # bin of 1.0: exponent 127, mantissa 0
(1, 4)
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np
from numba import njit

__all__ = ["update", "merge", "new_state", "new_partials", "fold", "plan", "dense_plan", "reservoir_plan",
           "hypergeometric", "beta", "scan", "central_sums", "abs_histogram", "uniform", "seed_state"]

# Reassociation lets the reductions vectorize; no "nnan"/"ninf": a NaN or Inf must
# reach the sum, which is how the caller detects a batch holding one.
_FAST = {"reassoc", "contract"}


@njit(cache=True, nogil=True, fastmath=_FAST)
def scan(a: np.ndarray, c: float) -> tuple[float, float, float, float, int, int, int]:
    """Sums of (x - c)**1..4 (float64), the number of exact zeros, and the order keys of the min and max.

    One vectorised pass over a float32 vector. The extremes are taken over int32 keys
    that order like the floats (the bit pattern, magnitude bits flipped for negatives):
    integer min/max vectorise, float min/max (with their NaN rules) do not.
    """
    bits = a.view(np.int32)
    s1 = s2 = s3 = s4 = 0.0
    z = 0
    lo = np.int32(0x7FFFFFFF)
    hi = np.int32(-0x80000000)
    for i in range(a.size):
        v = a[i]
        d = np.float64(v) - c
        d2 = d * d
        s1 += d
        s2 += d2
        s3 += d2 * d
        s4 += d2 * d2
        z += v == 0
        b = bits[i]
        key = b ^ ((b >> 31) & 0x7FFFFFFF)
        lo = min(lo, key)
        hi = max(hi, key)
    return s1, s2, s3, s4, z, lo, hi


@njit(cache=True)
def _from_key(key: int) -> float:
    # The key map is its own inverse on bit patterns.
    b = np.int32(key)
    return np.array([b ^ ((b >> 31) & 0x7FFFFFFF)], np.int32).view(np.float32)[0]


@njit(cache=True, nogil=True, fastmath=_FAST)
def central_sums(a: np.ndarray, mean: float) -> tuple[float, float, float]:
    """Sums of (x - mean)**2, **3 and **4 in float64 (finite input)."""
    s2 = s3 = s4 = 0.0
    for i in range(a.size):
        d = np.float64(a[i]) - mean
        d2 = d * d
        s2 += d2
        s3 += d2 * d
        s4 += d2 * d2
    return s2, s3, s4


# Partial histograms that the kernel spreads consecutive values over: a run of values in
# one bin (ReLU zeros, quantized inputs) would otherwise serialise on one counter. They
# persist between batches (no zeroing and folding per call; folded when read) and are
# padded so that they are not 16 KB apart, where stores and loads would alias.
WAYS, STRIDE = 4, 2064


def new_partials() -> np.ndarray:
    """Zeroed partial histograms for :func:`abs_histogram` (int32: folded before 2**31 values)."""
    return np.zeros(WAYS * STRIDE, np.int32)


@njit(cache=True, nogil=True)
def abs_histogram(a: np.ndarray, part: np.ndarray) -> None:
    """Add the counts of |x| per bin (8 bins per octave: exponent and top 3 mantissa bits) to ``part``.

    The bin of x is its float32 bit pattern shifted right by 20, sign dropped. Value i
    goes to partial histogram i % WAYS; :func:`fold` sums them.
    """
    bits = a.view(np.int32)
    for i in range(a.size):
        part[(i & (WAYS - 1)) * STRIDE + ((bits[i] >> 20) & 0x7FF)] += 1


@njit(cache=True, nogil=True)
def fold(part: np.ndarray, hist: np.ndarray) -> None:
    """Move the counts of the partial histograms ``part`` into ``hist`` (2048 bins)."""
    for w in range(WAYS):
        for j in range(2048):
            hist[j] += part[w * STRIDE + j]
    part[:] = 0


@njit(cache=True)
def uniform(state: np.ndarray) -> float:
    """The next uniform draw in (0, 1) from a splitmix64 generator whose state is ``state[0]``."""
    state[0] += np.uint64(0x9E3779B97F4A7C15)
    z = state[0]
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (np.float64(z >> np.uint64(11)) + 0.5) * 2.0**-53


@njit(cache=True)
def _skip(state: np.ndarray, w: float) -> int:
    gap = math.floor(math.log(uniform(state)) / math.log1p(-w))
    return int(min(gap, 2.0**62))  # w underflowing makes the gap unbounded: never again


@njit(cache=True)
def _l_step(state: np.ndarray, k: int, w: float, nxt: int) -> tuple[int, float, int]:
    """One step of Algorithm L: the slot the value at ``nxt`` takes, then the new w and next index."""
    slot = int(uniform(state) * k)
    w *= math.exp(math.log(uniform(state)) / k)
    return slot, w, nxt + _skip(state, w) + 1


@njit(cache=True)
def reservoir_plan(state: np.ndarray, k: int, seen: int, n: int,
                   w: float, nxt: int) -> tuple[np.ndarray, np.ndarray, float, int]:
    """Which of ``n`` new values enter a full reservoir of ``k`` that has seen ``seen`` (Algorithm L).

    Li (1994): think of every value as carrying a uniform key, the reservoir holding
    the k smallest; ``w`` is the k-th smallest key so far. Instead of a draw per value,
    the gap to the next value whose key is below ``w`` is drawn directly, so a batch
    costs O(values that enter). ``nxt`` is the global index of that next value (pass
    -1 to draw it from ``w``). Returns (positions in the batch, reservoir slots, w, nxt);
    each slot appears once, with the last value drawn for it, so the plan can be
    applied in any order.
    """
    if nxt < 0:
        nxt = seen + _skip(state, w)
    cap = 16 + 2 * int(k * n / (seen + n))  # about twice the expected count; grown if short
    pos = np.empty(cap, np.int64)
    slots = np.empty(cap, np.int64)
    m = 0
    while nxt < seen + n:
        if m == cap:
            cap *= 2
            pos = np.concatenate((pos, np.empty(cap - m, np.int64)))
            slots = np.concatenate((slots, np.empty(cap - m, np.int64)))
        pos[m] = nxt - seen
        slots[m], w, nxt = _l_step(state, k, w, nxt)
        m += 1
    taken = np.zeros(k, np.bool_)
    j = m
    for i in range(m - 1, -1, -1):  # later draws overwrite earlier ones: keep the last per slot
        if not taken[slots[i]]:
            taken[slots[i]] = True
            j -= 1
            pos[j] = pos[i]
            slots[j] = slots[i]
    return pos[j:m], slots[j:m], w, nxt


@njit(cache=True)
def _distinct(state: np.ndarray, m: int, n: int) -> np.ndarray:
    """``m`` distinct integers drawn uniformly from range(n) (Floyd's algorithm: m draws)."""
    out = np.empty(m, np.int64)
    if n <= 1 << 22:  # a byte per candidate
        taken = np.zeros(n, np.bool_)
        for i in range(m):
            j = n - m + i
            t = int(uniform(state) * (j + 1))
            if taken[t]:
                t = j
            taken[t] = True
            out[i] = t
        return out
    # Huge batches: an open-addressing hash set of at least 2m slots (a typed set would
    # cost a second of compile time on every machine).
    size = 2
    while size < 2 * m:
        size *= 2
    table = np.full(size, -1, np.int64)
    for i in range(m):
        j = n - m + i
        t = int(uniform(state) * (j + 1))
        if not _insert(table, t):
            _insert(table, j)  # Floyd: j itself is never in the set yet
            t = j
        out[i] = t
    return out


@njit(cache=True)
def _insert(table: np.ndarray, v: int) -> bool:
    """Add v >= 0 to a linear-probing hash set; False when it was there already."""
    mask = table.size - 1
    h = np.int64((np.uint64(v) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(20)) & mask  # Fibonacci hashing
    while table[h] >= 0:
        if table[h] == v:
            return False
        h = (h + 1) & mask
    table[h] = v
    return True


@njit(cache=True)
def dense_plan(state: np.ndarray, k: int, n: int, new: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions of ``new`` values drawn uniformly from a batch of ``n``, and the distinct slots of k they replace."""
    return _distinct(state, new, n), _distinct(state, new, k)


@njit(cache=True)
def hypergeometric(state: np.ndarray, good: int, bad: int, draws: int) -> int:
    """How many of ``draws`` values drawn without replacement from good + bad are good.

    The urn emptied one draw at a time: exact, O(draws), and no population limit.
    """
    taken = 0
    for i in range(draws):
        if uniform(state) * (good + bad - i) < good - taken:
            taken += 1
    return taken


@njit(cache=True)
def _gamma(state: np.ndarray, a: float) -> float:
    # Marsaglia and Tsang (2000), shape a >= 1; normals by Box-Muller.
    d = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    while True:
        x = math.sqrt(-2.0 * math.log(uniform(state))) * math.cos(2.0 * math.pi * uniform(state))
        v = (1.0 + c * x) ** 3
        if v > 0 and math.log(uniform(state)) < 0.5 * x * x + d - d * v + d * math.log(v):
            return d * v


@njit(cache=True)
def beta(state: np.ndarray, a: int, b: int) -> float:
    """A Beta(a, b) draw for integer a, b >= 1: the a-th smallest of a + b - 1 uniforms."""
    if b == 1:  # the largest of a uniforms
        return math.exp(math.log(uniform(state)) / a)
    x = _gamma(state, a)
    return x / (x + _gamma(state, b))


# The running state of a stream, one float64 array (counts are exact below 2**53).
COUNT, MEAN, M2, M3, M4, MIN, MAX, ZEROS, SEEN, W, NXT, PENDING = range(12)


def seed_state(seed: Sequence[int]) -> np.ndarray:
    """The state of :func:`uniform`'s generator for a seed (a sequence of integers): one hash.

    >>> seed_state([0, 1]).dtype, bool(seed_state([0, 1]) == seed_state([0, 2]))
    (dtype('uint64'), False)
    """
    digest = hashlib.blake2b(np.asarray(seed, np.int64).tobytes(), digest_size=8).digest()
    return np.frombuffer(digest, np.uint64).copy()


def new_state() -> np.ndarray:
    """The state of a stream that has seen nothing (Algorithm L not running: NXT = -1).

    PENDING counts the values in the partial histograms since they were last folded.
    """
    acc = np.zeros(12)
    acc[MIN], acc[MAX], acc[NXT] = np.inf, -np.inf, -1
    return acc


@njit(cache=True)
def plan(state: np.ndarray, acc: np.ndarray, k: int, n: int, sparse: int) -> tuple[np.ndarray, np.ndarray]:
    """Which of ``n`` new values enter a stream's sample of ``k``, and the slots they take; advances SEEN.

    The first k values fill the sample; after that it stays a uniform sample of all
    values seen, by one of two exact methods, whichever is cheaper for the batch:
    when fewer than ``sparse`` values are expected to enter, Algorithm L draws the gaps
    between them (its state, the k-th smallest of the values' keys, is independent of
    which values are in the sample, so it can start at any batch with a draw from its
    distribution); otherwise how many of the k come from the batch is hypergeometric,
    and they are drawn uniformly and replace uniformly chosen old ones.
    """
    seen = int(acc[SEEN])
    acc[SEEN] = seen + n
    if seen == 0 and n > k > 0:  # a stream's first batch overfills: k of its n directly
        return _distinct(state, k, n), np.arange(k)
    fill = min(n, max(0, k - seen))
    head = np.arange(fill)
    seen, rest = seen + fill, n - fill
    if rest == 0 or k == 0:
        return head, head + (seen - fill)
    if k * rest < sparse * (seen + rest):
        if acc[NXT] < 0:
            acc[W] = beta(state, k, seen - k + 1)
        pos, slots, acc[W], acc[NXT] = reservoir_plan(state, k, seen, rest, acc[W], int(acc[NXT]))
    else:
        acc[NXT] = -1  # many enter: Algorithm L restarts later
        pos, slots = dense_plan(state, k, rest, hypergeometric(state, rest, seen, k))
    if fill == 0:
        return pos, slots
    return np.concatenate((head, pos + fill)), np.concatenate((head + (seen - fill), slots))


@njit(cache=True)
def merge(acc: np.ndarray, nb: int, mb: float, m2b: float, m3b: float, m4b: float,
          lo: float, hi: float, zeros: int) -> None:
    """Merge a batch's count, mean, central sums m2..m4, extremes and zero count into ``acc``.

    Pairwise update of central moments (Pébay 2008): exact in exact arithmetic, and
    stable in floats because each batch is centred on its own mean first.
    """
    na = acc[COUNT]
    n = na + nb
    d = mb - acc[MEAN]
    m2a, m3a = acc[M2], acc[M3]
    acc[M4] += (m4b + d**4 * na * nb * (na * na - na * nb + nb * nb) / n**3
                + 6 * d**2 * (na * na * m2b + nb * nb * m2a) / n**2 + 4 * d * (na * m3b - nb * m3a) / n)
    acc[M3] += m3b + d**3 * na * nb * (na - nb) / n**2 + 3 * d * (na * m2b - nb * m2a) / n
    acc[M2] += m2b + d * d * na * nb / n
    acc[MEAN] += d * nb / n
    acc[COUNT] = n
    acc[MIN] = min(acc[MIN], lo)
    acc[MAX] = max(acc[MAX], hi)
    acc[ZEROS] += zeros


@njit(cache=True, nogil=True)
def update(a: np.ndarray, part: np.ndarray, hist: np.ndarray, acc: np.ndarray, sample: np.ndarray, state: np.ndarray,
           k: int, sparse: int) -> int:
    """Merge a float32 batch into a stream: statistics, histogram and, once it runs sparse, the sample.

    Two passes: power sums, zeros and extremes; histogram (into the partials ``part``,
    which spill into ``hist`` before an int32 count could overflow). Then the values
    that enter the sample (size k, of which the first min(SEEN, k) are filled) are
    written there, by :func:`plan`, or, while Algorithm L runs sparse, by its loop in
    place. Returns 0, or -1 for a batch holding NaN or Inf, which changes nothing.
    """
    n = a.size
    if n == 0:
        return 0
    # Power sums about a shift c near the mean (the stream's mean so far), turned into
    # sums about the batch mean. That loses precision when the batch mean is many
    # standard deviations from c; then a second pass centres on the batch mean itself.
    c = acc[MEAN] if acc[COUNT] > 0 else np.float64(a[0])
    s1, s2, s3, s4, z, lo, hi = scan(a, c)
    if not math.isfinite(s1):
        return -1
    d = s1 / n
    mean = c + d
    m2 = s2 - n * d * d
    if n * d * d <= 1e3 * m2:  # |mean - c| <= 31 sd: errors stay below 1e-10 relative
        m3 = s3 - 3 * d * s2 + 2 * n * d**3
        m4 = s4 - 4 * d * s3 + 6 * d * d * s2 - 3 * n * d**4
    else:
        m2, m3, m4 = central_sums(a, mean)
    if acc[PENDING] + n >= 2**31:  # a partial count could overflow int32
        fold(part, hist)
        acc[PENDING] = 0
    abs_histogram(a, part)
    acc[PENDING] += n
    merge(acc, n, mean, m2, m3, m4, np.float64(_from_key(lo)), np.float64(_from_key(hi)), z)
    seen = int(acc[SEEN])
    if acc[NXT] < 0 or k * n >= sparse * (seen + n):
        pos, slots = plan(state, acc, k, n, sparse)
        for j in range(pos.size):
            sample[slots[j]] = a[pos[j]]
        return 0
    nxt, w = int(acc[NXT]), acc[W]
    while nxt < seen + n:  # reservoir_plan's loop, applied in place (later draws overwrite earlier ones)
        i = nxt - seen
        slot, w, nxt = _l_step(state, k, w, nxt)
        sample[slot] = a[i]
    acc[SEEN], acc[W], acc[NXT] = seen + n, w, nxt
    return 0
