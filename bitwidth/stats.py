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

from .stats_analysis import analyze, predict_min_bits
from .stats_stream import PERCENTILES, STAT_COLUMNS, StreamStats, hist_edges
from .wrap import COVERED, KINDS, covered_layers, is_wrapped

__all__ = ["record", "Recorder", "analyze", "predict_min_bits", "hist_edges", "PERCENTILES", "STAT_COLUMNS"]


def _layer_type(m: nn.Module) -> str:
    return next((c.__name__ for c in type(m).__mro__ if c in COVERED), type(m).__name__)


def _macs_per_sample(m: nn.Module, x: Tensor, y: Tensor) -> float:
    """Multiply-accumulates per sample, from the shapes of one call (NaN where unknown)."""
    if isinstance(m, nn.Linear):
        batch = x.shape[0] if x.dim() > 1 else 1
        return y.numel() / batch * m.in_features
    if isinstance(m, nn.modules.conv._ConvNd):
        batch = x.shape[0] if x.dim() == m.weight.dim() else 1
        # Each output (conv) or input (transposed conv) element costs one weight slice.
        per = y if not isinstance(m, nn.modules.conv._ConvTransposeNd) else x
        return per.numel() / batch * m.weight[0].numel()
    if isinstance(m, nn.Embedding):
        return 0.0
    return math.nan


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
        self.layers: dict[str, dict[str, Any]] = {}  # name -> layer_type, params, macs
        self._modules: dict[str, nn.Module] = {}
        self._after_quant = False
        self._streams: dict[tuple[str, str, bool, int], StreamStats] = {}
        self._fresh: list[StreamStats] = []  # made in this snapshot
        self._current: dict[tuple[str, str, bool], StreamStats] = {}  # the open snapshot's streams
        self._pending: dict[tuple[str, bool], Any] = {}  # weights to summarize at snapshot close
        self._handles: list[Any] = []
        self._grad_hooks: list[tuple[Any, int]] = []  # (weak ref to a hooked output's hook dict, our key)
        self._taps: list[tuple[nn.Module, Any]] = []
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
        self._open = True
        try:
            for name, m in self._modules.items():
                self._handles.append(m.register_forward_hook(partial(self._on_forward, name)))
                if self._after_quant and is_wrapped(m):
                    tap = partial(self._on_tap, name)
                    m._bw.taps.append(tap)  # type: ignore[union-attr]
                    self._taps.append((m, tap))
        except BaseException:
            self._close()
            raise
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
            for h in self._handles:
                h.remove()
            for ref, key in self._grad_hooks:  # graphs still alive: their hooks must not hold us
                hooks = ref()
                if hooks is not None:
                    hooks.pop(key, None)
            for m, tap in self._taps:
                taps = getattr(getattr(m, "_bw", None), "taps", [])
                if tap in taps:
                    taps.remove(tap)
            self._handles, self._grad_hooks, self._taps = [], [], []

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

    def _on_forward(self, name: str, module: nn.Module, args: tuple, output: Any) -> None:
        x = args[0] if args else None
        info = self.layers[name]
        if math.isnan(info["macs"]) and isinstance(x, Tensor) and isinstance(output, Tensor):
            info["macs"] = _macs_per_sample(module, x, output)
        if not self._active:
            return
        kinds = self.kinds
        if "activation" in kinds and isinstance(x, Tensor) and x.is_floating_point():
            self._add(name, "activation", False, x)
        if "weight" in kinds:
            self._pending[(name, False)] = module
        if "gradient" in kinds and isinstance(output, Tensor) and output.grad_fn is not None:
            # A tensor hook, as Tensor.register_hook makes one but without its handle object
            # (this runs for every layer on every forward): a dict of hooks on the node that
            # made the output. It receives the gradient w.r.t. the output as the layer
            # produced it, even when an in-place op follows (torchvision's ReLU(inplace=True)),
            # which breaks module backward hooks.
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
            if len(self._grad_hooks) > 8 * len(self._modules) + 64:
                # Hook dicts of graphs already freed are dead; dropping them bounds memory.
                self._grad_hooks = [h for h in self._grad_hooks if h[0]() is not None]

    def _on_grad(self, name: str, step: int, grad: Tensor | None) -> None:
        if self._open and grad is not None:
            self._add(name, "gradient", False, grad, step)

    def _on_tap(self, name: str, kind: str, tensor: Tensor) -> None:
        if not (self._open and self._active and kind in self.kinds):
            return
        if kind == "weight":
            self._pending[(name, True)] = tensor.detach()
        else:
            self._add(name, kind, True, tensor)

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
        for (name, quantized), src in self._pending.items():
            w = src.weight if isinstance(src, nn.Module) else src
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
        """Write everything (statistics, histograms, samples) to a ``.pt`` file.

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
        torch.save(state, path)

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

    ``layers``: glob pattern(s) over the quantizable layer names (None: all). ``kinds``: any of
    weight, activation (the layer's input), gradient (w.r.t. its output). ``every=N``:
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
    covered = covered_layers(model)
    if not covered:
        raise ValueError("the model has no quantizable layers (Linear, Conv*, ConvTranspose*, Embedding)")
    patterns = ["*"] if layers is None else [layers] if isinstance(layers, str) else list(layers)
    if not patterns:
        raise ValueError("layers must be None or name at least one layer or glob pattern")
    for p in patterns:
        if not any(fnmatch.fnmatchcase(n, p) for n in covered):
            names = ", ".join(list(covered)[:8]) + (", …" if len(covered) > 8 else "")
            raise ValueError(f"layer pattern {p!r} matches no quantizable layer; layers: {names}")
    if after_quant and not any(is_wrapped(m) for m in covered.values()):
        raise ValueError("after_quant=True needs a wrapped model; call bitwidth.wrap(model, plan) first")
    rec = Recorder(kinds, every, sample_size, seed)
    rec._after_quant = after_quant
    for name, m in covered.items():
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            rec._modules[name] = m
            params = sum(p.numel() for p in m.parameters(recurse=False))
            rec.layers[name] = {"layer_type": _layer_type(m), "params": params, "macs": math.nan}
    return rec
