"""A rerun over a store with bad lines: they are skipped, logged to run.log, and their trials run again."""

from __future__ import annotations

import json
import logging

import pandas as pd
import torch
from torch import nn
from torch.utils.data import TensorDataset

from bitwidth.runner import run_search
from bitwidth.tasks import Task
from bitwidth.trial import TrialOptions


def toy_model() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def toy_task() -> Task:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 8, generator=g)
    data = TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())
    return Task("toy", toy_model, data, data, batch_size=32)


def search(run_dir):
    return run_search(toy_task(), mode="ptq", layers=["0", "2"], kinds=("weight",), candidates=(2, 8),
                      trial_options=TrialOptions(epochs=2), run_dir=run_dir)


def test_bad_store_lines_are_logged_to_run_log_and_their_trials_run_again(tmp_path):
    run_dir = tmp_path / "run"
    first = search(run_dir)
    path = run_dir / "trials.jsonl"
    lines = path.read_text().splitlines()
    assert len(lines) >= 3
    entry = json.loads(lines[0])
    del entry["record"]["outcome"]  # a real key whose record lacks its outcome
    lines[0] = json.dumps(entry)
    lines[2] = lines[2][:60]  # a cut line, then more lines after it
    path.write_text("\n".join(lines) + "\n")

    log = logging.getLogger("bitwidth")  # where the CLI sends run.log
    handler = logging.FileHandler(run_dir / "run.log")
    log.addHandler(handler)
    try:
        rerun = search(run_dir)  # raised KeyError: 'outcome' before
    finally:
        log.removeHandler(handler)
        handler.close()
    assert rerun.summary["counts"]["trials_run"] == 2
    text = (run_dir / "run.log").read_text()
    assert f"{path}:1: not a valid trial record, skipped (no 'outcome')" in text
    assert f"{path}:3: not a valid trial record, skipped (not valid JSON" in text
    pd.testing.assert_frame_equal(rerun.min_bits, first.min_bits)
    assert search(run_dir).summary["counts"]["trials_run"] == 0  # the rerun stored them again
