"""Adaptive precision: a controller that moves each site's fixed-point width while a model trains.

After APT (Zhang et al., arXiv 1911.00361): every ``every`` optimizer steps the controller
records one step's live tensors (:func:`bitwidth.record`: the weights, each matmul input
and each output gradient), measures how well the format in force holds them, and moves
that (site, kind)'s width:

- the **measure** is the relative quantization error ``‖q(x) − x‖ / ‖x‖`` of the format
  on the recorded sample (round-to-nearest, whatever the training rounding, so measuring
  draws no random numbers), with the fractions that saturate (``overflow``) and that
  flush to zero (``underflow``) beside it;
- **raise** when the error of the format in force, or of the same width with the binary
  point re-placed for the new range, exceeds ``raise_above``: to the fewest bits (up to
  ``max_bits``) whose error, with the binary point re-placed, is at most ``raise_above``;
- **lower** by one bit when the error one bit narrower would still be at most
  ``lower_below`` (below ``raise_above``: the hysteresis) at ``patience`` measurements
  in a row, never below ``min_bits``;
- the **binary point** follows the data: at every measurement ``frac`` is re-placed so
  the largest magnitude of the step fits (:func:`bitwidth.families.fixed_frac_for`);
  a format whose range the data left (growing weights, shrinking gradients) shows it as
  overflow or underflow error first.

The first step runs at full precision and is measured: it sets every width (``init``).
Pure decisions (:func:`measure`, :func:`decide`) work on tensors; the
:class:`PrecisionController` applies them to a wrapped model with
:func:`bitwidth.set_plan`. Every change is logged with its measurement.

>>> import torch
>>> x = torch.randn(4096, generator=torch.Generator().manual_seed(0))
>>> d = decide(x, float(x.abs().max()), None, KindPolicy(min_bits=4, max_bits=16, raise_above=0.05, lower_below=0.02))
>>> d.reason, d.format.bits, d.format.name == fit_format(d.format.bits, float(x.abs().max())).name
('init', 7, True)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from torch import Tensor, nn

from .families import fixed_frac_for
from .formats import FixedFormat
from .stats import Recorder, record
from .wrap import KINDS, QuantSpec, is_wrapped, set_plan, wrap

__all__ = [
    "CHANGE_COLUMNS",
    "DEFAULT_POLICIES",
    "SCHEDULE_COLUMNS",
    "Change",
    "Decision",
    "KindPolicy",
    "Measurement",
    "PrecisionController",
    "decide",
    "fit_format",
    "make_policies",
    "measure",
]

FULL_BITS = 32
BITS_RANGE = (2, 32)
CHANGE_COLUMNS = ("step", "site", "kind", "old", "new", "old_bits", "new_bits", "reason", "rel_error",
                  "overflow", "underflow", "absmax", "new_error")
SCHEDULE_COLUMNS = ("step", "steps", "site", "kind", "format", "bits", "frac")


@dataclass(frozen=True)
class KindPolicy:
    """How the controller moves one kind's widths: bounds, thresholds on the relative error, patience.

    ``raise_above`` in (0, 1): raise when the error of the format in force exceeds it.
    ``lower_below`` in (0, raise_above): lower when one bit fewer would still stay at or below it.
    ``patience`` (1..1000): measurements in a row that must allow lowering before it happens.
    ``max_underflow`` in (0, 1]: also raise when more than this fraction of the nonzero values
    flush to zero (1: off). Small gradients matter to Adam, which rescales each parameter's
    update: a transformer trained with Adam needs it on its gradients (see the README).

    >>> KindPolicy(min_bits=8, max_bits=4)
    Traceback (most recent call last):
    ...
    ValueError: min_bits (8) must be <= max_bits (4); both integers in 2..32
    """

    min_bits: int = 4
    max_bits: int = 16
    raise_above: float = 0.05
    lower_below: float = 0.02
    patience: int = 2
    max_underflow: float = 1.0

    def __post_init__(self) -> None:
        problems = []
        for name in ("min_bits", "max_bits"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not BITS_RANGE[0] <= v <= BITS_RANGE[1]:
                problems.append(f"{name} must be an integer in 2..32 (a fixed-point word: sign and at least one "
                                f"more bit), got {v!r}")
        if not problems and self.min_bits > self.max_bits:
            problems.append(f"min_bits ({self.min_bits}) must be <= max_bits ({self.max_bits}); "
                            "both integers in 2..32")
        ok_raise = _is_number(self.raise_above) and 0 < self.raise_above < 1
        if not ok_raise:
            problems.append(f"raise_above must be a number in (0, 1) (a relative error), got {self.raise_above!r}")
        if not _is_number(self.lower_below) or not 0 < self.lower_below < (self.raise_above if ok_raise else 1):
            top = f"raise_above = {self.raise_above}" if ok_raise else "raise_above"
            problems.append(f"lower_below must be a number in (0, {top}) (below it for hysteresis), "
                            f"got {self.lower_below!r}")
        p = self.patience
        if isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= 1000:
            problems.append(f"patience must be an integer in 1..1000, got {p!r}")
        if not _is_number(self.max_underflow) or not 0 < self.max_underflow <= 1:
            problems.append(f"max_underflow must be a number in (0, 1] (a fraction; 1: off), "
                            f"got {self.max_underflow!r}")
        if problems:
            raise ValueError("; ".join(problems))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# Defaults, chosen on the digits CNN (fixed point, SGD; see the README's adaptive section):
# weights keep a relative error of at most 12%, activations 20%, gradients 25% (their noise
# averages out over steps, but flushing the many small ones to zero stalls training).
# Lowering needs the narrower format to stay at two thirds of that: the hysteresis.
DEFAULT_POLICIES: dict[str, KindPolicy] = {
    "weight": KindPolicy(min_bits=4, max_bits=16, raise_above=0.12, lower_below=0.08),
    "activation": KindPolicy(min_bits=4, max_bits=16, raise_above=0.2, lower_below=0.14),
    "gradient": KindPolicy(min_bits=4, max_bits=24, raise_above=0.25, lower_below=0.17),
}


def make_policies(policies: Mapping[str, KindPolicy | Mapping[str, Any]] | None = None) -> dict[str, KindPolicy]:
    """Every kind's policy: the defaults, with any field given per kind replaced; every problem at once.

    >>> make_policies({"gradient": {"max_bits": 12}})["gradient"].max_bits
    12
    >>> make_policies({"weight": {"raise_above": 2.0}, "bias": {}})
    Traceback (most recent call last):
    ...
    ValueError: unknown kind(s) ['bias']; allowed: ['weight', 'activation', 'gradient']; weight: raise_above must \
