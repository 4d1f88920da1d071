"""A user task whose model kills its worker process once, mid-trial (executor tests).

The model's forward calls ``os._exit`` when the flag file named by the environment
variable ``BITWIDTH_DIE_FLAG`` exists and this is not the driver process (whose pid is in
``BITWIDTH_DRIVER_PID``); it removes the flag first, so exactly one trial dies once.
"""

from __future__ import annotations

import os

import torch

from bitwidth.tasks import Task
from bitwidth.tasks.digits import digits_datasets
from bitwidth.tasks.models import DigitsMLP


class DyingNet(DigitsMLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flag = os.environ.get("BITWIDTH_DIE_FLAG", "")
        if flag and str(os.getpid()) != os.environ.get("BITWIDTH_DRIVER_PID") and os.path.exists(flag):
            os.remove(flag)
            os._exit(1)  # the worker vanishes without a word, like an OOM kill
        return super().forward(x)


def build_task() -> Task:
    train, val = digits_datasets()
    return Task("dying-digits", DyingNet, train, val, batch_size=64)
