"""Sites: every tensor of a model a format can apply to, found while the model runs.

A **weight site** is a weight parameter of a module (see :mod:`bitwidth.registry`),
named by its module (``fc``) or, for a parameter not called ``weight``, by module and
parameter (``encoder.layers.0.self_attn.in_proj_weight``, ``lstm.weight_hh_l0``).
While a wrapped model runs, each quantized weight is swapped into its module's
parameter table for the duration of the outermost forward, so every read of it (by the
module, by a parent such as ``MultiheadAttention`` reading ``out_proj.weight``, through
``chunk`` or ``split``) sees the quantized tensor. The parameter objects and
``state_dict`` keys never change.

An **op site** is a call of a matrix-multiplying op (:mod:`bitwidth.ops`), seen through
a ``TorchFunctionMode`` that is active only while a wrapped model runs. Its activation
is the op's multiplied inputs, its gradient the gradient w.r.t. its output. A call that
consumes a weight site takes that site's name (``fc`` is the Linear's weight, its input
and its output gradient, as a layer always was); any other call is named by the module
running it, the op and its index among that module's calls of the op in one forward:
``h.0.attn:matmul.1``. ``scaled_dot_product_attention`` gives three sites, ``…:sdpa.q``,
``…:sdpa.k`` and ``…:sdpa.v``; the last also carries the gradient of its output. Fused
recurrent kernels (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``) run step by step through
``linear`` while a plan or recorder needs their inputs, so ``lstm.weight_hh_l0`` is also
the hidden state entering that matrix.

>>> import torch, torch.nn as nn
>>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
>>> seen = []
>>> eng = engine_of(model, create=True)
>>> eng.taps.append(lambda site, kind, t, quantized: seen.append((site, kind)))
>>> eng.refresh()
>>> _ = model(torch.zeros(1, 4))
>>> seen  # the weight, the op's input, the op's output (where a recorder hooks the gradient)
[('0', 'weight'), ('0', 'activation'), ('0', 'output')]
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as TF
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from . import functional as F
from .formats import Format, IntFormat
from .ops import OPS, RNN_OPS, Op, op_macs, operands, sdpa_macs, with_operands
from .registry import weight_axes

__all__ = ["Engine", "SiteState", "WeightSlot", "engine_of"]

NO_SPEC = types.SimpleNamespace(weight=None, activation=None, gradient=None, empty=True)
Tap = Callable[[str, str, Tensor, bool], None]  # (site, kind, tensor, quantized)


def _unchecked(fn: Callable) -> Callable:
    """A copy of a torch Python function that does not re-dispatch to modes itself.

    ``F.multi_head_attention_forward`` hands itself to the active mode; to see the
    ``linear`` and attention calls inside it, the mode runs this copy with itself active.
    """
    def no(*args: Any) -> bool:
        return False

    glb = {**fn.__globals__, "has_torch_function": no, "has_torch_function_unary": no,
           "has_torch_function_variadic": no}
    copy = types.FunctionType(fn.__code__, glb, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


_COMPOSITES = {TF.multi_head_attention_forward: _unchecked(TF.multi_head_attention_forward)}


@dataclass(eq=False)
class WeightSlot:
    """One weight site: the parameter ``pname`` of ``module``, per-channel along ``axis``."""

    name: str
    module: nn.Module
    pname: str
    axis: int

    @property
    def param(self) -> Tensor:
        return self.module._parameters[self.pname]  # type: ignore[return-value]


@dataclass(eq=False)
class SiteState:
    """What a site carries besides its spec: calibration and the cached quantized weight."""

    calib: dict[Any, Any] | None = None
    cache: tuple | None = None


@dataclass(eq=False)
class _Trace:
    """What one traced forward saw of each site: for :func:`sites`."""

    rows: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)

    def add(self, site: str, kind: str, op: str, t: Any, macs: int, inputs: int = 1, reason: str = "") -> None:
        row = self.rows.get((site, kind))
        if row is None:
            shape = tuple(t.shape) if isinstance(t, Tensor) else ()
            n = t.numel() if isinstance(t, Tensor) else 0
            self.rows[(site, kind)] = {"site": site, "kind": kind, "op": op, "shape": shape, "elements": n,
                                       "macs": macs, "inputs": inputs, "quantizable": not reason,
                                       "reason": reason}
        else:  # a site called again in one forward (shared module, loop): its MACs add up
            row["macs"] += macs


def _no_spec(site: str) -> Any:
    return NO_SPEC


def engine_of(model: nn.Module, create: bool = False) -> Engine | None:
    """The site engine attached to ``model`` (by ``wrap``), or a new detached one if ``create``."""
    eng = model.__dict__.get("_bw_engine")
    if eng is None and create:
        eng = Engine(model)
    return eng


class _Mode(TorchFunctionMode):
    def __init__(self, engine: Engine) -> None:
        super().__init__()
        self.engine = engine

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        op = OPS.get(func)
        if op is not None:
            return self.engine.run_op(op, func, args, kwargs)
        if func in RNN_OPS:
            return self.engine.run_rnn(RNN_OPS[func], func, args, kwargs)
        composite = _COMPOSITES.get(func)
        if composite is not None:
            with self:
                return composite(*args, **kwargs)
        return func(*args, **kwargs)


class Engine:
    """The site machinery of one model: hooks, weight swaps, op interception, specs, taps.

    Made by :func:`engine_of`; ``wrap``, ``calibrate`` and ``record`` configure it. With
    nothing to do (empty plan, no recorder, no calibration) it removes its hooks, so the
    model runs exactly as before.
    """

    def __init__(self, model: nn.Module) -> None:
        self.modules = dict(model.named_modules())
        self.slots: dict[str, WeightSlot] = {}
        for mname, m in self.modules.items():
            for pname, axis in weight_axes(m).items():
                name = mname if pname == "weight" else f"{mname}.{pname}" if mname else pname
                self.slots[name] = WeightSlot(name, m, pname, axis)
        self.resolver: Callable[[str], Any] = _no_spec  # site -> QuantSpec (wrap sets it)
        self.specs: dict[str, Any] = {}  # resolved, for every site seen or known
        self.seen: dict[str, str] = {}  # op sites seen in some forward -> op name
        self.states: dict[str, SiteState] = {}
        self.taps: list[Tap] = []
        self.site_macs: dict[str, float] = {}  # MACs per example of each op site (while tapped)
        self.observing = False
        self.trace: _Trace | None = None
        self._hooks: list[Any] = []
        self._mode = _Mode(self)
        self._stack: list[tuple[str, dict[str, int]]] = []
        self._swapped: dict[int, WeightSlot] = {}  # id(quantized tensor) -> its site
        self._originals: list[tuple[WeightSlot, Tensor]] = []  # parameters swapped out
        self._moded = False  # whether this forward intercepts ops
        self._by_param: dict[int, list[WeightSlot]] = {}

    # ------------------------------------------------------------------ configuration
    def spec(self, site: str) -> Any:
        s = self.specs.get(site)
        if s is None:
            s = self.specs[site] = self.resolver(site)
        return s

    def set_resolver(self, resolver: Callable[[str], Any]) -> None:
        self.resolver, self.specs = resolver, {}
        for name in self.slots:
            self.spec(name)
        for name in self.seen:
            self.spec(name)
        self.refresh()

    @property
    def busy(self) -> bool:
        return bool(self.taps or self.observing or self.trace is not None or getattr(self.resolver, "active", False))

    def refresh(self) -> None:
        """Hooks on every module while there is work; none otherwise."""
        if self.busy and not self._hooks:
            for name, m in self.modules.items():
                self._hooks.append(m.register_forward_pre_hook(functools.partial(self._pre, name)))
                self._hooks.append(m.register_forward_hook(functools.partial(self._post, name), always_call=True))
        elif not self.busy and self._hooks:
            self.remove_hooks()

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def state(self, site: str) -> SiteState:
        st = self.states.get(site)
        if st is None:
            st = self.states[site] = SiteState()
        return st

    # ------------------------------------------------------------------ one forward
    def _pre(self, name: str, module: nn.Module, args: tuple) -> None:
        if not self._stack:
            self._begin()
        self._stack.append((name, {}))

    def _post(self, name: str, module: nn.Module, args: tuple, output: Any) -> None:
        if self._stack:
            self._stack.pop()
            if not self._stack:
                self._end()

    def _begin(self) -> None:
        self._by_param = {}
        for slot in self.slots.values():
            p = slot.param
            if p is not None:
                self._by_param.setdefault(id(p), []).append(slot)
        self._swapped, self._originals = {}, []
        for tap in self.taps:
            for slot in self.slots.values():
                tap(slot.name, "weight", slot.param, False)
        try:
            for slot in self.slots.values():
                fmt = self.spec(slot.name).weight
                if fmt is not None and slot.param is not None:
                    q = self._quantize_weight(slot, fmt)
                    for tap in self.taps:
                        tap(slot.name, "weight", q, True)
                    self._originals.append((slot, slot.param))
                    slot.module._parameters[slot.pname] = q
                    self._swapped[id(q)] = slot
        except BaseException:
            self._restore()
            raise
        self._moded = self._needs_mode()
        if self._moded:
            self._mode.__enter__()

    def _end(self) -> None:
        if self._moded:
            self._mode.__exit__(None, None, None)
        self._restore()

    def _needs_mode(self) -> bool:
        # Weight-only plans need no interception, except where a fused kernel holds its
        # own references to the parameters (RNNs' _flat_weights).
        return bool(getattr(self.resolver, "op_work", True) or self.taps or self.observing
                    or self.trace is not None
                    or any(isinstance(slot.module, nn.RNNBase) for slot, _ in self._originals))

    def _restore(self) -> None:
        for slot, p in self._originals:
            slot.module._parameters[slot.pname] = p
        self._originals, self._swapped = [], {}

    def _quantize_weight(self, slot: WeightSlot, fmt: Format) -> Tensor:
        # A quantized weight is reused until the weight changes (in-place updates bump its
        # version counter): repeated evaluation is nearly free. With autograd on, a reuse
        # passes the gradient through the cached straight-through mask (the exact STE
        # gradient, from one backward of the quantizer per weight version); a training
        # step changes the weight, so training quantizes afresh every step.
        w, st = slot.param, self.state(slot.name)
        key = (w._version, w.data_ptr(), fmt)
        cacheable = fmt.rounding == "nearest"
        grad = torch.is_grad_enabled() and w.requires_grad
        if cacheable and st.cache is not None and st.cache[0] == key:
            _, q, mask = st.cache
            if q is None:  # a second call at this weight version: worth keeping from now on
                q = fmt.quantize(w.detach(), axis=slot.axis)
            if grad and mask is None:
                mask = _ste_mask(w, fmt, slot.axis)
            st.cache = (key, q, mask)
            return _CachedSTE.apply(w, q, mask) if grad else q
        q = fmt.quantize(w, axis=slot.axis)
        # Training changes the weight every step: keep no copy until a version is used twice.
        st.cache = (key, None if grad else q, None) if cacheable else None
        return q

    def _weight_site(self, t: Any) -> WeightSlot | None:
        if not isinstance(t, Tensor):
            return None
        for cand in (t, t._base):
            if cand is None:
                continue
            slot = self._swapped.get(id(cand))
            if slot is not None:
                return slot
            slots = self._by_param.get(id(cand))
            if slots:
                # a tied weight (lm_head and wte) is named by the module reading it
                running = self.modules.get(self._stack[-1][0]) if self._stack else None
                return next((s for s in slots if s.module is running), slots[0])
        return None

    def _functional(self, opname: str) -> str:
        module, counts = self._stack[-1] if self._stack else ("", {})
        i = counts.get(opname, 0)
        counts[opname] = i + 1
        return f"{module}:{opname}.{i}"

    # ------------------------------------------------------------------ ops
    def run_op(self, op: Op, func: Callable, args: tuple, kwargs: dict) -> Any:
        values = operands(op, args, kwargs)
        weights = [self._weight_site(v) for v in values]  # which operands are weight sites
        slot = next((s for s in weights if s is not None), None)
        if op.name == "sdpa":
            base = self._functional("sdpa")
            base = base[:-2] if base.endswith(".0") else base  # the first call is plain "sdpa"
            names = [f"{base}.{x}" for x in "qkv"]
        else:
            names = [slot.name if slot is not None else self._functional(op.name)] * len(values)
        if slot is None or op.name == "sdpa":
            for name in dict.fromkeys(names):
                self.seen.setdefault(name, op.name)
        acts = [i for i, (v, w) in enumerate(zip(values, weights, strict=True))
                if w is None and isinstance(v, Tensor) and v.is_floating_point()]
        new = list(values)
        for i in acts:
            new[i] = self._activation(names[i], values[i])
        if any(new[i] is not values[i] for i in acts):
            args, kwargs = with_operands(op, args, kwargs, new)
        out = func(*args, **kwargs)
        per = _operand_macs(op, args, values, out) if self.trace is not None or self.taps else []
        if self.trace is not None:
            self._trace_op(op, names, values, acts, per, out, slot)
        out = self._gradient(names[-1], out)
        if self.taps:
            self._tap_output(op, names, values, per, out)
        return out

    def _tap_output(self, op: Op, names: list[str], values: list, per: list[int], out: Any) -> None:
        x, w = values[0], values[1] if len(values) > 1 else None
        batched = isinstance(x, Tensor) and x.dim() >= 2 and (op.name not in ("conv", "conv_transpose")
                                                              or w is None or x.dim() == w.dim())
        batch = x.shape[0] if batched else 1
        for name, macs in zip(names, per, strict=True):
            self.site_macs.setdefault(name, macs / max(batch, 1))
        if isinstance(out, Tensor) and out.is_floating_point():
            for tap in self.taps:
                tap(names[-1], "output", out, False)

    def _activation(self, site: str, x: Tensor) -> Tensor:
        fmt = self.spec(site).activation
        if self.observing:
            _observe(self.state(site), x)
        for tap in self.taps:
            tap(site, "activation", x, False)
        if fmt is None:
            return x
        st = self.state(site)
        if isinstance(fmt, IntFormat) and st.calib is not None and not self.observing:
            q = fmt.quantize(x, qparams=_static_qparams(fmt, st.calib))  # static range from calibration
        else:
            q = fmt.quantize(x)
        for tap in self.taps:
            tap(site, "activation", q, True)
        return q

    def _gradient(self, site: str, out: Any) -> Any:
        fmt = self.spec(site).gradient
        if not (isinstance(out, Tensor) and out.requires_grad and out.is_floating_point()):
            return out
        if fmt is None:  # a recorder hooks the output itself (its "output" tap)
            return out
        taps = list(self.taps)

        def on_grad(g: Tensor) -> Tensor:
            q = fmt.quantize(g)
            for tap in taps:
                tap(site, "gradient", q, True)
            return q

        return F.quantize_gradient(out, on_grad)

    def _trace_op(self, op: Op, names: list[str], values: list, acts: list[int], per: list[int], out: Any,
                  slot: WeightSlot | None) -> None:
        tr = self.trace
        assert tr is not None
        if slot is not None:
            tr.add(slot.name, "weight", type(slot.module).__name__, slot.param, per[0])
        for name in dict.fromkeys(names[i] for i in acts):  # one row per site: a matmul's two inputs share it
            mine = [i for i in acts if names[i] == name]
            tr.add(name, "activation", op.name, values[mine[0]], per[mine[0]], inputs=len(mine))
        if isinstance(out, Tensor) and out.is_floating_point():
            tr.add(names[-1], "gradient", op.name, out, per[-1])

    def run_rnn(self, kind: str, func: Callable, args: tuple, kwargs: dict) -> Any:
        """A fused recurrent kernel, step by step through ``linear`` (packed input: fused)."""
        weights = args[2] if isinstance(args[1], (tuple, list)) or kind != "lstm" and args[1].dim() != 1 else None
        if kwargs or weights is None or not isinstance(weights, (list, tuple)):
            if self.trace is not None:
                for p in (args[3] if len(args) > 3 and isinstance(args[3], (list, tuple)) else []):
                    slot = self._weight_site(p)
                    if slot is not None:
                        self.trace.add(slot.name, "activation", kind, None, 0, reason=(
                            "packed sequence: the fused kernel runs, its inputs are not quantized"))
            return func(*args, **kwargs)
        from .rnn import run_rnn

        current = [self._current(p) for p in weights]
        return run_rnn(kind, args, current, lambda x, w, b: self.run_op(OPS[TF.linear], TF.linear, (x, w, b), {}))

    def _current(self, p: Tensor) -> Tensor:
        slot = self._weight_site(p)
        if slot is None:
            return p
        return slot.module._parameters[slot.pname]  # the quantized tensor while swapped


def _ste_mask(w: Tensor, fmt: Format, axis: int) -> Tensor:
    """Where the quantizer's straight-through gradient passes (it passes ``g`` or 0)."""
    leaf = w.detach().requires_grad_()
    with torch.enable_grad():
        (g,) = torch.autograd.grad(fmt.quantize(leaf, axis=axis), leaf, torch.ones_like(leaf))
    return g != 0


