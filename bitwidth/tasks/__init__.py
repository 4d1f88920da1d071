"""Tasks: a seeded model plus its data; ``make_task`` builds one from two names.

``model``: ``digits_mlp``, ``digits_cnn``, ``digits_resnet``, ``torchvision:<name>`` (any torchvision
classifier, adapted to the data's channels and classes), ``tiny_lm`` (a byte-level
transformer language model, :mod:`bitwidth.tasks.lm`) or ``package.module:callable``
(see :mod:`bitwidth.tasks.user`). ``data``: ``digits`` (bundled, the default),
``mnist1d`` (generated locally by the ``mnist1d`` package,
:mod:`bitwidth.tasks.mnist1d`), ``fakedata``, ``mnist``, ``fashionmnist``, ``cifar10`` (from a local ``root``),
``imagefolder:<path>``, or ``pytext`` (this Python's standard-library source as bytes,
:mod:`bitwidth.tasks.text`). ``tiny_lm`` takes text data and the other built-in models
image data. Options go to whichever part accepts them (see ``DATA_OPTIONS`` and
``TASK_OPTIONS``); one that nothing accepts is a ``ValueError``.

>>> task = make_task("digits_mlp", "digits", batch_size=64)
>>> task.name, task.fingerprint()["n_train"]
('digits_mlp@digits', 1347)
>>> lm = make_task("tiny_lm", "pytext")
>>> lm.name, lm.loss_fn.__name__, tuple(next(iter(lm.val_batches()))[1].shape)
('tiny_lm@pytext', 'sequence_cross_entropy', (512, 64))
"""

from __future__ import annotations

import functools
from typing import Any

from .base import DataSpec, Task, TaskLike, check_task, evaluate
from .digits import digits_datasets, load_digits_split
from .lm import tiny_lm
from .models import BUILTIN_MODELS, digits_cnn, digits_mlp, digits_resnet
from .user import is_import_path

__all__ = [
    "DATA_FORMS",
    "DATA_OPTIONS",
    "MODEL_FORMS",
    "TASK_OPTIONS",
    "DataSpec",
    "Task",
    "TaskLike",
    "check_pairing",
    "check_task",
    "digits_cnn",
    "digits_mlp",
    "digits_resnet",
    "evaluate",
    "load_data",
    "load_digits_split",
    "make_task",
    "tiny_lm",
]

MODEL_FORMS = ("digits_mlp", "digits_cnn", "torchvision:<name>", "tiny_lm", "digits_resnet",
               "package.module:callable")
DATA_FORMS = ("digits", "fakedata", "mnist", "fashionmnist", "cifar10", "imagefolder:<path>", "pytext", "mnist1d")
_MODELS = {**BUILTIN_MODELS, "tiny_lm": tiny_lm}
# The kind of data each built-in takes or gives; every other model and data is "image".
_TEXT_MODELS, _TEXT_DATA = ("tiny_lm",), ("pytext",)
_TV_OPTIONS = {"root": "data", "download": False, "train_size": None, "val_size": None, "resize": None}
# Every data option with its default; the defaults are what a fingerprint records.
DATA_OPTIONS: dict[str, dict[str, Any]] = {
    "digits": {"split_seed": 0, "val_fraction": 0.25},
    "mnist1d": {"num_samples": 5000, "seed": 42},
    "fakedata": {"size": 64, "val_size": 32, "image_size": (3, 32, 32), "num_classes": 10},
    "mnist": _TV_OPTIONS,
    "fashionmnist": _TV_OPTIONS,
    "cifar10": _TV_OPTIONS,
    "imagefolder": {"image_size": 32, "val_fraction": 0.25, "split_seed": 0},
    "pytext": {"context": 64, "train_bytes": 524_288, "val_bytes": 65_536},
}
TASK_OPTIONS = ("name", "batch_size", "eval_batch_size", "num_workers")


def _data_kind(data: str) -> str:
    if not isinstance(data, str):
        raise ValueError(f"data must be a name, one of {DATA_FORMS}, got {data!r}")
    kind = "imagefolder" if data.startswith("imagefolder:") else data.lower()
    if kind not in DATA_OPTIONS or (kind == "imagefolder" and not data.partition(":")[2]):
        raise ValueError(f"unknown data {data!r}; allowed: {', '.join(DATA_FORMS)}")
    return kind


