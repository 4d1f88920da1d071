"""Experiment configs: one YAML file describes a run; every error is reported at once.

A ten-line config works; everything else has a default::

    task: {model: digits_cnn}
    mode: ptq
    search: {kinds: [weight, activation], family: int, candidates: [2, 3, 4, 6, 8]}

``key=value`` overrides (``search.strategy=grid``) are applied before validation and
validated the same way.

>>> cfg = load_config(None, overrides=["search.candidates=[2,4,8]", "mode=ptq"])
>>> cfg.search.candidates, cfg.criterion.name
([2, 4, 8], 'accuracy')
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = ["Config", "ConfigError", "load_config", "apply_overrides", "config_to_yaml", "variant_configs"]

KIND_NAMES = ("weight", "activation", "gradient")


class ConfigError(ValueError):
    """A config with one or more problems; ``errors`` holds one line per problem."""

    def __init__(self, errors: list[str], source: str = "config") -> None:
        self.errors = errors
        head = f"{source}: {len(errors)} problem{'s' if len(errors) > 1 else ''}"
        super().__init__(head + "\n" + "\n".join(f"  - {e}" for e in errors))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TaskConfig(_Section):
    """Which model on which data (see :func:`bitwidth.tasks.make_task`)."""

    model: str = "digits_cnn"
    data: str = "digits"
    options: dict[str, Any] = Field(default_factory=dict)


class TrainConfig(_Section):
    """Schedule of the fp32 baseline and of training-mode trials; calibration for ptq."""

    epochs: int = Field(10, ge=1)
    lr: float = Field(0.05, gt=0)
    batch_size: int = Field(32, ge=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    calib_batches: int = Field(4, ge=0)
    master_weights: Literal["fp32", "quantized"] = "fp32"
    diverge_factor: float = Field(10.0, gt=1)
    device: str = "cpu"


class SearchConfig(_Section):
    """What is searched: layers (patterns), kinds, the format family and candidate widths."""

    layers: str | list[str] = "*"
    kinds: list[Literal["weight", "activation", "gradient"]] = Field(default_factory=lambda: ["weight", "activation"])
    family: str = "int"
    options: dict[str, Any] = Field(default_factory=dict)
    candidates: list[int] = Field(default_factory=lambda: [2, 3, 4, 5, 6, 8])
    strategy: Literal["grid", "bisect"] = "bisect"

    @field_validator("candidates")
    @classmethod
    def _candidates(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("needs at least one bit width")
        if any(b < 1 or b > 32 for b in v):
            raise ValueError(f"bit widths must be in 1..32, got {v}")
        return sorted(set(v))

    @field_validator("kinds")
    @classmethod
    def _kinds(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError(f"needs at least one of {list(KIND_NAMES)}")
        return [k for k in KIND_NAMES if k in v]


class CriterionConfig(_Section):
    """``accuracy``: metric >= baseline - max_drop; ``converge``: also no divergence and a final loss
    within ``loss_tol`` of the baseline's."""

    name: Literal["accuracy", "converge"] | None = None  # None: accuracy for ptq, converge for train
    max_drop: float = Field(0.01, ge=0)
    relative: bool = False
    loss_tol: float = Field(0.5, ge=0)
    metric: str = "accuracy"


class ExecutorConfig(_Section):
    """Where trials run: ``local`` (serial), ``process`` (local cores), ``ray`` (a cluster)."""

    kind: Literal["local", "process", "ray"] = "local"
    workers: int | None = Field(None, ge=1)
    address: str = "local"
    threads: int = Field(1, ge=1)


class StatsConfig(_Section):
    """Distribution statistics recorded on the baseline for the report."""

    enabled: bool = True
    batches: int = Field(4, ge=1)
    kinds: list[Literal["weight", "activation", "gradient"]] | None = None  # default: the searched kinds


