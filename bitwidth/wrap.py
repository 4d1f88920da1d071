"""Fake quantization of a model's sites: ``QuantSpec``, plans, ``wrap`` / ``set_plan`` / ``unwrap``.

A plan maps site names or glob patterns to specs (see :mod:`bitwidth.sites` for what a
site is and how sites are named). Wrapping attaches the site machinery to the model in
place: no module changes class, the parameter objects and ``state_dict`` keys stay
exactly the same, and ``unwrap`` removes every trace of it.

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
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .formats import Format, format_from_dict, format_to_dict, parse_format
from .ops import OPS
from .sites import Engine, engine_of

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


def is_wrapped(model: nn.Module) -> bool:
    """Whether ``model`` itself was wrapped (its engine hangs on it)."""
    return engine_of(model) is not None


def covered_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every weight site by name, with the module that holds its parameter, in model order."""
    eng = engine_of(model) or Engine(model)
    return {name: slot.module for name, slot in eng.slots.items()}


def quant_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The weight sites of a wrapped model by name (empty when it is not wrapped)."""
    eng = engine_of(model)
    return {name: slot.module for name, slot in eng.slots.items()} if eng else {}


def _is_pattern(key: str) -> bool:
    return any(c in key for c in "*?[")


_OP_NAMES = sorted({op.name for op in OPS.values()})


def _could_be_op_site(eng: Engine, key: str) -> bool:
    """``module:op.i`` (or ``module:sdpa[.i].q``) naming a real module and op: not seen yet."""
    module, sep, rest = key.partition(":")
    return bool(sep) and module in eng.modules and rest.split(".")[0] in _OP_NAMES


def _check_keys(eng: Engine, keys: Iterable[str], strict: bool = False, traced: Iterable[str] = ()) -> None:
    seen = {**eng.seen, **dict.fromkeys(traced, "")}  # sites a forward has shown
    known = list(eng.slots) + [s for s in seen if s not in eng.slots]
    problems = []
    for key in keys:
        if not isinstance(key, str):
            raise ValueError(f"plan keys are site names or glob patterns (str), got {key!r}")
        if _is_pattern(key):
            ok = any(fnmatch.fnmatchcase(n, key) for n in known) or (":" in key and not seen)
        else:
            ok = key in eng.slots or key in seen or (not strict and _could_be_op_site(eng, key))
        if not ok:
            problems.append(_no_match(eng, key, known))
    if problems:  # every bad key at once
        raise ValueError("\n".join(problems))


def _no_match(eng: Engine, key: str, known: list[str]) -> str:
    if key in eng.modules:
        mod = eng.modules[key]
        inner = [n for n in known if n.startswith(key + ".") or n.startswith(key + ":")] if key else known
        hint = f"; use the pattern {key + '*'!r} for the {len(inner)} sites inside it" if inner else ""
        if any(True for _ in mod.parameters(recurse=False)):
            return (f"{key!r} is a {type(mod).__name__} without weight sites (its parameters have one "
                    f"dimension: biases and norms stay full precision){hint}")
        return f"{key!r} is a {type(mod).__name__} without weights of its own, not a site{hint}"
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.4)
    near = f"; closest sites: {', '.join(close)}" if close else ""
    sample = ", ".join(known[:6]) + (", …" if len(known) > 6 else "")
    later = "" if eng.seen else "; op sites (module:op.i) are known once the model has run: bw.sites lists them"
    return f"{key!r} matches no site{near} (sites: {sample}{later})"


class _resolver:  # noqa: N801 (a picklable closure: wrapped models pickle)
    """A site's spec under a plan: the exact name, else the last pattern matching it."""

    def __init__(self, plan: Mapping[str, QuantSpec]) -> None:
        self.plan = dict(plan)
        self.patterns = [(k, s) for k, s in plan.items() if _is_pattern(k)][::-1]  # the later one wins
        # Only activation and gradient formats need the ops intercepted; weights are swapped in.
        self.op_work = any(s.activation is not None or s.gradient is not None for s in plan.values())
        self.active = any(not s.empty for s in plan.values())  # sites yet unseen may match

    def __call__(self, site: str) -> QuantSpec:
        spec = self.plan.get(site)
        if spec is None:
            spec = next((s for k, s in self.patterns if fnmatch.fnmatchcase(site, k)), _EMPTY)
        return spec


