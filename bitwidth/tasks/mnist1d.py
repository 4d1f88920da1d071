"""``mnist1d``: the MNIST-1D data set (Greydanus, 2020), generated locally by its package.

Each sample is a 40-point signal made from one of ten digit templates by padding,
shearing, translation and noise; the ``mnist1d`` package (``pip install 'bitwidth[experiments]'``)
builds the whole set from its own seeded procedure, so nothing is downloaded. Samples are
shaped ``(1, 1, 40)``, a one-row image, so the image models (``digits_mlp``,
``digits_cnn``) take them as they are; values are standardised with the training split's
mean and standard deviation, as the digits are.

>>> spec = load_mnist1d(num_samples=200)
>>> len(spec.train), len(spec.val), spec.image_size, tuple(spec.train[0][0].shape)
(160, 40, (1, 40), (1, 1, 40))
"""

from __future__ import annotations

import functools

import torch
from torch.utils.data import TensorDataset

from .base import DataSpec

__all__ = ["load_mnist1d"]


@functools.lru_cache(maxsize=4)
def _generate(num_samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as err:  # an optional dependency: say how to get it
        raise ValueError("data 'mnist1d' needs the mnist1d package: pip install 'bitwidth[experiments]'") from err
    args = get_dataset_args()
    args.num_samples, args.seed = num_samples, seed
    data = make_dataset(args)  # generated from templates in memory; make_dataset never downloads
    xt, xv = (torch.tensor(data[k], dtype=torch.float32).reshape(-1, 1, 1, 40) for k in ("x", "x_test"))
    mean, std = xt.mean(), xt.std()
    return (xt - mean) / std, torch.tensor(data["y"]), (xv - mean) / std, torch.tensor(data["y_test"])


def load_mnist1d(num_samples: int = 5000, seed: int = 42) -> DataSpec:
    """MNIST-1D with ``num_samples`` signals (80% train, 20% validation) drawn with ``seed``."""
    xt, yt, xv, yv = _generate(int(num_samples), int(seed))
    return DataSpec(TensorDataset(xt, yt), TensorDataset(xv, yv), 1, 10, (1, 40),
                    {"data": "mnist1d", "num_samples": num_samples, "seed": seed})