class Config(_Section):
    """A whole experiment."""

    name: str | None = None
    out: str | None = None  # run directory; default runs/<name>
    mode: Literal["ptq", "train"] = "ptq"
    seeds: list[int] = Field(default_factory=lambda: [0])
    task: TaskConfig = Field(default_factory=TaskConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    criterion: CriterionConfig = Field(default_factory=CriterionConfig)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    stats: StatsConfig = Field(default_factory=StatsConfig)
    # Named variants of this config (dotted key -> value), each run into <run dir>/<name>
    # and compared side by side, e.g. nearest vs stochastic rounding.
    variants: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if not v or any(s < 0 for s in v):
            raise ValueError("needs one or more seeds >= 0")
        return v

    @model_validator(mode="after")
    def _defaults(self) -> Config:
        if self.criterion.name is None:
            self.criterion.name = "accuracy" if self.mode == "ptq" else "converge"
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
    path = ".".join(str(p) for p in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        allowed = _fields(Config, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"did you mean `{close[0]}`? " if close else ""
        return f"{path}: unknown key; {hint}allowed: {', '.join(allowed)}"
    msg = err["msg"].replace("Input should be", "must be")
    return f"{path}: {msg} (found {err.get('input')!r})"


def _semantic_errors(raw: dict[str, Any]) -> list[str]:
    """Checks that need the library (format family and options, task names), on the raw
    values, so they are reported together with the schema's errors."""
    from .families import FAMILIES, make_format
    from .tasks import DATA_FORMS, MODEL_FORMS

    errors = []
    search = raw.get("search") if isinstance(raw.get("search"), dict) else {}
    family, options = search.get("family", "int"), search.get("options", {})
    candidates = search.get("candidates", [8])
    if isinstance(family, str) and family not in FAMILIES:
        errors.append(f"search.family: unknown family {family!r}; allowed: {', '.join(FAMILIES)}")
    elif isinstance(family, str) and isinstance(options, dict) and isinstance(candidates, list):
        extra = {"absmax": 1.0} if family == "fixed" else {}  # the real absmax comes from the data
        for bits in candidates:
            try:
                make_format(family, bits, **options, **extra)
            except (ValueError, TypeError) as err:
                errors.append(f"search.options: {err} (family {family!r} at {bits!r} bits)")
                break
    kinds = search.get("kinds", [])
    if raw.get("mode", "ptq") == "ptq" and isinstance(kinds, list) and "gradient" in kinds:
        errors.append("search.kinds: 'gradient' exists only in mode 'train' (the backward pass); "
                      "use mode: train, or kinds weight and activation")
    task = raw.get("task") if isinstance(raw.get("task"), dict) else {}
    data, model = task.get("data", "digits"), task.get("model", "digits_cnn")
    if isinstance(data, str) and not (data.lower() in DATA_FORMS or data.startswith("imagefolder:")):
        errors.append(f"task.data: unknown data {data!r}; allowed: {', '.join(DATA_FORMS)}")
    if isinstance(model, str) and not (model in MODEL_FORMS or ":" in model):
        errors.append(f"task.model: unknown model {model!r}; allowed: {', '.join(MODEL_FORMS)}")
    return errors


# ----------------------------------------------------------------------------- loading


def _set_path(d: dict[str, Any], path: str, value: Any) -> None:
    parts = path.split(".")
    for p in parts[:-1]:
        nxt = d.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError([f"{path}: {p} is not a section"], "--set")
        d = nxt
    d[parts[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings; values are parsed as YAML (``[2,4]``, ``true``, ``0.1``)."""
    errors = []
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            errors.append(f"{item!r}: an override is key=value, e.g. search.strategy=grid")
            continue
        try:
            _set_path(raw, key.strip(), yaml.safe_load(value))
        except yaml.YAMLError as err:
            errors.append(f"{key}: value is not valid YAML ({err})")
    if errors:
        raise ConfigError(errors, "--set")
    return raw


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read, override and validate a config; ``ConfigError`` lists every problem."""
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
        raw.setdefault("name", p.stem)
    raw = apply_overrides(raw, list(overrides or []))
    cfg, errors = _validate(raw)
    variants = raw.get("variants") if isinstance(raw.get("variants"), dict) else {}
    for name, changes in variants.items():
        if not isinstance(changes, dict) or not changes:
            errors.append(f"variants.{name}: a variant maps config keys to values, "
                          "e.g. search.options.rounding: nearest")
            continue
        _, variant_errors = _validate(_variant_raw(raw, name, changes))
        errors += [f"variants.{name}: {e}" for e in variant_errors]
    if errors:
        raise ConfigError(errors, source)
    assert cfg is not None
    return cfg


def _validate(raw: dict[str, Any]) -> tuple[Config | None, list[str]]:
    errors = _semantic_errors(raw)
    try:
        return Config.model_validate(raw), errors
    except ValidationError as err:
        return None, [_explain(e) for e in err.errors()] + errors


def _variant_raw(raw: dict[str, Any], name: str, changes: dict[str, Any]) -> dict[str, Any]:
    variant = copy.deepcopy({k: v for k, v in raw.items() if k != "variants"})
    for key, value in changes.items():
        _set_path(variant, str(key), copy.deepcopy(value))
    parent = raw.get("out") or _default_run_dir(raw.get("name"))
    variant["out"] = str(Path(parent) / name)
    variant["name"] = f"{raw.get('name') or 'run'}-{name}"
    return variant


def variant_configs(cfg: Config) -> dict[str, Config]:
    """Each named variant as a complete config whose run directory is ``<run dir>/<name>``.

    >>> cfg = load_config(None, ["name=study", "variants={a: {search.strategy: grid}}"])
    >>> v = variant_configs(cfg)["a"]
    >>> v.search.strategy, str(v.run_dir)
    ('grid', 'runs/study/a')
    """
    raw = cfg.model_dump(mode="json")
    return {name: Config.model_validate(_variant_raw(raw, name, changes)) for name, changes in cfg.variants.items()}


def config_to_yaml(cfg: Config) -> str:
    """The resolved config (every default filled in), as written to ``<run dir>/config.yaml``."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
