"""The ``Task``: a seeded model, training and validation data, a loss, and evaluation.

A task never trains by itself; :mod:`bitwidth.trial` does. It only fixes everything a
trial needs to be reproducible: the model's initial weights for a seed, the order of the
training batches for a (seed, epoch), the validation batches, and a fingerprint of all
of it for trial keys.

>>> import torch
>>> from torch.utils.data import TensorDataset
>>> data = TensorDataset(torch.randn(10, 4), torch.arange(10) % 2)
>>> task = Task("toy", lambda: torch.nn.Linear(4, 2), data, data, batch_size=4)
>>> [len(y) for _, y in task.train_batches(seed=0, epoch=0)]
[4, 4, 2]
>>> task.example_input().shape
torch.Size([1, 4])
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as TF
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

__all__ = ["TASK_METHODS", "DataSpec", "Task", "TaskLike", "check_task", "digest", "evaluate"]

Batch = tuple[Tensor, Tensor]
TASK_METHODS = ("build_model", "train_batches", "val_batches", "calib_batches", "example_input", "fingerprint")


@runtime_checkable
class TaskLike(Protocol):
    """What a trial needs from a task; :class:`Task` is the ready-made implementation."""

    name: str

    def build_model(self, seed: int) -> nn.Module: ...
    def train_batches(self, seed: int, epoch: int, batch_size: int | None = None) -> Iterable[Batch]: ...
    def val_batches(self) -> Iterable[Batch]: ...
    def calib_batches(self, n: int) -> list[Batch]: ...
    def example_input(self) -> Tensor: ...
    def fingerprint(self) -> dict: ...


@dataclass
class DataSpec:
    """Training and validation data with what a model builder needs to fit them.

    ``info`` is JSON-able: the data's name and the options that shaped it (for fingerprints).
    ``loss_fn`` is the loss the data calls for (``None``: cross-entropy over classes). Text
    data holds token windows with next-token targets; its ``num_classes`` is the vocabulary
    and its ``image_size`` is ``(context,)``.
    """

    train: Dataset
    val: Dataset
    in_channels: int
    num_classes: int
    image_size: tuple[int, ...]
    info: dict = field(default_factory=dict)
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None


def check_task(obj: Any, origin: str = "task") -> TaskLike:
    """Return ``obj`` if it has every task method, else raise ``ValueError`` naming the missing ones.

    >>> check_task(object(), "x")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: x is not a Task: missing name, build_model, train_batches, ..., fingerprint
    """
    missing = [m for m in ("name", *TASK_METHODS) if not hasattr(obj, m)]
    if missing:
        raise ValueError(f"{origin} is not a Task: missing {', '.join(missing)}")
    return obj


def digest(obj: Any) -> str:
    """A short stable hash of a JSON-able object or of bytes.

    >>> digest({"a": 1}) == digest({"a": 1}), len(digest(b"x"))
    (True, 16)
    """
    data = obj if isinstance(obj, bytes) else json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(data).hexdigest()[:16]


def _order(n: int, seed: int, epoch: int) -> Tensor:
    # One generator per (seed, epoch): any epoch's order is reproducible on its own,
    # so a resumed or shortened run sees exactly the batches of a full one.
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen)


@dataclass(eq=False)
class Task:
    """A classification task over two map-style datasets of ``(input, label)`` pairs.

    ``model_fn()`` builds a fresh model; :meth:`build_model` calls it under
    ``torch.manual_seed(seed)``. ``info`` (JSON-able) describes where the model and data
    come from and goes into :meth:`fingerprint` with the dataset sizes and model shape.
    """

    name: str
    model_fn: Callable[[], nn.Module]
    train_set: Dataset
    val_set: Dataset
    batch_size: int = 32
    eval_batch_size: int = 512
    loss_fn: Callable[[Tensor, Tensor], Tensor] = TF.cross_entropy
    info: dict = field(default_factory=dict)
    num_workers: int = 0

    def __post_init__(self) -> None:
        for key in ("batch_size", "eval_batch_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if len(self.train_set) == 0 or len(self.val_set) == 0:  # type: ignore[arg-type]
            raise ValueError(f"task {self.name!r} needs non-empty training and validation data")
        self._fingerprint: dict | None = None

    def build_model(self, seed: int) -> nn.Module:
        """A freshly initialised model; the same seed gives the same weights."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.model_fn()

    def train_batches(self, seed: int, epoch: int, batch_size: int | None = None) -> Iterator[Batch]:
        """The training data of one epoch, shuffled by ``(seed, epoch)`` only."""
        order = _order(len(self.train_set), seed, epoch)  # type: ignore[arg-type]
        return self._batches(self.train_set, order, batch_size or self.batch_size)

    def val_batches(self) -> Iterator[Batch]:
        """The validation data in its stored order."""
        return self._batches(self.val_set, torch.arange(len(self.val_set)), self.eval_batch_size)  # type: ignore[arg-type]

    def calib_batches(self, n: int) -> list[Batch]:
        """``n`` training batches in a fixed shuffled order (shuffled so no class dominates)."""
        if n < 0:
            raise ValueError(f"the number of calibration batches must be >= 0, got {n}")
        order = _order(len(self.train_set), -1, 0)[: n * self.batch_size]  # type: ignore[arg-type]
        return list(self._batches(self.train_set, order, self.batch_size))

    def example_input(self) -> Tensor:
        """One validation input as a batch of one, e.g. for counting MACs."""
        x, _ = self.val_set[0]
        return torch.as_tensor(x).unsqueeze(0)

    def fingerprint(self) -> dict:
        """Everything that determines the task, JSON-able, for trial and baseline keys."""
        if self._fingerprint is None:
            model = self.build_model(0)
            shapes = [[n, list(p.shape)] for n, p in model.named_parameters()]
            self._fingerprint = {
                "name": self.name,
                **self.info,
                "n_train": len(self.train_set),  # type: ignore[arg-type]
                "n_val": len(self.val_set),  # type: ignore[arg-type]
                "batch_size": self.batch_size,
                "loss": getattr(self.loss_fn, "__name__", type(self.loss_fn).__name__),
                "model_digest": digest([repr(model), shapes]),
            }
        return dict(self._fingerprint)

    def evaluate(self, model: nn.Module, device: str | torch.device = "cpu") -> dict[str, float]:
        """Validation ``accuracy`` and mean ``loss`` of ``model``."""
        return evaluate(model, self.val_batches(), self.loss_fn, device)

    def _batches(self, data: Dataset, order: Tensor, batch_size: int) -> Iterator[Batch]:
        # Tensor-backed data is sliced a batch at a time: far faster than item-wise collation.
        if isinstance(data, TensorDataset) and len(data.tensors) == 2:
            x, y = data.tensors
            for idx in order.split(batch_size):
                # index_select, not x[idx]: advanced indexing is ~100x slower on CPU here.
                yield x.index_select(0, idx), y.index_select(0, idx)
            return
        if callable(getattr(data, "batch", None)):
            for idx in order.split(batch_size):
                yield data.batch(idx)  # type: ignore[attr-defined]
            return
        chunks: Sequence[list[int]] = [c.tolist() for c in order.split(batch_size)]
        yield from DataLoader(data, batch_sampler=chunks, num_workers=self.num_workers)


