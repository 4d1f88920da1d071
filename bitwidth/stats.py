"""Distribution recording: streaming per-layer statistics of weights, activations and gradients.

``record(model)`` is a context manager: inside it every forward pass records each
selected layer's input activation, every backward pass the gradient w.r.t. its output,
and each snapshot the layer's weight. Nothing keeps whole tensors: each (layer, kind,
quantized, step) holds running moments, extremes, a histogram of log2|x| and a bounded
reservoir sample, so memory does not grow with the number of batches.

>>> import torch, torch.nn as nn
>>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
>>> with record(model) as rec:
...     model(torch.randn(8, 4)).sum().backward()
>>> rec.to_frame()[["layer", "kind", "count"]].head(3).to_string(index=False)
'layer       kind  count\\n    0     weight     12\\n    0 activation     32\\n    0   gradient     24'
"""

from __future__ import annotations

import fnmatch
import math
import weakref
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from .sites import Engine, engine_of
from .stats_analysis import analyze, predict_min_bits
from .stats_stream import PERCENTILES, STAT_COLUMNS, StreamStats, hist_edges
from .wrap import KINDS, is_wrapped

__all__ = ["record", "Recorder", "analyze", "predict_min_bits", "hist_edges", "PERCENTILES", "STAT_COLUMNS"]


