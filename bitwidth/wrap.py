"""Per-layer fake-quantization wrappers: ``QuantSpec``, plans, ``wrap`` / ``set_plan`` / ``unwrap``.

Wrapping is done in place by switching each covered layer's class to a quantizing
subclass (``nn.Linear`` -> ``QuantLinear``): the module object, its parameters and its
``state_dict`` keys stay exactly the same, and ``unwrap`` switches the class back.

>>> import torch.nn as nn
>>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
>>> _ = wrap(model, {"*": "int8", "2": QuantSpec(weight="int4")})
>>> plan_of(model)["2"].weight.name
'int4'
>>> type(unwrap(model)[0]).__name__
'Linear'
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from . import functional as F
from .formats import Format, IntFormat, format_from_dict, format_to_dict, parse_format

__all__ = [
    "KINDS",
    "Plan",
    "QuantSpec",
    "calibrate",
    "covered_layers",
    "is_wrapped",
    "plan_from_dict",
    "plan_of",
    "plan_to_dict",
    "quant_layers",
    "resolve_plan",
    "set_plan",
    "unwrap",
    "wrap",
]

KINDS = ("weight", "activation", "gradient")


@dataclass(frozen=True)
class QuantSpec:
    """The formats of one layer; ``None`` is full precision. Names are parsed.

    >>> QuantSpec(weight="int4", gradient="fixed16_8").gradient.frac
    8
    """

    weight: Format | None = None
    activation: Format | None = None
    gradient: Format | None = None

    def __post_init__(self) -> None:
        for kind in KINDS:
            object.__setattr__(self, kind, parse_format(getattr(self, kind)))

    @property
    def empty(self) -> bool:
        return self.weight is None and self.activation is None and self.gradient is None

    def to_dict(self) -> dict[str, dict | None]:
        return {kind: format_to_dict(getattr(self, kind)) for kind in KINDS}

    def short(self) -> str:
        """``w=int4 a=int8 g=-`` style summary for tables and reprs."""
        return " ".join(f"{k[0]}={getattr(self, k).name if getattr(self, k) else '-'}" for k in KINDS)


SpecLike = QuantSpec | str | Format | Mapping[str, Any] | None
Plan = Mapping[str, SpecLike]


def as_spec(value: SpecLike) -> QuantSpec:
    """A plan value as a spec: a format (name) means weight and activation."""
    if isinstance(value, QuantSpec):
        return value
    if isinstance(value, Mapping):
        unknown = set(value) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown kind(s) {sorted(unknown)} in spec; allowed: {list(KINDS)}")
        return QuantSpec(**{k: format_from_dict(v) if isinstance(v, Mapping) else v for k, v in value.items()})
    fmt = parse_format(value)
    return QuantSpec(weight=fmt, activation=fmt)


_EMPTY = QuantSpec()


# ----------------------------------------------------------------------------- layer forwards
# One entry per covered module type: how to run the layer with a given (quantized) weight.

def _linear(m: nn.Linear, x: Tensor, w: Tensor, *a: Any, **k: Any) -> Tensor:
    return TF.linear(x, w, m.bias)


def _conv(m: nn.Module, x: Tensor, w: Tensor, *a: Any, **k: Any) -> Tensor:
    return m._conv_forward(x, w, m.bias)  # type: ignore[operator]


def _conv_transpose(m: nn.Module, x: Tensor, w: Tensor, output_size: list[int] | None = None) -> Tensor:
    nd = w.dim() - 2
    pad = m._output_padding(x, output_size, m.stride, m.padding, m.kernel_size, nd, m.dilation)  # type: ignore[operator]
    fn = {1: TF.conv_transpose1d, 2: TF.conv_transpose2d, 3: TF.conv_transpose3d}[nd]
    return fn(x, w, m.bias, m.stride, m.padding, pad, m.groups, m.dilation)


def _embedding(m: nn.Embedding, x: Tensor, w: Tensor, *a: Any, **k: Any) -> Tensor:
    return TF.embedding(x, w, m.padding_idx, m.max_norm, m.norm_type, m.scale_grad_by_freq, m.sparse)


@dataclass
class _LayerState:
    """What a wrapped layer carries besides its original attributes (never in state_dict)."""

    spec: QuantSpec = _EMPTY
    weight_axis: int = 0
    observing: bool = False
    calib: dict[str, Tensor] | None = None  # static activation statistics from calibrate()
    cache: tuple | None = None  # (weight version, format, quantized weight) for frozen weights
    taps: list[Callable[[str, Tensor], None]] = field(default_factory=list)


class _QuantMixin:
    """Forward of a wrapped layer: quantize input and weight, run the layer, tag the gradient."""

    _bw: _LayerState
    _bw_forward: Callable[..., Tensor]
    weight: Tensor

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        st = self._bw
        if st.spec.empty and not st.observing and not st.taps:
            return super().forward(x, *args, **kwargs)  # type: ignore[misc]
        spec = st.spec
        if x.is_floating_point():
            if st.observing:
                _observe(st, x)
            if spec.activation is not None:
                x = _quantize_activation(st, spec.activation, x)
                for tap in st.taps:
                    tap("activation", x)
        w = self.weight
        if spec.weight is not None:
            w = _quantize_weight(st, spec.weight, w)
            for tap in st.taps:
                tap("weight", w)
        y = type(self)._bw_forward(self, x, w, *args, **kwargs)
        if spec.gradient is not None and y.requires_grad:
            y = F.quantize_gradient(y, _gradient_quantizer(spec.gradient, st))
        return y

    def extra_repr(self) -> str:
        return super().extra_repr() + f", spec=[{self._bw.spec.short()}]"  # type: ignore[misc]


def _quantize_weight(st: _LayerState, fmt: Format, w: Tensor) -> Tensor:
    # Evaluation reuses the quantized weight until the weight changes (in-place updates
    # bump the version counter); that makes repeated PTQ evaluation nearly free.
    frozen = not (torch.is_grad_enabled() and w.requires_grad) and fmt.rounding == "nearest"
    key = (w._version, w.data_ptr(), fmt)
    if frozen and st.cache is not None and st.cache[0] == key:
        return st.cache[1]
    q = fmt.quantize(w, axis=st.weight_axis)
    st.cache = (key, q) if frozen else None
    return q


def _quantize_activation(st: _LayerState, fmt: Format, x: Tensor) -> Tensor:
    if isinstance(fmt, IntFormat) and st.calib is not None and not st.observing:
        # Static range: the format chooses its scale from the calibration data.
        return fmt.quantize(x, qparams=_static_qparams(fmt, st))
    return fmt.quantize(x)


def _static_qparams(fmt: IntFormat, st: _LayerState) -> tuple[Tensor, Tensor]:
    calib = st.calib
    assert calib is not None
    key = ("qparams", fmt)
    if key not in calib:
        if fmt.scale in ("max", "pow2"):
            data = torch.stack([calib["min"], calib["max"]])
        else:
            data = torch.cat([calib["sample"], calib["min"].reshape(1), calib["max"].reshape(1)])
        calib[key] = fmt.qparams(data)  # type: ignore[index]
    return calib[key]  # type: ignore[index]


_CALIB_SAMPLE = 1 << 16


def _observe(st: _LayerState, x: Tensor) -> None:
    x = x.detach().float()
    finite = x[torch.isfinite(x)]
    if finite.numel() == 0:
        return
    lo, hi = finite.min(), finite.max()
    # A bounded random sample of the inputs lets percentile and MSE scales be chosen later.
    sample = finite.flatten()
    if sample.numel() > _CALIB_SAMPLE // 8:
        idx = torch.randint(sample.numel(), (_CALIB_SAMPLE // 8,), device=sample.device)
        sample = sample[idx]
    c = st.calib
    if c is not None:
        lo, hi = torch.minimum(c["min"], lo), torch.maximum(c["max"], hi)
        sample = torch.cat([c["sample"], sample])[-_CALIB_SAMPLE:]
    st.calib = {"min": lo, "max": hi, "sample": sample}  # a new dict drops scales derived from the old one


def _gradient_quantizer(fmt: Format, st: _LayerState) -> Callable[[Tensor], Tensor]:
    def quantize(grad: Tensor) -> Tensor:
        q = fmt.quantize(grad)
        for tap in st.taps:
            tap("gradient", q)
        return q

    return quantize


def _make_wrapper(base: type[nn.Module], forward: Callable[..., Tensor], axis: int) -> type[nn.Module]:
    cls = type(f"Quant{base.__name__}", (_QuantMixin, base), {"_bw_forward": forward, "_bw_axis": axis})
    cls.__module__ = __name__
    return cls


_REGISTRY: dict[type[nn.Module], type[nn.Module]] = {}
for _base, _fwd, _axis in [
    (nn.Linear, _linear, 0),
    (nn.Conv1d, _conv, 0),
    (nn.Conv2d, _conv, 0),
    (nn.Conv3d, _conv, 0),
    (nn.ConvTranspose1d, _conv_transpose, 1),  # weight is (in, out/groups, ...)
    (nn.ConvTranspose2d, _conv_transpose, 1),
    (nn.ConvTranspose3d, _conv_transpose, 1),
    (nn.Embedding, _embedding, 0),
]:
    _REGISTRY[_base] = _make_wrapper(_base, _fwd, _axis)
    globals()[_REGISTRY[_base].__name__] = _REGISTRY[_base]  # picklable by name
_ORIGINAL = {v: k for k, v in _REGISTRY.items()}
COVERED = tuple(_REGISTRY)


def is_wrapped(module: nn.Module) -> bool:
    return type(module) in _ORIGINAL


def covered_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every layer ``wrap`` can quantize, by qualified name, in model order."""
    return {n: m for n, m in model.named_modules() if type(m) in _REGISTRY or is_wrapped(m)}