def _specs(eng: Engine, plan: Plan, strict: bool = False, traced: Iterable[str] = ()) -> dict[str, QuantSpec]:
    """The plan's specs, its keys checked against the sites (``strict``: only sites seen count;
    ``traced``: sites a traced forward listed)."""
    if not isinstance(plan, Mapping):
        raise ValueError(f"a plan maps site names or glob patterns to specs, got {type(plan).__name__}")
    specs = {key: as_spec(value) for key, value in plan.items()}
    _check_keys(eng, specs, strict, traced)
    return specs


def resolve_plan(model: nn.Module, plan: Plan) -> dict[str, QuantSpec]:
    """The spec of every known site under ``plan``: weight sites, and op sites already seen.

    An exact name beats any pattern; among patterns the later one wins. Keys that match
    no site raise ``ValueError`` naming the closest real names.

    >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    >>> resolve_plan(m, {"*": "int8", "1": "int4"})["1"].weight.name
    'int4'
    """
    eng = engine_of(model) or Engine(model)
    resolve = _resolver(_specs(eng, plan))
    return {name: resolve(name) for name in [*eng.slots, *(s for s in eng.seen if s not in eng.slots)]}


def wrap(model: nn.Module, plan: Plan | None = None) -> nn.Module:
    """Attach fake quantization to every site of ``model`` in place and apply ``plan`` (default: none).

    Sites the plan does not name stay at full precision, so :func:`set_plan` can change
    any of them later. A model with no plan in force runs exactly as before.
    """
    eng = engine_of(model)
    if eng is None:
        inner = [n for n, m in model.named_modules() if n and engine_of(m) is not None]
        if inner:
            raise ValueError(f"submodule {inner[0]!r} is wrapped on its own; unwrap it before wrapping the model")
        eng = Engine(model)
    specs = _specs(eng, plan or {})
    model._bw_engine = eng  # a plain attribute: never in state_dict
    for st in eng.states.values():
        st.cache = None
    eng.set_resolver(_resolver(specs))
    return model


def _engine(model: nn.Module, what: str) -> Engine:
    eng = engine_of(model)
    if eng is None:
        raise ValueError(f"{what} needs a wrapped model; call bitwidth.wrap(model, plan) first")
    return eng


def set_plan(model: nn.Module, plan: Plan) -> nn.Module:
    """Reconfigure a wrapped model: sites not in ``plan`` go back to full precision.

    Cheap (no re-wrapping, calibration kept), so a search can call it for every trial.
    """
    eng = _engine(model, "set_plan")
    eng.set_resolver(_resolver(_specs(eng, plan)))
    return model


def plan_of(model: nn.Module) -> dict[str, QuantSpec]:
    """The plan in force: exact site names (weight sites, then op sites seen) to non-empty specs."""
    eng = _engine(model, "plan_of") if is_wrapped(model) else None
    if eng is None:
        return {}
    names = [*eng.slots, *(s for s in eng.seen if s not in eng.slots)]
    return {n: eng.spec(n) for n in names if not eng.spec(n).empty}


def unwrap(model: nn.Module) -> nn.Module:
    """Remove everything ``wrap`` attached; modules and parameters are untouched."""
    eng = engine_of(model)
    if eng is not None:
        eng.remove_hooks()
        del model._bw_engine
    return model


@torch.no_grad()
def calibrate(
    model: nn.Module, batches: Iterable[Any], *, forward: Callable[[nn.Module, Any], Any] | None = None
) -> nn.Module:
    """Observe activation ranges over ``batches`` so integer activations use static scales.

    A batch may be a tensor or a tuple whose first item is the input. The statistics
    (min, max and a bounded sample per site) do not depend on the plan, so they survive
    :func:`set_plan`; every integer activation format picks its scale from them.
    """
    eng = _engine(model, "calibrate")
    for st in eng.states.values():
        st.calib = None
    eng.observing = True
    eng.refresh()
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
        eng.observing = False
        eng.refresh()
    return model


def plan_to_dict(plan: Mapping[str, QuantSpec]) -> dict[str, dict]:
    """A JSON/YAML-ready plan: ``{layer: {kind: format dict or None}}``."""
    return {name: as_spec(spec).to_dict() for name, spec in plan.items()}


def plan_from_dict(d: Mapping[str, Any]) -> dict[str, QuantSpec]:
    """Inverse of :func:`plan_to_dict`; also accepts names (``{"fc1": {"weight": "int4"}}``)."""
    return {name: as_spec(value) for name, value in d.items()}
