"""``pytext``: byte-level language-model data from the running Python's own standard library.

Every Python install ships its standard library as ``.py`` source, so this corpus needs no
download and is never copied into the repository; it is read at run time from
``sysconfig.get_paths()["stdlib"]``. The rule that picks it is fixed:

* the top-level ``*.py`` files of that directory (no subpackages), ordered by the SHA-256
  of their file name: a fixed shuffle that mixes modules of every kind;
* a file belongs to validation when the first byte of that hash is below 32 (one file in
  eight), else to training, so the split is by file (no window of a validation file is
  ever trained on) and a file's side depends on its name alone;
* each side is the concatenation of its files' bytes in that order, cut to exactly
  ``train_bytes`` or ``val_bytes``, then into non-overlapping windows of ``context``
  bytes. ``x`` is a window, ``y`` the same window shifted by one byte (next-byte targets).

Another Python version has other files, so the data's ``info`` (and with it every task
fingerprint and cached baseline key) records the Python version and a digest of the file
names and bytes used.

>>> spec = load_pytext(context=32, train_bytes=4096, val_bytes=1024)
>>> x, y = spec.train[0]
>>> x.shape, y.shape, x.dtype, bool((x[1:] == y[:-1]).all())
(torch.Size([32]), torch.Size([32]), torch.int64, True)
>>> len(spec.train), len(spec.val), spec.num_classes
(127, 31, 256)
"""

from __future__ import annotations

import dataclasses
import hashlib
import platform
import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as TF
from torch import Tensor
from torch.utils.data import TensorDataset

from .base import DataSpec, digest

__all__ = ["VOCAB_SIZE", "corpus_files", "load_pytext", "sequence_cross_entropy", "split_corpus"]

VOCAB_SIZE = 256  # bytes
_VAL_HASH_BELOW = 32  # of 256: one file in eight is validation
_cache: dict[tuple, DataSpec] = {}


def sequence_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over every position: ``logits`` (B, T, V) against ``targets`` (B, T).

    >>> logits = torch.zeros(2, 3, 4)  # uniform over 4 symbols
    >>> round(float(sequence_cross_entropy(logits, torch.zeros(2, 3, dtype=torch.long))), 4)
    1.3863
    """
    return TF.cross_entropy(logits.flatten(0, -2), targets.flatten())  # (B*T, V) vs (B*T,)


def _name_hash(path: Path) -> bytes:
    return hashlib.sha256(path.name.encode()).digest()


def corpus_files(stdlib: str | Path | None = None) -> tuple[list[Path], list[Path]]:
    """``(train_files, val_files)`` of the standard library at ``stdlib`` (default: this Python's).

    >>> train, val = corpus_files()
    >>> len(val) > 0 and not set(train) & set(val)
    True
    """
    root = Path(stdlib if stdlib is not None else sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"), key=_name_hash)
    if not files:
        raise FileNotFoundError(f"no standard-library .py files in {str(root)!r}; the pytext data needs "
                                "a Python whose standard library ships as source")
    val = [p for p in files if _name_hash(p)[0] < _VAL_HASH_BELOW]
    return [p for p in files if _name_hash(p)[0] >= _VAL_HASH_BELOW], val


def split_corpus(files: list[Path], n_bytes: int) -> tuple[bytes, list[str]]:
    """The first ``n_bytes`` of the files' concatenated bytes, and the names of the files used.

    >>> train, _ = corpus_files()
    >>> text, names = split_corpus(train, 100)
    >>> len(text), names == [train[0].name]
    (100, True)
    """
    chunks, names, size = [], [], 0
    for path in files:
        if size >= n_bytes:
            break
        data = path.read_bytes()
        chunks.append(data)
        names.append(path.name)
        size += len(data)
    if size < n_bytes:
        raise ValueError(f"the standard library has only {size} bytes for this split, {n_bytes} asked for")
    return b"".join(chunks)[:n_bytes], names


def _windows(text: bytes, context: int) -> TensorDataset:
    tokens = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    n = (len(tokens) - 1) // context
    x = tokens[: n * context].view(n, context)  # (N, T)
    y = tokens[1 : n * context + 1].view(n, context)  # (N, T): the next byte of each position
    return TensorDataset(x, y)


def load_pytext(context: int = 64, train_bytes: int = 524_288, val_bytes: int = 65_536) -> DataSpec:
    """The standard-library corpus (see the module docstring) as ``(x, y)`` windows of ``context`` bytes.

    The ``DataSpec``'s ``num_classes`` is the vocabulary (256 bytes) and ``image_size`` is
    ``(context,)``: the shape a model builder gets. Defaults: 512 KiB for training, 64 KiB
    for validation, windows of 64 bytes.

    >>> load_pytext(context=0)
    Traceback (most recent call last):
    ...
    ValueError: context must be an integer >= 1, got 0
    """
    for key, value, lo in (("context", context, 1), ("train_bytes", train_bytes, context + 1),
                           ("val_bytes", val_bytes, context + 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < lo:
            raise ValueError(f"{key} must be an integer >= {lo}, got {value!r}")
    stdlib = sysconfig.get_paths()["stdlib"]
    key = (stdlib, context, train_bytes, val_bytes)
    if key not in _cache:
        train_files, val_files = corpus_files(stdlib)
        train_text, train_names = split_corpus(train_files, train_bytes)
        val_text, val_names = split_corpus(val_files, val_bytes)
        info = {
            "data": "pytext", "context": context, "train_bytes": train_bytes, "val_bytes": val_bytes,
            "python": platform.python_version(),
            "train_files": len(train_names), "val_files": len(val_names),
            "corpus_digest": digest([train_names, val_names, digest(train_text), digest(val_text)]),
        }
        _cache[key] = DataSpec(_windows(train_text, context), _windows(val_text, context), 1, VOCAB_SIZE,
                               (context,), info, loss_fn=sequence_cross_entropy)
    spec = _cache[key]
    # Fresh datasets over the same tensors: a caller may replace them without touching the cache.
    return dataclasses.replace(spec, train=TensorDataset(*spec.train.tensors),  # type: ignore[attr-defined]
                               val=TensorDataset(*spec.val.tensors), info=dict(spec.info))  # type: ignore[attr-defined]