def load_data(data: str = "digits", **options: Any) -> DataSpec:
    """Load the named data with its options (unknown options raise ``ValueError``).

    >>> d = load_data("fakedata", size=8, val_size=4, image_size=(3, 16, 16), num_classes=5)
    >>> d.num_classes, d.image_size, len(d.train)
    (5, (16, 16), 8)
    """
    kind = _data_kind(data)
    unknown = sorted(set(options) - set(DATA_OPTIONS[kind]))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for data {data!r}; allowed: {sorted(DATA_OPTIONS[kind])}")
    opts = {**DATA_OPTIONS[kind], **options}
    if kind == "digits":
        train, val = digits_datasets(opts["split_seed"], opts["val_fraction"])
        return DataSpec(train, val, 1, 10, (8, 8), {"data": "digits", **opts})
    if kind == "mnist1d":
        from .mnist1d import load_mnist1d

        return load_mnist1d(**opts)
    if kind == "pytext":
        from .text import load_pytext

        return load_pytext(**opts)
    from . import vision

    if kind == "fakedata":
        return vision.load_fakedata(**opts)
    if kind == "imagefolder":
        return vision.load_imagefolder(data.partition(":")[2], **opts)
    return vision.load_torchvision_dataset(kind, **opts)


def make_task(model: str = "digits_cnn", data: str = "digits", **options: Any) -> TaskLike:
    """Build a task from a model name and a data name (see the module docstring).

    >>> make_task("digits_rnn")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: unknown model 'digits_rnn'; allowed: digits_mlp, digits_cnn, torchvision:<name>, tiny_lm, ...
    """
    if not isinstance(model, str):
        raise ValueError(f"model must be a name, one of {MODEL_FORMS}, got {model!r}")
    task_opts = {k: options.pop(k) for k in TASK_OPTIONS if k in options}
    kind = _data_kind(data)
    if is_import_path(model):
        from .user import user_task

        return user_task(model, lambda: load_data(data, **_data_opts(kind, options)), options,
                         set(DATA_OPTIONS[kind]), task_opts)
    if model in _MODELS:
        builder = _MODELS[model]
    elif model.startswith("torchvision:") and model.partition(":")[2]:
        from .vision import check_torchvision_name, torchvision_model

        tv_name = model.partition(":")[2]
        check_torchvision_name(tv_name)  # fail before any data is loaded
        builder = functools.partial(torchvision_model, tv_name)
    else:
        raise ValueError(f"unknown model {model!r}; allowed: {', '.join(MODEL_FORMS)}")
    check_pairing(model, data)
    spec = load_data(data, **options)
    name = task_opts.pop("name", f"{model}@{data}")
    shape = (spec.in_channels, spec.num_classes, tuple(spec.image_size))
    info = {"model": model, **{k: list(v) if isinstance(v, tuple) else v for k, v in spec.info.items()}}
    if spec.loss_fn is not None:
        task_opts["loss_fn"] = spec.loss_fn
    # partial, not a lambda: process-pool executors pickle the task.
    return Task(name, functools.partial(builder, *shape), spec.train, spec.val, info=info, **task_opts)


def check_pairing(model: str, data: str) -> None:
    """Raise ``ValueError`` when a built-in model cannot take the named data.

    ``tiny_lm`` takes text (``pytext``); ``digits_mlp``, ``digits_cnn`` and torchvision
    models take images. A user model (import path) may take either.

    >>> check_pairing("tiny_lm", "digits")
    Traceback (most recent call last):
    ...
    ValueError: model 'tiny_lm' takes text data (pytext), not image data 'digits'
    """
    if is_import_path(model) or not isinstance(data, str):
        return
    wants = "text" if model in _TEXT_MODELS else "image"
    gets = "text" if data.lower() in _TEXT_DATA else "image"
    if wants != gets:
        allowed = ", ".join(_TEXT_DATA) if wants == "text" else ", ".join(d for d in DATA_FORMS if d not in _TEXT_DATA)
        raise ValueError(f"model {model!r} takes {wants} data ({allowed}), not {gets} data {data!r}")


def _data_opts(kind: str, options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k in DATA_OPTIONS[kind]}
