"""Experiment configs: one YAML file describes a run; every error is reported at once.

A ten-line config works; everything else has a default::

    task: {model: digits_cnn}
    mode: ptq
    search: {kinds: [weight, activation], family: int, candidates: [2, 3, 4, 6, 8]}

``key=value`` overrides (``search.strategy=grid``) are applied before validation and
validated the same way.

Relative paths in a config (``out``, a ``path/to/file.py:callable`` model, a data
``root`` or ``imagefolder:<path>``) are resolved from the current directory of the
process that runs it, not from the config file's folder.

>>> cfg = load_config(None, overrides=["search.candidates=[2,4,8]", "mode=ptq"])
>>> cfg.search.candidates, cfg.criterion.name
([2, 4, 8], 'accuracy')
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from dataclasses import MISSING, fields
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_origin

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

if TYPE_CHECKING:
    from .criteria import Criterion

__all__ = ["Config", "ConfigError", "load_config", "apply_overrides", "config_to_yaml", "variant_configs"]

KIND_NAMES = ("weight", "activation", "gradient")
# Counts (epochs, batches, workers...) fit a C int, which is what torch takes for them.
MAX_COUNT = 2**31 - 1
# Seeds stay below 2**32: a run derives per-epoch seeds from them (seed * 1_000_003 + epoch)
# that must still fit torch's 64-bit generator seed.
MAX_SEED = 2**32 - 1
_NAME_CHARS = re.compile(r"[A-Za-z0-9._-]+")
NAME_RULE = ("a plain directory name: ASCII letters, digits, '-', '_' and '.', not starting with '.', "
             "without '..', at most 255 characters")


class ConfigError(ValueError):
    """A config with one or more problems; ``errors`` holds one line per problem."""

    def __init__(self, errors: list[str], source: str = "config") -> None:
        self.errors = errors
        head = f"{source}: {len(errors)} problem{'s' if len(errors) > 1 else ''}"
        super().__init__(head + "\n" + "\n".join(f"  - {e}" for e in errors))


def _integer(lo: int, hi: int, optional: bool = False) -> Any:
    """An integer field in ``lo..hi``: floats (``2.5``, ``1.0e23``) and booleans are rejected,
    so a value too big for torch is a config error, never an overflow at run time."""
    top = {MAX_COUNT: "2**31 - 1", MAX_SEED: "2**32 - 1"}.get(hi, str(hi))

    def check(v: Any) -> Any:
        if v is None and optional:
            return v
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ValueError(f"must be an integer in {lo}..{top}" + (" or null" if optional else ""))
        return v

    return Annotated[int | None if optional else int, BeforeValidator(check)]


def _dir_name(v: Any) -> Any:
    """``v`` if it is a plain directory name (the config's and each variant's name become one)."""
    if not isinstance(v, str):
        return v  # the type check reports it
    why = ("is empty" if not v else "has '/'" if "/" in v else "has '\\'" if "\\" in v
           else "starts with '.'" if v.startswith(".") else "has '..'" if ".." in v
           else "is longer than 255 characters" if len(v) > 255
           else f"has {''.join(sorted(set(_NAME_CHARS.sub('', v))))!r}" if not _NAME_CHARS.fullmatch(v) else None)
    if why:
        raise ValueError(f"must be {NAME_RULE}; this one {why}")
    return v


DirName = Annotated[str, BeforeValidator(_dir_name)]
Count = _integer(1, MAX_COUNT)
CountOrZero = _integer(0, MAX_COUNT)
CountOrNone = _integer(1, MAX_COUNT, optional=True)
Bits = _integer(0, 32)  # 0: no fraction or mantissa bits (fixed_frac, float); each family checks its own
Seed = _integer(0, MAX_SEED)


def _ordered_kinds(v: list[str]) -> list[str]:
    """At least one kind, in the canonical order (weight, activation, gradient)."""
    if not v:
        raise ValueError(f"needs at least one of {list(KIND_NAMES)}")
    return [k for k in KIND_NAMES if k in v]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TaskConfig(_Section):
    """Which model on which data (see :func:`bitwidth.tasks.make_task`).

    ``model``: a built-in name, ``torchvision:<name>``, ``package.module:callable`` or
    ``path/to/file.py:callable``. A relative file path here, in ``data: imagefolder:<path>``
    or in ``options.root`` is resolved from the current directory of the run, not from the
    config file's folder.
    """

    model: str = "digits_cnn"
    data: str = "digits"
    options: dict[str, Any] = Field(default_factory=dict)


class TrainConfig(_Section):
    """Schedule of the fp32 baseline and of training-mode trials; calibration for ptq."""

    epochs: Count = 10
    lr: float = Field(0.05, gt=0)
    batch_size: Count = 32
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    # ``cosine`` anneals the learning rate per epoch towards zero, so a run ends where small
    # perturbations (a quantized tensor) move its final accuracy least; ``constant`` keeps it.
    lr_schedule: Literal["constant", "cosine"] = "constant"
    # Train only the first ``stop_epoch`` epochs of the schedule: a checkpoint of the full run
    # (with ``cosine`` the rates are those of the full schedule), for studies of drift.
    stop_epoch: CountOrNone = None
    calib_batches: CountOrZero = 4
    master_weights: Literal["fp32", "quantized"] = "fp32"
    diverge_factor: float = Field(10.0, gt=1)
    device: str = "cpu"

    @model_validator(mode="after")
    def _stop_within_schedule(self) -> TrainConfig:
        if self.stop_epoch is not None and self.stop_epoch > self.epochs:
            raise ValueError(f"stop_epoch {self.stop_epoch} is beyond the schedule's {self.epochs} epochs")
        return self


def check_train_options(options: dict[str, Any]) -> None:
    """``ValueError`` naming every bad training option (the ``train`` section's rules), or nothing.

    >>> check_train_options({"lr": -1.0, "epochs": 0})
    Traceback (most recent call last):
    ...
    ValueError: train options: epochs: must be an integer in 1..2**31 - 1; lr: Input should be greater than 0
    """
    try:
        TrainConfig(**options)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}"
                             for e in err.errors())
        raise ValueError(f"train options: {problems}") from None


def check_seed(seed: Any) -> None:
    """``ValueError`` unless ``seed`` is a seed a run accepts (an integer in 0..2**32 - 1)."""
    try:
        _SeedModel(seed=seed)
    except ValidationError as err:
        raise ValueError(f"seed: {err.errors()[0]['msg'].removeprefix('Value error, ')}") from None


class _SeedModel(_Section):
    seed: Seed


class SearchConfig(_Section):
    """What is searched: layers (patterns), kinds, the format family and candidate widths."""

    layers: str | list[str] = "*"
    kinds: list[Literal["weight", "activation", "gradient"]] = Field(default_factory=lambda: ["weight", "activation"])
    family: str = "int"
    options: dict[str, Any] = Field(default_factory=dict)
    candidates: list[Bits] = Field(default_factory=lambda: [2, 3, 4, 5, 6, 8])
    strategy: Literal["grid", "bisect", "predict"] = "bisect"
    # Post-training, one seed: stop a trial once a confidence bound decides it (off: every trial sees
    # the whole validation set). early_stop_error: the chance per trial that it decides wrongly.
    early_stop: bool = False
    early_stop_error: float = Field(0.01, gt=0, le=0.5)

    @field_validator("candidates")
    @classmethod
    def _candidates(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("needs at least one bit width")
        return sorted(set(v))

    _kinds = field_validator("kinds")(classmethod(lambda cls, v: _ordered_kinds(v)))


class CriterionConfig(_Section):
    """``accuracy``: metric >= baseline - max_drop; ``converge``: also no divergence and a final
    loss at most the baseline's times ``1 + loss_tol`` plus ``loss_abs_tol``; ``loss``:
    validation loss <= baseline + max_rise (a fraction of the baseline's loss unless
    ``relative: false``). Each takes the keys it knows.

    >>> load_config(None, ["criterion={name: loss, max_rise: 0.1}"]).criterion.build()
    LossCriterion(max_rise=0.1, relative=True, metric='loss')
    """

    name: Literal["accuracy", "converge", "loss"] | None = None  # None: accuracy for ptq, converge for train
    max_drop: float = Field(0.01, ge=0)
    max_rise: float = Field(0.05, ge=0)
    relative: bool | None = None  # None: true for loss, false otherwise
    loss_tol: float = Field(0.5, ge=0)
    loss_abs_tol: float = Field(0.01, ge=0)
    metric: str | None = None  # None: loss for the loss criterion, accuracy otherwise

    def build(self) -> Criterion:
        """The criterion this section describes (:func:`bitwidth.criteria.make_criterion`)."""
        from dataclasses import fields

        from .criteria import CRITERIA, make_criterion

        name = self.name or "accuracy"
        return make_criterion(name, **{f.name: getattr(self, f.name) for f in fields(CRITERIA[name])
                                       if getattr(self, f.name) is not None})


class ExecutorConfig(_Section):
    """Where trials run: ``local`` (serial), ``process`` (local cores), ``ray`` (a cluster)."""

    kind: Literal["local", "process", "ray"] = "local"
    workers: CountOrNone = None
    address: str = "local"
    threads: Count = 1


class StatsConfig(_Section):
    """Distribution statistics recorded on the baseline for the report."""

    enabled: bool = True
    batches: Count = 4
    kinds: list[Literal["weight", "activation", "gradient"]] | None = None  # default: the searched kinds


class DeployConfig(_Section):
    """After the search, export the joint and best uniform plans and measure them in these runtimes
    (what ``bitwidth export`` does; empty: none)."""

    to: list[Literal["onnx", "torchao"]] = Field(default_factory=list)
    repeats: Count = 20  # timed batches per latency figure


def _open_unit(v: Any) -> Any:
    """A number strictly between 0 and 1 (a relative error), or None (the kind's default)."""
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1):
        raise ValueError("must be a number in (0, 1) (a relative error) or null")
    return v


Fraction = Annotated[float | None, BeforeValidator(_open_unit)]


class KindPolicyConfig(_Section):
    """One kind's controller policy (:class:`bitwidth.adaptive.KindPolicy`); a key left out keeps the
    kind's default (:data:`bitwidth.adaptive.DEFAULT_POLICIES`)."""

    min_bits: _integer(2, 32, optional=True) = None  # type: ignore[valid-type]
    max_bits: _integer(2, 32, optional=True) = None  # type: ignore[valid-type]
    raise_above: Fraction = None
    lower_below: Fraction = None
    patience: _integer(1, 1000, optional=True) = None  # type: ignore[valid-type]
    max_underflow: float | None = Field(None, gt=0, le=1)

    def given(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class AdaptiveConfig(_Section):
    """``mode: adaptive``: the precision controller (:mod:`bitwidth.adaptive`) and the run around it
    (:mod:`bitwidth.adaptive_run`). ``uniform``: widths also trained with every format pinned, for the
    comparison; ``static_plan``: a training-mode search's run directory whose joint plan to compare
    (default: this run directory, when it holds one)."""

    sites: str | list[str] = "*"
    kinds: list[Literal["weight", "activation", "gradient"]] = Field(default_factory=lambda: list(KIND_NAMES))
    every: Count = 10
    rounding: Literal["nearest", "stochastic"] = "nearest"
    weight: KindPolicyConfig = Field(default_factory=KindPolicyConfig)
    activation: KindPolicyConfig = Field(default_factory=KindPolicyConfig)
    gradient: KindPolicyConfig = Field(default_factory=KindPolicyConfig)
    backoff_bits: _integer(1, 16) = 2  # type: ignore[valid-type]
    max_backoffs: _integer(0, 100) = 2  # type: ignore[valid-type]
    checkpoint_every: Count = 50
    uniform: list[_integer(2, 32)] = Field(default_factory=list)  # type: ignore[valid-type]
    static_plan: str | None = None

    _kinds = field_validator("kinds")(classmethod(lambda cls, v: _ordered_kinds(v)))


def _policy_errors(adaptive: Any) -> list[str]:
    """Each kind's bounds and thresholds judged together, with the kind's defaults filling the
    keys left out (``min_bits <= max_bits``, ``lower_below < raise_above``); a kind whose
    values the schema rejects is left to the schema's own errors."""
    from .adaptive import make_policies

    errors = []
    for kind in KIND_NAMES:
        raw = adaptive.get(kind) if isinstance(adaptive, dict) else None
        if not isinstance(raw, dict):
            continue
        try:
            given = KindPolicyConfig(**raw).given()
        except (ValidationError, TypeError):
            continue
        try:
            make_policies({kind: given})
        except ValueError as err:
            errors.append(f"adaptive.{kind}: {str(err).removeprefix(f'{kind}: ')}")
    return errors


class Config(_Section):
    """A whole experiment. ``name`` (default: the config file's name) and each variant's name
    become directory names, so each must be a plain one; ``out`` is a path, relative ones
    from the current directory."""

    name: DirName | None = None
    out: str | None = None  # run directory; default runs/<name>
    mode: Literal["ptq", "train", "adaptive"] = "ptq"
    seeds: list[Seed] = Field(default_factory=lambda: [0])
    task: TaskConfig = Field(default_factory=TaskConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    criterion: CriterionConfig = Field(default_factory=CriterionConfig)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    stats: StatsConfig = Field(default_factory=StatsConfig)
    deploy: DeployConfig = Field(default_factory=DeployConfig)
    adaptive: AdaptiveConfig = Field(default_factory=AdaptiveConfig)
    # Named variants of this config (dotted key -> value), each run into <run dir>/<name>
    # and compared side by side, e.g. nearest vs stochastic rounding.
    variants: dict[DirName, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("needs one or more seeds, integers in 0..2**32 - 1")  # _explain adds the value
        return v

    @model_validator(mode="after")
    def _defaults(self) -> Config:
        crit = self.criterion
        if crit.name is None:
            crit.name = "accuracy" if self.mode == "ptq" else "converge"
        if crit.relative is None:
            crit.relative = crit.name == "loss"
        if crit.metric is None:
            crit.metric = "loss" if crit.name == "loss" else "accuracy"
        if self.stats.kinds is None:
            self.stats.kinds = list(self.search.kinds)
        return self

    @property
    def run_name(self) -> str:
        return self.name or "run"

    @property
    def run_dir(self) -> Path:
        return Path(self.out) if self.out else _default_run_dir(self.name)


def _default_run_dir(name: str | None) -> Path:
    return Path("runs") / (name or "run")


# ----------------------------------------------------------------------------- errors


def _path(parts: tuple | list) -> str:
    """``search.candidates[0]``; a key that is not a plain word is quoted: ``variants['a/b']``."""
    out = ""
    for part in parts:
        if part == "[key]":  # pydantic marks an error in a mapping's key itself so
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z0-9_-]+", str(part)):
            out += f".{part}" if out else str(part)
        else:
            out += f"[{str(part)!r}]"
    return out or "(top level)"


def _found(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _fields(model: type[BaseModel], loc: tuple) -> list[str]:
    """Valid keys at ``loc`` (the parent of an unknown key), for 'did you mean'."""
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            return []
    return list(model.model_fields)


def _explain(err: dict[str, Any]) -> str:
    loc = tuple(err["loc"])
    path = _path(loc)
    if err["type"] == "extra_forbidden":
        allowed = _fields(Config, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"did you mean `{close[0]}`? " if close else ""
        return f"{path}: unknown key; {hint}allowed: {', '.join(allowed)}"
    msg = err["msg"].replace("Input should be", "must be").removeprefix("Value error, ")
    return f"{path}: {msg} (found {_found(err.get('input'))})"


# The options a family takes besides its format's fields: the width it holds fixed while
# it searches another one, the element encodings of mx, the base format of block and the
# options of a group-wise int base (see bitwidth.families).
_HELD_WIDTH = {"fixed_frac": ["word"], "float": ["exp"], "float_exp": ["man"], "mx": ["fp6", "fp8"],
               "block": ["format", "symmetric", "scale_dtype"]}


def _family_options(family: str) -> list[str]:
    """The ``search.options`` a format family takes: the width it holds fixed, then its
    format's own options (the fields with defaults; the family sets the others).

    >>> _family_options("int")
    ['signed', 'symmetric', 'granularity', 'scale', 'rounding', 'percentile']
    >>> _family_options("fixed_frac"), _family_options("fixed")
    (['word', 'rounding'], ['rounding'])
    """
    from .families import make_format, needs_absmax

    fmt = make_format(family, 8, **({"absmax": 1.0} if needs_absmax(family) else {}))
    own = [f.name for f in fields(fmt)  # type: ignore[arg-type]
           if f.init and (f.default is not MISSING or f.default_factory is not MISSING)]
    return _HELD_WIDTH.get(family, []) + own


def _family_errors(family: str, options: dict[Any, Any], candidates: list[Any]) -> list[str]:
    """Every unknown option, every bad option value and every candidate width the family
    cannot make, each found with the real formats (:func:`bitwidth.families.make_format`)."""
    from .families import make_format, needs_absmax

    allowed = _family_options(family)
    extra = {"absmax": 1.0} if needs_absmax(family) else {}  # the real absmax comes from the data
    errors = []
    for key in options:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"did you mean `{close[0]}`? " if close else ""
            errors.append(f"{_path(('search', 'options', key))}: unknown option of family {family!r}; "
                          f"{hint}allowed: {', '.join(allowed)}")
    known = {k: v for k, v in options.items() if k in allowed}

    def error(bits: int, opts: dict[Any, Any]) -> str | None:
        try:
            make_format(family, bits, **opts, **extra)
        except (ValueError, TypeError) as err:
            return str(err)
        return None

    # Widths the schema rejects are reported there; 8 bits is a width every family makes.
    widths = [(i, b) for i, b in enumerate(candidates) if type(b) is int and 0 <= b <= 32]
    makeable = [b for _, b in widths if error(b, {}) is None]
    bad_values = []
    for key, value in known.items():  # one option at a time, so every bad value is reported
        err = next((e for b in makeable or [8] if (e := error(b, {key: value}))), None)
        if err:
            bad_values.append(f"{_path(('search', 'options', key))}: {err}")  # the formats say what they got
    if bad_values:
        return errors + bad_values
    together = False
    for i, bits in widths:  # all options together
        err = error(bits, known)
        if err and bits not in makeable:
            errors.append(f"{_path(('search', 'candidates', i))}: {err} (family {family!r})")
        elif err and not together:
            together = True
            errors.append(f"search.options: {err} (family {family!r} at {bits} bits)")
    return errors


def _semantic_errors(raw: dict[str, Any]) -> list[str]:
    """Checks that need the library (format family and options, task names), on the raw
    values, so they are reported together with the schema's errors."""
    from .families import FAMILIES
    from .tasks import DATA_FORMS, MODEL_FORMS, check_pairing
    from .tasks.user import is_import_path

    errors = []
    search = raw.get("search") if isinstance(raw.get("search"), dict) else {}
    family, options = search.get("family", "int"), search.get("options", {})
    candidates = search.get("candidates", [8])
    if isinstance(family, str) and family not in FAMILIES:
        errors.append(f"search.family: unknown family {family!r}; allowed: {', '.join(FAMILIES)}")
    elif isinstance(family, str) and isinstance(options, dict) and isinstance(candidates, list):
        errors += _family_errors(family, options, candidates)
    kinds = search.get("kinds", [])
    if raw.get("mode", "ptq") == "ptq" and isinstance(kinds, list) and "gradient" in kinds:
        errors.append("search.kinds: 'gradient' exists only in mode 'train' (the backward pass); "
                      "use mode: train, or kinds weight and activation")
    if search.get("early_stop") is True and raw.get("mode", "ptq") != "ptq":
        errors.append(f"search.early_stop: only post-training trials (mode 'ptq') stop early; a training run "
                      f"trains fully (found mode {raw.get('mode')!r}); set search.early_stop: false")
    seeds = raw.get("seeds")
    if search.get("early_stop") is True and isinstance(seeds, list) and len(set(seeds)) > 1:
        errors.append(f"search.early_stop: needs one seed (found {len(set(seeds))}): several seeds are judged on "
                      "their mean, which no single trial's bound decides; set search.early_stop: false")
    errors += _policy_errors(raw.get("adaptive"))
    if raw.get("mode") == "adaptive" and raw.get("variants"):  # the comparison of variants compares searches
        errors.append("variants: not supported with mode 'adaptive'; run each setting as its own config "
                      "(the uniform widths and a search's static plan are compared in adaptive.uniform and "
                      "adaptive.static_plan)")
    deploy = raw.get("deploy") if isinstance(raw.get("deploy"), dict) else {}
    if raw.get("mode") == "adaptive" and deploy.get("to"):
        errors.append("deploy.to: mode 'adaptive' finds a schedule, not a plan to deploy; export a searched plan "
                      "(mode ptq or train), or set deploy.to: []")
    task = raw.get("task") if isinstance(raw.get("task"), dict) else {}
    data, model = task.get("data", "digits"), task.get("model", "digits_cnn")
    if isinstance(data, str) and not (data.lower() in DATA_FORMS or data.startswith("imagefolder:")):
        errors.append(f"task.data: unknown data {data!r}; allowed: {', '.join(DATA_FORMS)}")
    if isinstance(model, str) and not (model in MODEL_FORMS or ":" in model):
        errors.append(f"task.model: unknown model {model!r}; allowed: {', '.join(MODEL_FORMS)}, "
                      "path/to/file.py:callable (a relative path from the current directory)")
    elif isinstance(model, str) and isinstance(data, str):
        try:
            check_pairing(model, data)
        except ValueError as err:
            errors.append(f"task: {err}")
    file = model.partition(":")[0] if isinstance(model, str) and is_import_path(model) else ""
    if file.endswith(".py") and not Path(file).is_file():
        errors.append(f"task.model: no file {str(Path(file).resolve())!r} (found {model!r}); a relative "
                      f"path is resolved from the current directory ({os.getcwd()}), not from the "
                      "config file's folder")
    return errors


def check_search_inputs(mode: Any, seeds: Any, **search: Any) -> None:
    """Check the library's search arguments (:func:`bitwidth.runner.run_search`) by the config's
    own rules, so a search is validated the same way however it starts; every problem at once.

    >>> check_search_inputs("ptq", [0], kinds=["gradient"], strategy="random")
    Traceback (most recent call last):
    ...
    ValueError: search.strategy: must be 'grid', 'bisect' or 'predict' (found 'random'); search.kinds: 'gradient' \
exists only in mode 'train' (the backward pass); use mode: train, or kinds weight and activation
    """
    def plain(v: Any) -> Any:  # tuples and ranges as the lists a YAML file would give
        return list(v) if isinstance(v, (tuple, range)) else v

    raw = {"mode": mode, "seeds": plain(seeds), "search": {k: plain(v) for k, v in search.items()}}
    _, errors = _validate(raw)
    errors = [e for e in errors if not e.startswith("mode: ")]
    if mode not in ("ptq", "train"):  # a search's modes; 'adaptive' is one training run (bitwidth.adaptive_run)
        errors.insert(0, f"mode: must be 'ptq' or 'train' (found {_found(mode)})")
    if errors:
        raise ValueError("; ".join(errors))


# ----------------------------------------------------------------------------- loading


def _set_path(d: dict[str, Any], path: str, value: Any) -> None:
    """``d[a][b] = value`` for the path ``a.b``, making missing sections; ``ValueError`` when a
    part is empty or names a value that is not a section (in ``d`` or in the schema)."""
    parts = path.split(".")
    if not all(parts):
        raise ValueError(f"{path!r}: a key is names joined by dots, e.g. search.options.rounding")
    model: Any = Config  # the schema at this depth; None below a mapping or an unknown key
    for i, part in enumerate(parts[:-1]):
        field = model.model_fields.get(part) if model else None
        held = d.get(part, {})
        if not isinstance(held, dict) or (field and not _is_section(field.annotation)):
            where = ".".join(parts[: i + 1])
            found = f" ({_found(held)})" if part in d else ""
            raise ValueError(f"{path}: {where} is a value{found}, not a section, so it has no key "
                             f"{parts[i + 1]!r}; set {where} itself")
        model = field.annotation if field and _is_model(field.annotation) else None
        d = d.setdefault(part, held)
    d[parts[-1]] = value


def _is_model(ann: Any) -> bool:
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def _is_section(ann: Any) -> bool:
    """Whether a field of this type holds keys: a section, or a mapping such as ``search.options``."""
    return _is_model(ann) or get_origin(ann) is dict


def _apply(raw: dict[str, Any], overrides: list[str]) -> list[str]:
    """Apply every override that can be applied; one error per one that cannot."""
    errors = []
    for item in overrides:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            errors.append(f"{item!r}: an override is key=value, e.g. search.strategy=grid")
            continue
        try:
            _set_path(raw, key, yaml.safe_load(value))
        except yaml.YAMLError as err:
            errors.append(f"{key}: value is not valid YAML ({err})")
        except ValueError as err:
            errors.append(str(err))
    return errors


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings; values are parsed as YAML (``[2,4]``, ``true``, ``0.1``)."""
    errors = _apply(raw, overrides)
    if errors:
        raise ConfigError(errors, "--set")
    return raw


def _name_from(stem: str) -> str:
    """The default ``name`` from a config file's name, made a plain directory name.

    >>> _name_from("my study (v2)"), _name_from(".hidden")
    ('my_study__v2_', 'hidden')
    """
    name = re.sub(r"[^A-Za-z0-9._-]", "_", stem).lstrip(".").replace("..", "_")
    return name[:255] or "run"


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read, override and validate a config; ``ConfigError`` lists every problem.

    The default ``name`` is the file's name (other characters than letters, digits, '-',
    '_' and '.' made '_'). Relative paths in the config are resolved later, at run time,
    from the current directory, not from the config file's folder.
    """
    source = str(path) if path else "config"
    raw: Any = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"no such file: {p}"], source)
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError([f"not valid YAML: {err}"], source) from None
        if not isinstance(raw, dict):
            raise ConfigError([f"the top level must be a mapping of keys, found {type(raw).__name__}"], source)
        raw.setdefault("name", _name_from(p.stem))
    errors = [f"--set {e}" for e in _apply(raw, list(overrides or []))]
    cfg, config_errors = _validate(raw)
    errors += config_errors
    variants = raw.get("variants") if isinstance(raw.get("variants"), dict) else {}
    for name, changes in variants.items():
        where = _path(("variants", name))
        if not isinstance(changes, dict) or not changes:
            errors.append(f"{where}: a variant maps config keys to values, e.g. search.options.rounding: nearest "
                          f"(found {_found(changes)})")
            continue
        variant, path_errors = _variant_raw(raw, str(name), changes)
        _, variant_errors = _validate(variant)
        # Only what the variant adds: the config's own errors are listed once, and the
        # variant's name (a label, ``<name>-<variant>``) is derived from names checked already.
        errors += [f"{where}: {e}" for e in path_errors + variant_errors
                   if e not in config_errors and not e.startswith("name: ")]
    if errors:
        raise ConfigError(errors, source)
    assert cfg is not None
    return cfg


def _validate(raw: dict[str, Any]) -> tuple[Config | None, list[str]]:
    errors = _semantic_errors(raw)
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as err:
        return None, [_explain(e) for e in err.errors()] + errors
    try:
        cfg.criterion.build()
    except ValueError as err:
        errors.append(f"criterion: {err}")
    return cfg, errors


def _variant_raw(raw: dict[str, Any], name: str, changes: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The raw config of one variant, and one error per change that cannot be applied."""
    variant = copy.deepcopy({k: v for k, v in raw.items() if k != "variants"})
    errors = []
    for key, value in changes.items():
        try:
            _set_path(variant, str(key), copy.deepcopy(value))
        except ValueError as err:
            errors.append(str(err))
    parent = raw.get("out") or _default_run_dir(raw.get("name"))
    variant["out"] = str(Path(parent) / name)
    variant["name"] = f"{raw.get('name') or 'run'}-{name}"
    return variant, errors


def variant_configs(cfg: Config) -> dict[str, Config]:
    """Each named variant as a complete config whose run directory is ``<run dir>/<name>``.

    >>> cfg = load_config(None, ["name=study", "variants={a: {search.strategy: grid}}"])
    >>> v = variant_configs(cfg)["a"]
    >>> v.search.strategy, str(v.run_dir)
    ('grid', 'runs/study/a')
    """
    raw = cfg.model_dump(mode="json")
    out = {}
    for name, changes in cfg.variants.items():
        variant, errors = _variant_raw(raw, name, changes)
        if errors:
            raise ConfigError(errors, f"variants.{name}")
        out[name] = Config.model_validate(variant)
    return out


def config_to_yaml(cfg: Config) -> str:
    """The resolved config (every default filled in), as written to ``<run dir>/config.yaml``."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