def quant_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The wrapped layers of ``model`` by qualified name."""
    return {n: m for n, m in model.named_modules() if is_wrapped(m)}


def _is_pattern(key: str) -> bool:
    return any(c in key for c in "*?[")


def resolve_plan(model: nn.Module, plan: Plan) -> dict[str, QuantSpec]:
    """The spec of every covered layer under ``plan``.

    An exact name beats any pattern; among patterns the later one wins. Keys that match
    no covered layer raise ``ValueError`` naming the closest real names.

    >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    >>> resolve_plan(m, {"*": "int8", "1": "int4"})["1"].weight.name
    'int4'
    """
    if not isinstance(plan, Mapping):
        raise ValueError(f"a plan maps layer names or glob patterns to specs, got {type(plan).__name__}")
    layers = covered_layers(model)
    specs = {key: as_spec(value) for key, value in plan.items()}
    all_modules = dict(model.named_modules())
    for key in specs:
        if _is_pattern(key):
            if not any(fnmatch.fnmatchcase(n, key) for n in layers):
                raise ValueError(_no_match(key, layers, all_modules))
        elif key not in layers:
            raise ValueError(_no_match(key, layers, all_modules))
    patterns = [(k, s) for k, s in specs.items() if _is_pattern(k)]
    resolved = {}
    for name in layers:
        spec = specs.get(name)
        if spec is None:
            for key, s in reversed(patterns):
                if fnmatch.fnmatchcase(name, key):
                    spec = s
                    break
        resolved[name] = spec or _EMPTY
    return resolved


def _no_match(key: str, layers: Mapping[str, nn.Module], modules: Mapping[str, nn.Module]) -> str:
    covered = ", ".join(t.__name__ for t in COVERED)
    if key in modules:
        mod = modules[key]
        what = type(mod).__name__
        if any(True for _ in mod.parameters(recurse=False)):
            return f"layer {key!r} is a {what}, which bitwidth does not quantize; covered types: {covered}"
        inner = [n for n in layers if n.startswith(key + ".")] if key else list(layers)
        hint = f"; use the pattern {key + '.*'!r} for the {len(inner)} layers inside it" if inner else ""
        return f"{key!r} is a {what} without weights of its own, not a quantizable layer{hint}"
    close = difflib.get_close_matches(key, list(layers), n=3, cutoff=0.4)
    near = f"; closest layer names: {', '.join(close)}" if close else ""
    sample = ", ".join(list(layers)[:6]) + (", …" if len(layers) > 6 else "")
    return f"{key!r} matches no quantizable layer{near} (layers: {sample}; covered types: {covered})"


def wrap(model: nn.Module, plan: Plan | None = None) -> nn.Module:
    """Wrap every covered layer of ``model`` in place and apply ``plan`` (default: none).

    Layers the plan does not name stay at full precision but are wrapped, so
    :func:`set_plan` can change any of them later without re-wrapping.
    """
    specs = resolve_plan(model, plan or {})
    for name, module in covered_layers(model).items():
        if not is_wrapped(module):
            cls = _REGISTRY[type(module)]
            module.__class__ = cls
            module._bw = _LayerState(weight_axis=cls._bw_axis)  # type: ignore[attr-defined]
        module._bw.spec = specs[name]  # type: ignore[union-attr]
        module._bw.cache = None  # type: ignore[union-attr]
    return model


def set_plan(model: nn.Module, plan: Plan) -> nn.Module:
    """Reconfigure a wrapped model: layers not in ``plan`` go back to full precision.

    Cheap (no re-wrapping, calibration kept), so a search can call it for every trial.
    """
    layers = quant_layers(model)
    if not layers:
        raise ValueError("set_plan needs a wrapped model; call bitwidth.wrap(model, plan) first")
    specs = resolve_plan(model, plan)
    for name, module in layers.items():
        module._bw.spec = specs.get(name, _EMPTY)  # type: ignore[union-attr]
    return model


def plan_of(model: nn.Module) -> dict[str, QuantSpec]:
    """The plan in force: exact layer names to their non-empty specs."""
    return {n: m._bw.spec for n, m in quant_layers(model).items() if not m._bw.spec.empty}  # type: ignore[union-attr]


def unwrap(model: nn.Module) -> nn.Module:
    """Restore every wrapped layer to its original class; parameters are untouched."""
    for module in quant_layers(model).values():
        module.__class__ = _ORIGINAL[type(module)]
        del module._bw
    return model


@torch.no_grad()
def calibrate(
    model: nn.Module, batches: Iterable[Any], *, forward: Callable[[nn.Module, Any], Any] | None = None
) -> nn.Module:
    """Observe activation ranges over ``batches`` so integer activations use static scales.

    A batch may be a tensor or a tuple whose first item is the input. The statistics
    (min, max and a bounded sample) do not depend on the plan, so they survive
    :func:`set_plan`; every integer activation format picks its scale from them.
    """
    layers = quant_layers(model)
    if not layers:
        raise ValueError("calibrate needs a wrapped model; call bitwidth.wrap(model, plan) first")
    for m in layers.values():
        m._bw.calib, m._bw.observing = None, True  # type: ignore[union-attr]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            if forward is not None:
                forward(model, batch)
            else:
                model(batch[0] if isinstance(batch, (tuple, list)) else batch)
    finally:
        model.train(was_training)
        for m in layers.values():
            m._bw.observing = False  # type: ignore[union-attr]
    return model


def plan_to_dict(plan: Mapping[str, QuantSpec]) -> dict[str, dict]:
    """A JSON/YAML-ready plan: ``{layer: {kind: format dict or None}}``."""
    return {name: as_spec(spec).to_dict() for name, spec in plan.items()}


def plan_from_dict(d: Mapping[str, Any]) -> dict[str, QuantSpec]:
    """Inverse of :func:`plan_to_dict`; also accepts names (``{"fc1": {"weight": "int4"}}``)."""
    return {name: as_spec(value) for name, value in d.items()}