class Recorder:
    """Streaming statistics per (layer, kind, quantized, step); made by :func:`record`.

    Weights are summarized once per snapshot, as they are when it closes (``step()`` or
    exit): the layer's weight, or the last quantized weight it used. Reading the results
    inside the ``with`` block shows everything so far, the weights as they are then.

    >>> rec = Recorder(kinds=("weight",))
    >>> rec.to_frame().empty
    True
    """

    def __init__(self, kinds: Sequence[str] = KINDS, every: int | None = None,
                 sample_size: int = 4096, seed: int = 0) -> None:
        self.kinds, self.every, self.sample_size, self.seed = tuple(kinds), every, sample_size, seed
        self.step_index = 0
        self.layers: dict[str, dict[str, Any]] = {}  # site -> layer_type, params, macs
        self._engine: Engine | None = None
        self._patterns: list[str] = ["*"]
        self._selected: dict[str, bool] = {}  # site -> recorded (the patterns, cached)
        self._after_quant = False
        self._streams: dict[tuple[str, str, bool, int], StreamStats] = {}
        self._fresh: list[StreamStats] = []  # made in this snapshot
        self._current: dict[tuple[str, str, bool], StreamStats] = {}  # the open snapshot's streams
        self._pending: dict[tuple[str, bool], Any] = {}  # weights to summarize at snapshot close
        self._handles: list[Any] = []
        self._grad_hooks: list[tuple[Any, int]] = []  # (weak ref to a hooked output's hook dict, our key)
        self._open = False

    # ------------------------------------------------------------------ recording
    @property
    def _snap(self) -> int:
        return 0 if self.every is None else self.step_index

    @property
    def _active(self) -> bool:
        return self.every is None or self.step_index % self.every == 0

    def __enter__(self) -> Recorder:
        if self._open:
            raise ValueError("this recorder is already recording")
        if self._engine is None:
            raise ValueError("a recorder made by Recorder() cannot record; use bitwidth.record(model)")
        self._open = True
        self._engine.taps.append(self._on_tap)
        self._engine.refresh()
        return self

    def __exit__(self, *exc: object) -> None:
        self._close()

    def _close(self) -> None:
        try:
            self._summarize_weights()
            for st in self._streams.values():
                st.flush(release=True)
        finally:
            self._open = False
            eng = self._engine
            if eng is not None and self._on_tap in eng.taps:
                eng.taps.remove(self._on_tap)
                eng.refresh()
            for ref, key in self._grad_hooks:  # graphs still alive: their hooks must not hold us
                hooks = ref()
                if hooks is not None:
                    hooks.pop(key, None)
            self._grad_hooks = []

    def step(self) -> None:
        """Close the current step (summarizing its weights) and start the next one.

        With ``every=N`` only steps 0, N, 2N… are recorded, each as its own snapshot;
        call it once per optimizer step, or once per epoch.

        >>> model = nn.Sequential(nn.Linear(2, 2))
        >>> with record(model, kinds="activation", every=2) as rec:
        ...     for i in range(3):
        ...         _ = model(torch.full((1, 2), float(i)))
        ...         rec.step()
        >>> rec.to_frame()[["step", "mean"]].values.tolist()
        [[0.0, 0.0], [2.0, 2.0]]
        """
        if self.every is not None:  # without snapshots there is nothing to close
            self._summarize_weights()
            for st in self._fresh:  # a closed snapshot keeps no buffer
                st.flush(release=True)
            self._fresh, self._current = [], {}
        self.step_index += 1

    def _wanted(self, site: str) -> bool:
        ok = self._selected.get(site)
        if ok is None:
            ok = self._selected[site] = any(fnmatch.fnmatchcase(site, p) for p in self._patterns)
            if ok and site not in self.layers:
                self.layers[site] = {"layer_type": self._engine.seen.get(site, "") if self._engine else "",
                                     "params": 0, "macs": math.nan}
        return ok

    def _on_tap(self, site: str, kind: str, tensor: Tensor, quantized: bool) -> None:
        if not (self._open and self._active and self._wanted(site)):
            return
        info = self.layers[site]
        if kind == "output":
            if math.isnan(info["macs"]) and self._engine is not None:
                info["macs"] = self._engine.site_macs.get(site, math.nan)
            if "gradient" in self.kinds:
                self._hook_gradient(site, tensor)
            return
        elif kind not in self.kinds or (quantized and not self._after_quant):
            return
        elif kind == "weight":
            self._pending[(site, quantized)] = tensor.detach()
        else:
            self._add(site, kind, quantized, tensor)

    def _hook_gradient(self, name: str, output: Tensor) -> None:
        if output.grad_fn is None:
            return
        # A tensor hook, as Tensor.register_hook makes one but without its handle object
        # (this runs for every site on every forward): a dict of hooks on the node that
        # made the output. It receives the gradient w.r.t. the output as the op produced
        # it, even when an in-place op follows (torchvision's ReLU(inplace=True)).
        hook = partial(self._on_grad, name, self._snap)
        hooks = output._backward_hooks  # an OrderedDict (weakly referable) once hooked
        register = getattr(output.grad_fn, "_register_hook_dict", None)
        if hooks is None and register is None:  # a torch without it: the public route
            handle = output.register_hook(hook)
            self._grad_hooks.append((handle.hooks_dict_ref, handle.id))
        else:
            if hooks is None:
                hooks = output._backward_hooks = OrderedDict()
                register(output)
            hooks[id(self)] = hook
            self._grad_hooks.append((weakref.ref(hooks), id(self)))
        if len(self._grad_hooks) > 8 * len(self.layers) + 64:
            # Hook dicts of graphs already freed are dead; dropping them bounds memory.
            self._grad_hooks = [h for h in self._grad_hooks if h[0]() is not None]

    def _on_grad(self, name: str, step: int, grad: Tensor | None) -> None:
        if self._open and grad is not None:
            self._add(name, "gradient", False, grad, step)

    def _stream(self, name: str, kind: str, quantized: bool, step: int, fresh: bool = False) -> StreamStats:
        key = (name, kind, quantized, step)
        s = self._streams.get(key)
        if s is None or fresh:
            seed = (self.seed, zlib.crc32(name.encode()), KINDS.index(kind), int(quantized), step)
            s = self._streams[key] = StreamStats(self.sample_size, seed)
            self._fresh.append(s)
        return s

    def _add(self, name: str, kind: str, quantized: bool, x: Tensor, step: int | None = None) -> None:
        # Runs for every recorded tensor: the open snapshot's streams are one lookup away.
        snap = self._snap
        if step is not None and step != snap:  # a gradient arriving after its step closed
            self._stream(name, kind, quantized, step).add(x)
            return
        st = self._current.get((name, kind, quantized))
        if st is None:
            st = self._current[(name, kind, quantized)] = self._stream(name, kind, quantized, snap)
        st.add(x)

    def _summarize_weights(self, close: bool = True) -> None:
        # A read inside the step summarizes too, but keeps the weights pending: the
        # snapshot's figure is the weight at its close.
        for (name, quantized), w in self._pending.items():
            self._stream(name, "weight", quantized, self._snap, fresh=True).add(w, pool=False)
        if close:
            self._pending.clear()

    # ------------------------------------------------------------------ results
    def _rows(self) -> list[tuple[tuple[str, str, bool, int], StreamStats]]:
        if self._open:
            self._summarize_weights(close=False)
        for st in self._streams.values():
            st.flush()
        order = {n: i for i, n in enumerate(self.layers)}
        return sorted(self._streams.items(),
                      key=lambda kv: (kv[0][3], order[kv[0][0]], KINDS.index(kv[0][1]), kv[0][2]))

    def _key_columns(self) -> list[str]:
        return ["layer", "kind", "quantized"] + ([] if self.every is None else ["step"])

    def _key(self, key: tuple[str, str, bool, int]) -> dict[str, Any]:
        return dict(zip(self._key_columns(), key, strict=False))  # no step column without every

    def to_frame(self) -> pd.DataFrame:
        """One row per (layer, kind, quantized[, step]) with the statistics of :data:`STAT_COLUMNS`.

        ``count`` is the number of finite values, the population of every other figure;
        ``zero_frac`` is a fraction of it; percentiles are of |x| (within one histogram bin).

        >>> model = nn.Sequential(nn.Linear(2, 1))
        >>> with record(model, kinds="activation") as rec:
        ...     _ = model(torch.tensor([[0.0, 3.0], [float("inf"), -1.0]]))
        >>> rec.to_frame().loc[0, ["count", "absmax", "zero_frac", "inf_count"]].tolist()
        [3.0, 3.0, 0.3333333333333333, 1.0]
        """
        info_cols = ["layer_type", "params", "macs"]
        for name, info in self.layers.items():  # sites whose gradient was not taken: MACs seen by the engine
            if math.isnan(info["macs"]) and self._engine is not None and name in self._engine.site_macs:
                info["macs"] = self._engine.site_macs[name]
        rows = [{**self._key(k), **{c: self.layers[k[0]][c] for c in info_cols}, **s.summary()}
                for k, s in self._rows()]
        return pd.DataFrame(rows, columns=self._key_columns() + info_cols + list(STAT_COLUMNS))

    def hist_frame(self) -> pd.DataFrame:
        """The log2|x| histograms in long form: one row per nonempty bin ``[lo, hi)``.

        Each row also carries its stream's ``min``, ``max``, ``zeros`` and ``count`` (finite
        values), so a plot can place data-dependent format ranges and normalise.

        >>> model = nn.Sequential(nn.Linear(2, 1))
        >>> with record(model, kinds="activation") as rec:
        ...     _ = model(torch.tensor([[1.0, 1.1], [3.0, 0.0]]))
        >>> rec.hist_frame()[["lo", "hi", "n"]].values.tolist()
        [[1.0, 1.125, 2.0], [3.0, 3.25, 1.0]]
        """
        frames = []
        for key, s in self._rows():
            h, edges = s.histogram(), hist_edges()
            nz = np.flatnonzero(h)
            frames.append(pd.DataFrame({**self._key(key), "lo": edges[nz], "hi": edges[nz + 1], "n": h[nz],
                                        "min": s.min, "max": s.max, "zeros": s.zeros, "count": s.count}))
        cols = self._key_columns() + ["lo", "hi", "n", "min", "max", "zeros", "count"]
        return pd.concat(frames, ignore_index=True)[cols] if frames else pd.DataFrame(columns=cols)

    def sample(self, layer: str, kind: str, *, quantized: bool = False, step: int | None = None) -> Tensor:
        """The reservoir sample (finite values, CPU float32) of one stream; by default its last step.

        >>> rec = Recorder()
        >>> rec.sample("fc", "weight")
        Traceback (most recent call last):
        ...
        ValueError: nothing recorded for layer='fc' kind='weight' quantized=False step=0; recorded (layer, kind): []
        """
        self._rows()
        if step is None:  # the latest snapshot of this stream
            step = max((k[3] for k in self._streams if k[:3] == (layer, kind, quantized)), default=self._snap)
        key = (layer, kind, quantized, step)
        if key not in self._streams:
            have = [k[:2] for k in self._streams]
            raise ValueError(f"nothing recorded for layer={layer!r} kind={kind!r} quantized={quantized} "
                             f"step={key[3]}; recorded (layer, kind): {sorted(set(have))}")
        return torch.from_numpy(self._streams[key].sample.copy())

    def save(self, path: str | Path) -> None:
        """Write everything (statistics, histograms, samples) to a ``.pt`` file, whole or not at all.

        The file is written under a temp name unique to this process and renamed onto
        ``path``, so a kill or a concurrent writer never leaves a partial file.

        >>> import tempfile, pathlib
        >>> model = nn.Sequential(nn.Linear(2, 1))
        >>> with record(model) as rec:
        ...     model(torch.ones(3, 2)).sum().backward()
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "stats.pt"
        >>> rec.save(path)
        >>> Recorder.load(path).to_frame().equals(rec.to_frame())
        True
        """
        state = {
            "version": 1, "kinds": list(self.kinds), "every": self.every, "sample_size": self.sample_size,
            "seed": self.seed, "step_index": self.step_index, "layers": self.layers,
            "streams": [{"key": list(k), **s.state()} for k, s in self._rows()],
        }
        from .store import atomic_file  # only writing needs it

        with atomic_file(path, "wb") as f:
            torch.save(state, f)

    @classmethod
    def load(cls, path: str | Path) -> Recorder:
        """Read a recorder written by :meth:`save` (safe: ``weights_only``); it can report, not record."""
        st = torch.load(path, weights_only=True)
        rec = cls(st["kinds"], st["every"], st["sample_size"], st["seed"])
        rec.step_index, rec.layers = st["step_index"], st["layers"]
        for s in st["streams"]:
            name, kind, quantized, step = s["key"]
            rec._streams[(name, kind, bool(quantized), int(step))] = StreamStats.from_state(s)
        return rec