def _class_dim(out: Tensor, y: Tensor) -> int | None:
    """The dimension of ``out`` holding class scores for targets ``y``, or ``None`` if it has none.

    Scores last, as a language model's ``(B, T, V)`` for ``(B, T)``, or second, as
    cross-entropy's ``(N, C, d1, ...)`` for ``(N, d1, ...)``; a classifier's ``(N, C)``
    for ``(N,)`` is both. Where both fit but differ (``(N, C, L)`` with ``C == L``), last.
    """
    if out.dim() != y.dim() + 1:
        return None
    if out.shape[:-1] == y.shape:
        return -1
    if out.shape[:1] + out.shape[2:] == y.shape:
        return 1
    return None


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[Batch],
    loss_fn: Callable[[Tensor, Tensor], Tensor] = TF.cross_entropy,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Top-1 ``accuracy`` and mean ``loss`` of ``model`` over ``batches`` (eval mode).

    Both are per prediction: a classifier makes one per sample, a language model one per
    position (``(B, T, V)`` logits for ``(B, T)`` targets: next-token accuracy). ``loss_fn``
    must average over predictions; batches are weighted by their number of predictions.
    Outputs that are not class scores for the targets (regression) get a NaN ``accuracy``.

    >>> m = torch.nn.Linear(2, 2)
    >>> sorted(evaluate(m, [(torch.randn(3, 2), torch.tensor([0, 1, 1]))]))
    ['accuracy', 'loss']
    >>> lm = torch.nn.Embedding(2, 2).requires_grad_(False)
    >>> _ = lm.weight.copy_(torch.eye(2))  # predicts the byte it reads: (1, 3) -> (1, 3, 2) logits
    >>> x, y = torch.tensor([[0, 1, 0]]), torch.tensor([[0, 1, 1]])
    >>> evaluate(lm, [(x, y)], lambda o, t: TF.cross_entropy(o.flatten(0, 1), t.flatten()))["accuracy"]
    0.6666666666666666
    """
    was_training = model.training
    model.eval()
    correct, total, loss_sum, scored = 0, 0, 0.0, True
    try:
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            out = model(x)  # (N, C), (N, C, ...) or (B, T, V)
            loss_sum += float(loss_fn(out, y)) * y.numel()
            dim = _class_dim(out, y)
            scored = scored and dim is not None
            if dim is not None:
                correct += int((out.argmax(dim=dim) == y).sum())
            total += y.numel()
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("evaluate needs at least one batch")
    return {"accuracy": correct / total if scored else math.nan, "loss": loss_sum / total}