be a number in (0, 1) (a relative error), got 2.0
    """
    given = dict(policies or {})
    problems = []
    unknown = sorted(set(given) - set(KINDS))
    if unknown:
        problems.append(f"unknown kind(s) {unknown}; allowed: {list(KINDS)}")
    out = {}
    for kind in KINDS:
        value = given.get(kind)
        try:
            if isinstance(value, KindPolicy):
                out[kind] = value
            else:
                fields = {f.name for f in dataclasses.fields(KindPolicy)}
                bad = sorted(set(value or {}) - fields)
                if bad:
                    raise ValueError(f"unknown key(s) {bad}; allowed: {sorted(fields)}")
                out[kind] = dataclasses.replace(DEFAULT_POLICIES[kind], **(value or {}))
        except ValueError as err:
            problems.append(f"{kind}: {err}")
    if problems:
        raise ValueError("; ".join(problems))
    return out


# ----------------------------------------------------------------------------- pure decisions


@dataclass(frozen=True)
class Measurement:
    """How well a format holds data: relative RMS error, fractions saturated and flushed, the data's max |x|."""

    rel_error: float
    overflow: float
    underflow: float
    absmax: float


def fit_format(bits: int, absmax: float, rounding: str = "nearest") -> FixedFormat:
    """The ``bits``-bit fixed-point format with the most fraction bits that still holds ``absmax``.

    >>> fit_format(8, 3.0).name, fit_format(8, 0.01).name
    ('fixed8_5', 'fixed8_13')
    """
    return FixedFormat(bits, fixed_frac_for(bits, absmax), rounding)


