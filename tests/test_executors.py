"""Executors: same results everywhere, context once per worker, failures recorded, deaths survived."""

import importlib.util

import pytest
from executor_jobs import square_plus

from bitwidth.executors import LocalExecutor, ProcessExecutor, make_executor

CONTEXT = {"offset": 100, "payload": list(range(10000))}


def results(executor, items, context=CONTEXT):
    return {d.index: d for d in executor.map_unordered(square_plus, context, items)}


@pytest.fixture(scope="module")
def pool():
    with ProcessExecutor(workers=2) as ex:  # spawning workers costs seconds: share one pool
        yield ex


def test_process_pool_matches_local_and_ships_context_once_per_worker(pool):
    items = list(range(12))
    local = results(LocalExecutor(), items)
    first = results(pool, items)
    second = results(pool, items)  # a second round reuses the same workers
    assert {i: d.value[0] for i, d in first.items()} == {i: d.value[0] for i, d in local.items()}
    by_pid = {}
    for d in list(first.values()) + list(second.values()):
        by_pid.setdefault(d.value[1], set()).add(d.value[2])
    assert 1 <= len(by_pid) <= 2
    assert all(len(ids) == 1 for ids in by_pid.values())  # one unpickled context per worker


def test_raising_job_is_an_error_result_and_others_finish(pool):
    for ex in (LocalExecutor(), pool):
        out = results(ex, [1, "raise", 3])
        assert out[1].error and "trial blew up" in out[1].error and not out[1].lost
        assert out[0].value[0] == 101 and out[2].value[0] == 109


def test_dead_worker_loses_only_its_trials_and_the_next_round_works(pool):
    out = results(pool, [1, 2, "die", 4, 5])
    assert out[2].lost
    finished = {i for i, d in out.items() if d.value is not None}
    assert all(out[i].lost for i in set(out) - finished)
    rerun = results(pool, [1, 2, 4, 5])
    assert [rerun[i].value[0] for i in range(4)] == [101, 104, 116, 125]


def test_unknown_executor_names_allowed():
    with pytest.raises(ValueError, match="allowed: local, process, ray"):
        make_executor("threads")


NO_RAY = importlib.util.find_spec("ray") is None


@pytest.mark.skipif(NO_RAY, reason="ray is not installed (pip install 'bitwidth[ray]')")
def test_ray_matches_local_and_survives_a_dead_actor(ray_local):
    from bitwidth.executors import RayExecutor

    items = list(range(6))
    with RayExecutor(workers=2, address="local") as ex:
        out = results(ex, items)
        died = results(ex, [1, "die", 3])
        again = results(ex, [2, 3])
    assert {i: d.value[0] for i, d in out.items()} == {i: 100 + i * i for i in items}
    assert died[1].lost and died[0].value[0] == 101 and died[2].value[0] == 109
    assert [again[0].value[0], again[1].value[0]] == [104, 109]