def record(
    model: nn.Module,
    layers: str | Sequence[str] | None = "*",
    kinds: str | Sequence[str] = KINDS,
    every: int | None = None,
    after_quant: bool = False,
    sample_size: int = 4096,
    seed: int = 0,
) -> Recorder:
    """Record per-layer statistics while the ``with`` body runs; every hook is removed on exit.

    ``layers``: glob pattern(s) over site names (None: all; see :mod:`bitwidth.sites`).
    ``kinds``: any of weight, activation (the input of a matrix-multiplying op), gradient
    (w.r.t. its output). ``every=N``:
    a separate snapshot for steps 0, N, 2N… (advance with ``rec.step()``).
    ``after_quant``: on a wrapped model also record the quantized tensors
    (rows with ``quantized=True``); the raw ones are always recorded.

    Memory per (layer, kind[, step]): ``sample_size`` floats (fewer if fewer were seen)
    and the histogram's bins in use (about 1 KB), plus, while its snapshot is open, all
    2048 bins (16 KB) and 33 KB of partial histograms (CPU data, merged at once by
    compiled kernels) or, for data on an accelerator, a buffer of up to 256 KB that pools
    batches under 65536 values.

    >>> import torch.nn as nn
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    >>> with record(model, layers="1", kinds="activation") as rec:
    ...     _ = model(torch.ones(2, 4))
    >>> rec.to_frame()[["layer", "count", "macs"]].values.tolist()
    [['1', 8, 8.0]]
    """
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {kinds!r}")
    if every is not None and (not isinstance(every, int) or every < 1):
        raise ValueError(f"every must be None or a positive integer, got {every!r}")
    if not isinstance(sample_size, int) or sample_size < 0:
        raise ValueError(f"sample_size must be a non-negative integer, got {sample_size!r}")
    eng = engine_of(model) or engine_of(model, create=True)
    assert eng is not None
    known = [*eng.slots, *(n for n in eng.seen if n not in eng.slots)]
    if not known and not eng.modules:
        raise ValueError("the model has no sites")
    patterns = ["*"] if layers is None else [layers] if isinstance(layers, str) else list(layers)
    if not patterns:
        raise ValueError("layers must be None or name at least one site or glob pattern")
    unmatched = [p for p in patterns
                 if not any(fnmatch.fnmatchcase(n, p) for n in known) and not (":" in p and not eng.seen)]
    if unmatched:  # every one at once
        names = ", ".join(known[:8]) + (", …" if len(known) > 8 else "")
        raise ValueError(f"site pattern(s) {', '.join(map(repr, unmatched))} match no site; sites: {names or 'none'}"
                         + ("" if eng.seen else " (op sites module:op.i are known once the model has run)"))
    if after_quant and not is_wrapped(model):
        raise ValueError("after_quant=True needs a wrapped model; call bitwidth.wrap(model, plan) first")
    rec = Recorder(kinds, every, sample_size, seed)
    rec._after_quant, rec._engine, rec._patterns = after_quant, eng, patterns
    for name, slot in eng.slots.items():
        if rec._wanted(name):
            rec.layers[name].update(layer_type=type(slot.module).__name__, params=slot.param.numel())
    return rec