def measure(fmt: FixedFormat, x: Tensor) -> Measurement:
    """The error of ``fmt`` (rounded to nearest) on the values ``x``; all-zero data has error 0.

    >>> import torch
    >>> m = measure(FixedFormat(8, 4), torch.tensor([0.01, 1.0, 100.0]))
    >>> round(m.rel_error, 3), m.overflow, m.underflow, m.absmax
    (0.921, 0.3333333333333333, 0.3333333333333333, 100.0)
    """
    x = x.detach().flatten().double()
    if x.numel() == 0:
        return Measurement(0.0, 0.0, 0.0, 0.0)
    q = FixedFormat(fmt.bits, fmt.frac).quantize(x)
    signal = float(x.square().sum())
    err = float((q - x).square().sum())
    rel = 0.0 if err == 0 else (math.sqrt(err / signal) if signal > 0 else math.inf)
    n = x.numel()
    overflow = float((x.abs() > fmt.max_value).sum()) / n
    underflow = float(((q == 0) & (x != 0)).sum()) / n
    return Measurement(rel, overflow, underflow, float(x.abs().max()))


@dataclass(frozen=True)
class Decision:
    """The format to use next, why (``init``, ``raise``, ``lower``, ``range``, ``hold``), the measurement
    of the format that was in force (of the chosen one for ``init``), the chosen format's error and the
    count of measurements in a row that allowed lowering."""

    format: FixedFormat
    reason: str
    measurement: Measurement
    new_error: float
    calm: int


def decide(x: Tensor, absmax: float, current: FixedFormat | None, policy: KindPolicy, calm: int = 0,
           rounding: str = "nearest") -> Decision:
    """One (site, kind)'s next format from a sample ``x`` of its data whose largest magnitude is ``absmax``.

    ``current``: the format in force (None before the first decision). ``calm``: measurements
    in a row so far that allowed lowering. The binary point always follows ``absmax``.

    >>> import torch
    >>> x = torch.linspace(-1, 1, 1001)
    >>> p = KindPolicy(min_bits=4, max_bits=16, raise_above=0.05, lower_below=0.02)
    >>> d = decide(x * 50, 50.0, FixedFormat(6, 4), p)  # the range grew: 6 bits at frac 4 saturate
    >>> d.reason, d.format.name
    ('range', 'fixed6_-1')
    """
    lo, hi = policy.min_bits, policy.max_bits

    def at(bits: int) -> Measurement:
        return measure(fit_format(bits, absmax), x)

    def holds(m: Measurement, limit: float) -> bool:
        return m.rel_error <= limit and m.underflow <= policy.max_underflow

    def fewest(start: int) -> int:
        return next((b for b in range(start, hi + 1) if holds(at(b), policy.raise_above)), hi)

    if current is None:
        bits = fewest(lo)
        fmt = fit_format(bits, absmax, rounding)
        m = measure(fmt, x)
        return Decision(fmt, "init", m, m.rel_error, 0)
    m = measure(current, x)
    bits = min(max(current.bits, lo), hi)  # bounds may have moved (a back-off raises the floor)
    if not holds(m, policy.raise_above) or not holds(at(bits), policy.raise_above) or bits != current.bits:
        bits, calm, reason = max(bits, fewest(bits)), 0, "raise"
    elif bits > lo and holds(at(bits - 1), policy.lower_below):
        calm += 1
        reason = "hold"
        if calm >= policy.patience:
            bits, calm, reason = bits - 1, 0, "lower"
    else:
        calm, reason = 0, "hold"
    fmt = fit_format(bits, absmax, rounding)
    if reason in ("raise", "hold") and bits == current.bits:
        reason = "hold" if fmt.frac == current.frac else "range"
    return Decision(fmt, reason, m, measure(fmt, x).rel_error, calm)


