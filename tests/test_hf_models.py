"""Hugging Face ``transformers`` causal LMs as user tasks on the pytext data (needs the ``hf`` extra)."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed (pip install 'bitwidth[hf]')")

from bitwidth.tasks import make_task  # noqa: E402
from bitwidth.tasks.text import sequence_cross_entropy  # noqa: E402

EXAMPLE = Path(__file__).parent / "hf_task_example.py"
SMALL = {"train_bytes": 8192, "val_bytes": 2048}


@pytest.mark.parametrize("builder, layer", [("gpt2", "lm.transformer.h.1.attn.c_attn"),
                                             ("llama", "lm.model.layers.1.self_attn.q_proj")])
def test_hf_model_as_user_task(builder, layer):
    task = make_task(f"{EXAMPLE}:{builder}", "pytext", **SMALL)
    assert task.loss_fn is sequence_cross_entropy and task.fingerprint()["data"] == "pytext"
    model = task.build_model(0)
    assert layer in dict(model.named_modules())
    x, y = next(iter(task.train_batches(0, 0, batch_size=4)))
    assert model(x).shape == (4, 64, 256) and y.shape == (4, 64)
    assert torch.equal(model.lm.lm_head.weight, task.build_model(0).lm.lm_head.weight)  # seeded
    assert pickle.loads(pickle.dumps(task)).fingerprint() == task.fingerprint()


def test_short_training_lowers_the_loss():
    task = make_task(f"{EXAMPLE}:llama", "pytext", **SMALL)
    model = task.build_model(0)
    before = task.evaluate(model)["loss"]
    assert before == pytest.approx(math.log(256), abs=0.1)  # small initial weights: near uniform
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for x, y in task.train_batches(0, 0, batch_size=16):
        loss = task.loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = task.evaluate(model)
    assert after["loss"] < before - 1.0 and after["accuracy"] > 0.1
