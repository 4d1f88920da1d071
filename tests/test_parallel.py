"""The search gives the same answer on every executor, and survives a worker that dies."""

import importlib.util
import os

import pandas as pd
import pytest

from bitwidth.executors import make_executor
from bitwidth.runner import run_search
from bitwidth.tasks import make_task
from bitwidth.trial import TrialOptions

SEARCH = dict(mode="ptq", layers=["fc1", "fc3"], kinds=("weight", "activation"), family="int",
              candidates=(2, 4, 8), trial_options=TrialOptions(epochs=2))


def search(tmp_path, name, executor, task=None):
    task = task or make_task("digits_mlp", "digits")
    with executor:
        return run_search(task, run_dir=tmp_path / name, executor=executor, **SEARCH)


def answer(result):
    return result.min_bits[["layer", "kind", "min_bits", "metric_at_min"]], result.summary["joint"]["bits"]


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    return search(tmp_path_factory.mktemp("local"), "local", make_executor("local"))


def test_process_pool_reproduces_local(local, tmp_path):
    result = search(tmp_path, "process", make_executor("process", workers=2))
    pd.testing.assert_frame_equal(answer(result)[0], answer(local)[0])
    assert answer(result)[1] == answer(local)[1]
    assert result.summary["counts"]["trials_run"] == local.summary["counts"]["trials_run"]


NO_RAY = importlib.util.find_spec("ray") is None


@pytest.mark.skipif(NO_RAY, reason="ray is not installed (pip install 'bitwidth[ray]')")
def test_ray_reproduces_local(local, tmp_path, ray_local):
    result = search(tmp_path, "ray", make_executor("ray", workers=2, address="local"))
    pd.testing.assert_frame_equal(answer(result)[0], answer(local)[0])
    assert answer(result)[1] == answer(local)[1]


def test_a_dying_worker_loses_nothing_finished_and_the_rerun_completes(tmp_path, monkeypatch):
    flag = tmp_path / "die"
    flag.write_text("once")
    monkeypatch.setenv("BITWIDTH_DIE_FLAG", str(flag))
    monkeypatch.setenv("BITWIDTH_DRIVER_PID", str(os.getpid()))
    task = make_task("dying_task:build_task")
    first = search(tmp_path, "run", make_executor("process", workers=2), task)
    assert not flag.exists()  # a worker did die
    stored = (tmp_path / "run" / "trials.jsonl").read_text().splitlines()
    rerun = search(tmp_path, "run", make_executor("process", workers=2), task)
    assert rerun.summary["counts"]["trials_run"] == 0  # every finished trial was kept
    assert (tmp_path / "run" / "trials.jsonl").read_text().splitlines() == stored
    pd.testing.assert_frame_equal(answer(rerun)[0], answer(first)[0])
    assert first.min_bits["min_bits"].notna().all()