# ----------------------------------------------------------------------------- the controller


@dataclass(frozen=True)
class Change:
    """One logged change of a (site, kind)'s format, with the measurement that triggered it."""

    step: int
    site: str
    kind: str
    old: str
    new: str
    old_bits: int
    new_bits: int
    reason: str
    rel_error: float
    overflow: float
    underflow: float
    absmax: float
    new_error: float


@dataclass
class _State:
    step: int = 0
    formats: dict[tuple[str, str], FixedFormat] = field(default_factory=dict)
    calm: dict[tuple[str, str], int] = field(default_factory=dict)
    floor: dict[tuple[str, str], int] = field(default_factory=dict)
    changes: list[Change] = field(default_factory=list)
    # (first step, formats in force from it), one entry per measurement that changed something
    history: list[tuple[int, dict[tuple[str, str], FixedFormat]]] = field(default_factory=list)
    backoffs: int = 0
    boost: int = 0  # bits every back-off added to min_bits, for formats not yet chosen


class PrecisionController:
    """Owns the fixed-point formats of every selected (site, kind) of ``model`` and moves them as it trains.

    Call :meth:`step` once after every ``optimizer.step()``. The model is wrapped if it
    is not yet (its plan is replaced by the controller's). ``sites``: glob pattern(s)
    over site names; ``kinds``: which tensors; ``every``: measure one step in ``every``
    (the first step, at full precision, sets the initial widths); ``policies``: per kind
    a :class:`KindPolicy` or a mapping of the fields to change from
    :data:`DEFAULT_POLICIES`; ``rounding``: of the formats in training; ``pinned``: a
    width every format keeps (the binary point still follows the data), for uniform
    baselines; ``seed``: of the recorder's samples.

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> ctl = PrecisionController(model, every=2)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> for _ in range(3):
    ...     opt.zero_grad(); model(torch.randn(16, 4)).square().mean().backward(); opt.step(); ctl.step()
    >>> sorted({k for _, k in ctl.formats}), ctl.step_index, ctl.changes_frame()["reason"].iloc[0]
    (['activation', 'gradient', 'weight'], 3, 'init')
    >>> ctl.close()
    """

    def __init__(self, model: nn.Module, *, sites: str | Sequence[str] = "*", kinds: Sequence[str] = KINDS,
                 every: int = 10, policies: Mapping[str, KindPolicy | Mapping[str, Any]] | None = None,
                 rounding: str = "nearest", pinned: int | None = None, sample_size: int = 4096,
                 seed: int = 0) -> None:
        kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
        problems = []
        if not kinds or any(k not in KINDS for k in kinds):
            problems.append(f"kinds must be a non-empty subset of {list(KINDS)}, got {list(kinds)}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            problems.append(f"every must be an integer >= 1 (measure one step in every), got {every!r}")
        if pinned is not None and (isinstance(pinned, bool) or not isinstance(pinned, int)
                                   or not BITS_RANGE[0] <= pinned <= BITS_RANGE[1]):
            problems.append(f"pinned must be None or an integer in 2..32, got {pinned!r}")
        try:
            fit_format(8, 1.0, rounding)
        except ValueError as err:
            problems.append(str(err))
        try:
            self.policies = make_policies(policies)
        except ValueError as err:
            problems.append(str(err))
        if problems:
            raise ValueError("; ".join(problems))
        if pinned is not None:
            self.policies = {k: dataclasses.replace(p, min_bits=pinned, max_bits=pinned)
                             for k, p in self.policies.items()}
        self.model, self.kinds, self.every, self.rounding = model, kinds, every, rounding
        self.patterns = [sites] if isinstance(sites, str) else list(sites)
        self.sample_size, self.seed, self.pinned = sample_size, seed, pinned
        if not is_wrapped(model):
            wrap(model)
        set_plan(model, {})
        # Checks the patterns now: a typo fails here, not at the first measurement.
        record(model, layers=self.patterns, kinds=self.kinds)
        self._s = _State()
        self._rec: Recorder | None = None
        self._open_if_due()

    # ------------------------------------------------------------------ stepping
    @property
    def step_index(self) -> int:
        """Optimizer steps taken so far (calls of :meth:`step`)."""
        return self._s.step

    @property
    def formats(self) -> dict[tuple[str, str], FixedFormat]:
        """The format in force of every (site, kind) (empty until the first measurement)."""
        return dict(self._s.formats)

    @property
    def backoffs(self) -> int:
        return self._s.backoffs

    def plan(self) -> dict[str, QuantSpec]:
        """The formats in force as a plan (exact site names)."""
        by_site: dict[str, dict[str, FixedFormat]] = {}
        for (site, kind), fmt in self._s.formats.items():
            by_site.setdefault(site, {})[kind] = fmt
        return {site: QuantSpec(**kinds) for site, kinds in by_site.items()}

    def step(self) -> None:
        """End one optimizer step: decide from it if it was measured, then open the next measurement if due."""
        if self._rec is not None:
            rec, self._rec = self._rec, None
            rec.__exit__(None, None, None)
            self._decide(rec)
        self._s.step += 1
        self._open_if_due()

    def _open_if_due(self) -> None:
        if self._s.step % self.every == 0 and self._rec is None:
            self._rec = record(self.model, layers=self.patterns, kinds=self.kinds, sample_size=self.sample_size,
                               seed=self.seed * 1_000_003 + self._s.step).__enter__()

    def _decide(self, rec: Recorder) -> None:
        frame = rec.to_frame()
        frame = frame[~frame["quantized"] & (frame["count"] > 0)]
        s, step, changed = self._s, self._s.step, False
        for row in frame.itertuples():
            pair = (str(row.layer), str(row.kind))
            policy = self.policies[pair[1]]
            floor = max(s.floor.get(pair, 0), min(policy.min_bits + s.boost, policy.max_bits))
            policy = dataclasses.replace(policy, min_bits=max(policy.min_bits, floor))
            old = s.formats.get(pair)
            d = decide(rec.sample(*pair), float(row.absmax), old, policy, s.calm.get(pair, 0), self.rounding)
            s.calm[pair] = d.calm
            if old is None or d.format != old:
                changed = True
                s.formats[pair] = d.format
                s.changes.append(_change(step, pair, old, d.format, d.reason, d.measurement, d.new_error))
        if changed:
            self._apply(step + 1)

    def _apply(self, first_step: int) -> None:
        set_plan(self.model, self.plan())
        hist = self._s.history
        if hist and hist[-1][0] == first_step:
            hist.pop()
        hist.append((first_step, dict(self._s.formats)))

    def back_off(self, bits: int, reason: str = "backoff") -> None:
        """Raise every format by ``bits`` (within its kind's ``max_bits``) and never lower it below that again;
        formats not chosen yet start ``bits`` above ``min_bits``.

        For a run that diverged: the run restores its last checkpoint, calls this, and trains on.
        """
        if isinstance(bits, bool) or not isinstance(bits, int) or bits < 1:
            raise ValueError(f"bits must be an integer >= 1, got {bits!r}")
        s = self._s
        s.backoffs += 1
        s.boost += bits
        nan = math.nan
        for pair, old in sorted(s.formats.items()):
            new_bits = min(old.bits + bits, self.policies[pair[1]].max_bits)
            s.floor[pair] = new_bits
            new = FixedFormat(new_bits, old.frac + (new_bits - old.bits), old.rounding)  # same range, finer steps
            if new != old:
                s.formats[pair] = new
                s.changes.append(_change(s.step, pair, old, new, reason, Measurement(nan, nan, nan, nan), nan))
        self._apply(s.step)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Measure nothing inside (an evaluation between steps); a measurement that is due resumes after."""
        self.close()
        try:
            yield
        finally:
            self._open_if_due()

    def close(self) -> None:
        """Stop measuring (removes the recorder's hooks); the formats stay in force."""
        if self._rec is not None:
            self._rec.__exit__(None, None, None)
            self._rec = None

    # ------------------------------------------------------------------ results
    def changes_frame(self) -> pd.DataFrame:
        """Every logged change: :data:`CHANGE_COLUMNS`."""
        return pd.DataFrame([dataclasses.astuple(c) for c in self._s.changes], columns=list(CHANGE_COLUMNS))

    def schedule(self, steps: int | None = None) -> pd.DataFrame:
        """The formats used: one row per (stretch of steps with one format, site, kind): :data:`SCHEDULE_COLUMNS`.

        ``step`` is the stretch's first step, ``steps`` its length; steps before the first
        decision run at full precision (``fp32``, 32 bits). ``steps``: the run's total
        (default: the steps taken).
        """
        total = self._s.step if steps is None else steps
        hist = self._s.history
        pairs = sorted({p for _, fmts in hist for p in fmts}, key=lambda p: (p[0], KINDS.index(p[1])))
        order = list(dict.fromkeys(p[0] for _, fmts in hist for p in fmts))  # sites in model order
        pairs.sort(key=lambda p: (order.index(p[0]), KINDS.index(p[1])))
        starts = [0] + [start for start, _ in hist]
        formats: list[dict] = [{}] + [fmts for _, fmts in hist]
        rows = []
        for i, start in enumerate(starts):
            end = min(starts[i + 1] if i + 1 < len(starts) else total, total)
            if end <= start:
                continue
            for pair in pairs:
                fmt = formats[i].get(pair)
                rows.append((start, end - start, *pair, fmt.name if fmt else "fp32",
                             fmt.bits if fmt else FULL_BITS, fmt.frac if fmt else None))
        return pd.DataFrame(rows, columns=list(SCHEDULE_COLUMNS))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything the controller decided so far, as plain data (for ``torch.save(weights_only=True)``)."""
        s = self._s

        def fmts(d: Mapping[tuple[str, str], FixedFormat]) -> list[list]:
            return [[site, kind, f.bits, f.frac] for (site, kind), f in d.items()]

        return {"step": s.step, "formats": fmts(s.formats), "backoffs": s.backoffs, "boost": s.boost,
                "calm": [[*p, n] for p, n in s.calm.items()], "floor": [[*p, n] for p, n in s.floor.items()],
                "changes": [list(dataclasses.astuple(c)) for c in s.changes],
                "history": [[start, fmts(f)] for start, f in s.history]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`: formats in force, counters, log and the measurement schedule."""
        self.close()

        def fmts(rows: list[list]) -> dict[tuple[str, str], FixedFormat]:
            return {(site, kind): FixedFormat(int(b), int(f), self.rounding) for site, kind, b, f in rows}

        self._s = _State(int(state["step"]), fmts(state["formats"]),
                         {(a, b): int(n) for a, b, n in state["calm"]},
                         {(a, b): int(n) for a, b, n in state["floor"]},
                         [Change(*c) for c in state["changes"]],
                         [(int(start), fmts(f)) for start, f in state["history"]], int(state["backoffs"]),
                         int(state["boost"]))
        set_plan(self.model, self.plan())
        self._open_if_due()


def _change(step: int, pair: tuple[str, str], old: FixedFormat | None, new: FixedFormat, reason: str,
            m: Measurement, new_error: float) -> Change:
    return Change(step, pair[0], pair[1], old.name if old else "fp32", new.name, old.bits if old else FULL_BITS,
                  new.bits, reason, m.rel_error, m.overflow, m.underflow, m.absmax, new_error)

