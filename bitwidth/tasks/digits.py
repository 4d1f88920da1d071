"""scikit-learn's bundled 8x8 handwritten digits: the offline default data set.

1,797 grey images of the digits 0-9 ship inside scikit-learn, so nothing is downloaded.
The split is stratified and fixed by its seed; inputs are standardised with the training
split's mean and standard deviation (a single scalar each, as for MNIST).

>>> x_train, y_train, x_val, y_val = load_digits_split()
>>> tuple(x_train.shape), tuple(x_val.shape), x_train.dtype
((1347, 1, 8, 8), (450, 1, 8, 8), torch.float32)
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

__all__ = ["DIGITS_CLASSES", "DIGITS_SHAPE", "digits_datasets", "load_digits_split"]

DIGITS_SHAPE = (1, 8, 8)
DIGITS_CLASSES = 10
_cache: dict[tuple[int, float], tuple[Tensor, Tensor, Tensor, Tensor]] = {}


def load_digits_split(seed: int = 0, val_fraction: float = 0.25) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_val, y_val)``: x float32 (N, 1, 8, 8) standardised, y int64.

    >>> _, y, _, yv = load_digits_split(seed=1, val_fraction=0.2)
    >>> len(y), len(yv), int(yv.bincount().min()) >= 35
    (1437, 360, True)
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    key = (int(seed), float(val_fraction))
    if key not in _cache:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        x, y = load_digits(return_X_y=True)
        xt, xv, yt, yv = train_test_split(x, y, test_size=val_fraction, random_state=seed, stratify=y)
        xt, xv = (torch.tensor(a, dtype=torch.float32).reshape(-1, *DIGITS_SHAPE) for a in (xt, xv))
        mean, std = xt.mean(), xt.std()
        _cache[key] = ((xt - mean) / std, torch.tensor(yt), (xv - mean) / std, torch.tensor(yv))
    return tuple(t.clone() for t in _cache[key])  # type: ignore[return-value]


def digits_datasets(seed: int = 0, val_fraction: float = 0.25) -> tuple[TensorDataset, TensorDataset]:
    """The split of :func:`load_digits_split` as ``(train, val)`` tensor datasets.

    >>> [len(d) for d in digits_datasets()]
    [1347, 450]
    """
    xt, yt, xv, yv = load_digits_split(seed, val_fraction)
    return TensorDataset(xt, yt), TensorDataset(xv, yv)
