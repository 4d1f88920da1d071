"""Bring your own model or task by import path: ``package.module:callable`` or ``file.py:callable``.

The callable is called with the ``make_task`` options its signature accepts (and
``in_channels``, ``num_classes``, ``image_size`` of the data when it asks for them). It
returns one of:

* a Task (anything with the :data:`~bitwidth.tasks.base.TASK_METHODS`): used as it is;
* a model (``nn.Module``): trained on the ``data`` named in ``make_task``, with that data's
  loss (next-token cross-entropy for ``pytext``); each seed calls the callable again under
  that seed, so initialisation is seeded;
* ``(model, (train, val))`` or ``(model, train, val)``: its own data, each a Dataset, a
  DataLoader (its dataset and batch size are used) or a tensor pair ``(x, y)``. A model
  instance is copied and re-initialised per seed with each module's ``reset_parameters``.

>>> load_object("math:sqrt")(4.0)
2.0
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .base import DataSpec, Task, TaskLike, check_task, digest

__all__ = ["DATA_ARGS", "ImportedCallable", "is_import_path", "load_object", "user_task"]

# What a model builder may ask for about the data it has to fit.
DATA_ARGS = ("in_channels", "num_classes", "image_size")


def is_import_path(name: str) -> bool:
    """``True`` for ``a.b:c`` or ``file.py:c`` (one colon, no spaces, not a built-in prefix).

    >>> is_import_path("mypkg.models:build"), is_import_path("torchvision:resnet18"), is_import_path("digits")
    (True, False, False)
    """
    module, sep, attr = name.partition(":")
    return bool(sep and module and attr and module not in ("torchvision", "imagefolder") and " " not in name)


def load_object(path: str) -> Any:
    """Import ``module:attr`` (``attr`` may be dotted); ``module`` may also be a ``.py`` file.

    The current directory is tried too, as ``python -m`` would, so a config can name a
    module of the project it is run from.
    """
    if not is_import_path(path):
        raise ValueError(f"an import path looks like 'package.module:callable' or 'file.py:callable', got {path!r}")
    module_name, _, attr = path.partition(":")
    try:
        module = _import(module_name)
    except ImportError as err:
        raise ValueError(f"cannot import {module_name!r} for {path!r}: {err}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(obj) if not n.startswith("_"))[:12]
            raise ValueError(f"{module_name!r} has no attribute {attr!r}; it has: {', '.join(public)}")
        obj = getattr(obj, part)
    return obj


def _import(module_name: str) -> Any:
    if module_name.endswith(".py"):
        file = Path(module_name).resolve()
        if not file.is_file():
            raise ImportError(f"no file {str(file)!r}")
        name = "bitwidth_user_" + hashlib.sha256(str(file).encode()).hexdigest()[:8]
        spec = importlib.util.spec_from_file_location(name, file)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[name] = module
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        return module
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError:
        cwd = os.getcwd()
        if cwd in sys.path:
            raise
        sys.path.insert(0, cwd)
        return importlib.import_module(module_name)


def _accepted(fn: Callable, options: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """The options ``fn`` accepts, and whether it takes ``**kwargs``."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}, False
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    return {k: v for k, v in options.items() if var_kw or k in params}, var_kw


def _source_digest(obj: Any) -> str:
    # Editing the user's code must change trial keys, so stored trials are not reused.
    try:
        return digest(inspect.getsource(inspect.getmodule(obj)).encode())  # type: ignore[arg-type]
    except (TypeError, OSError):
        return "unknown"


