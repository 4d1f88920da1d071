"""A user's own task module, imported by path in tests: ``user_task_example:<callable>``."""

from __future__ import annotations

import functools

import torch
from torch import nn

from bitwidth.tasks import Task, load_digits_split
from bitwidth.tasks.digits import digits_datasets


class TinyNet(nn.Module):
    """A model builder that asks for the data's shape."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: tuple = (8, 8), hidden: int = 16):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size[0] * image_size[1], hidden),
                                  nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def build_task(hidden: int = 16) -> Task:
    """Returns a complete Task."""
    train, val = digits_datasets()
    # A partial, not a lambda, so the task pickles for process-pool executors.
    return Task(f"user-digits-{hidden}", functools.partial(TinyNet, hidden=hidden), train, val, batch_size=64)


def model_and_data() -> tuple:
    """Returns a model instance plus its own data as tensor pairs."""
    xt, yt, xv, yv = load_digits_split()
    return TinyNet(hidden=8), ((xt[:256], yt[:256]), (xv[:128], yv[:128]))


def not_a_task() -> int:
    return 42