class _CachedSTE(torch.autograd.Function):
    """A cached quantized weight in forward; the cached straight-through mask in backward."""

    @staticmethod
    def forward(ctx: Any, w: Tensor, q: Tensor, mask: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(mask)
        return q.view_as(q)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        return torch.where(mask, g, 0.0), None, None


def _operand_macs(op: Op, args: tuple, values: list, out: Any) -> list[int]:
    """MACs of the product each operand enters (attention: q and k the scores', v the output's)."""
    if op.name == "sdpa":
        qk, pv = sdpa_macs(*values[:3])
        return [qk, qk, pv]
    return [op_macs(op, args, values, out)] * len(values)


def _observe(st: SiteState, x: Tensor, sample_size: int = 1 << 16) -> None:
    x = x.detach().float()
    finite = x[torch.isfinite(x)]
    if finite.numel() == 0:
        return
    lo, hi = finite.min(), finite.max()
    # A bounded random sample of the inputs lets percentile and MSE scales be chosen later.
    sample = finite.flatten()
    if sample.numel() > sample_size // 8:
        sample = sample[torch.randint(sample.numel(), (sample_size // 8,), device=sample.device)]
    c = st.calib
    if c is not None:
        lo, hi = torch.minimum(c["min"], lo), torch.maximum(c["max"], hi)
        sample = torch.cat([c["sample"], sample])[-sample_size:]
    st.calib = {"min": lo, "max": hi, "sample": sample}  # a new dict drops scales derived from the old one


def _static_qparams(fmt: IntFormat, calib: dict) -> tuple[Tensor, Tensor]:
    key = ("qparams", fmt)
    if key not in calib:
        if fmt.scale in ("max", "pow2"):
            data = torch.stack([calib["min"], calib["max"]])
        else:
            data = torch.cat([calib["sample"], calib["min"].reshape(1), calib["max"].reshape(1)])
        calib[key] = fmt.qparams(data)
    return calib[key]