def user_task(
    path: str,
    load_data: Callable[[], DataSpec],
    options: dict[str, Any],
    data_option_names: set[str],
    task_options: dict[str, Any],
) -> TaskLike:
    """Build the task of the user callable at ``path`` (see the module docstring).

    ``load_data`` loads the ``data`` named in ``make_task`` (only when needed); options that
    neither the callable nor that data accept raise ``ValueError``.
    """
    fn = ImportedCallable(path)
    if not callable(fn.target):
        raise ValueError(f"{path!r} is a {type(fn.target).__name__}, not a callable returning a Task or a model")
    user_opts, var_kw = _accepted(fn.target, options)
    unused = sorted(set(options) - set(user_opts) - data_option_names)
    if unused:
        raise ValueError(f"option(s) {unused} are accepted neither by {path!r} nor by the data; "
                         f"data options: {sorted(data_option_names)}")
    wants_data = var_kw or bool(_accepted(fn.target, dict.fromkeys(DATA_ARGS))[0])
    data = load_data() if wants_data else None
    if data is not None:
        shape = {"in_channels": data.in_channels, "num_classes": data.num_classes, "image_size": data.image_size}
        user_opts.update(_accepted(fn.target, shape)[0])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        result = fn(**user_opts)
    info = {"model": path, "options": _jsonable(options), "source": _source_digest(fn.target)}
    name = task_options.pop("name", None)
    if isinstance(result, nn.Module):
        data = data or load_data()
        if data.loss_fn is not None:  # e.g. text data: cross-entropy over every position
            task_options["loss_fn"] = data.loss_fn
        # partial of a path-pickled callable, not a lambda: process-pool executors pickle the task.
        return Task(name or f"{path}@{data.info.get('data')}", functools.partial(fn, **user_opts), data.train,
                    data.val, info={**info, **data.info}, **task_options)
    if isinstance(result, tuple) and len(result) in (2, 3) and _is_model(result[0]):
        model, *rest = result
        train, val = rest[0] if len(rest) == 1 else rest
        train_set, batch_size = _dataset(train, "train")
        val_set, _ = _dataset(val, "val")
        if batch_size and "batch_size" not in task_options:
            task_options["batch_size"] = batch_size
        return Task(name or path, _model_fn(model), train_set, val_set, info={**info, "data": "user"}, **task_options)
    if isinstance(result, Task):
        extra = {**task_options, **({"name": name} if name else {})}
        return dataclasses.replace(result, **extra) if extra else result
    if all(hasattr(result, m) for m in ("build_model", "train_batches")):
        if task_options or name:
            raise ValueError(f"{path!r} returned its own {type(result).__name__}; task options "
                             f"{sorted(task_options) + (['name'] if name else [])} cannot be applied to it")
        return check_task(result, f"the object returned by {path!r}")
    raise ValueError(f"{path!r} returned a {type(result).__name__}; expected a Task, an nn.Module, "
                     "or (model, (train, val))")


def _is_model(obj: Any) -> bool:
    return isinstance(obj, nn.Module) or callable(obj)


def _model_fn(model: nn.Module | Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    return _Reinit(model) if isinstance(model, nn.Module) else model


class _Reinit:
    """A fresh copy of ``model`` with every ``reset_parameters`` redrawn (from Task.build_model's seed)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self) -> nn.Module:
        fresh = copy.deepcopy(self.model)
        for m in fresh.modules():
            if callable(getattr(m, "reset_parameters", None)):
                m.reset_parameters()
        return fresh


class ImportedCallable:
    """The object at an import path, pickled as the path so worker processes import it themselves.

    >>> import pickle
    >>> pickle.loads(pickle.dumps(ImportedCallable("math:sqrt")))(9.0)
    3.0
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.target = load_object(path)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.target(*args, **kwargs)

    def __reduce__(self) -> tuple:
        return (ImportedCallable, (self.path,))


def _dataset(data: Any, which: str) -> tuple[Dataset, int | None]:
    if isinstance(data, DataLoader):
        return data.dataset, data.batch_size
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return TensorDataset(*data), None
    if isinstance(data, Dataset):
        return data, None
    raise ValueError(f"user {which} data must be a Dataset, a DataLoader or an (x, y) tensor pair, "
                     f"got {type(data).__name__}")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj if isinstance(obj, (str, int, float, bool, type(None))) else repr(obj)
