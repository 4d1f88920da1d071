"""Executors: same results everywhere, context once per worker, failures recorded, deaths survived."""

import contextlib
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

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


# ----------------------------------------------------------------------------- workers die with their driver

def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead, only not yet reaped
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("where, sig", [("main", signal.SIGKILL), ("main", signal.SIGTERM),
                                        ("thread", signal.SIGKILL)])
def test_workers_die_with_a_killed_driver(tmp_path, where, sig):
    tests_dir = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests_dir), os.environ.get("PYTHONPATH", "")])}
    driver = subprocess.Popen([sys.executable, "-c", f"import orphan_driver; orphan_driver.main({str(tmp_path)!r}, "
                               f"{where!r})"], env=env)
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while len(pids) < 2 and time.monotonic() < deadline and driver.poll() is None:
            time.sleep(0.05)
            pids = [int(p.stem) for p in tmp_path.glob("*.pid")]
        assert len(pids) == 2 and all(_running(p) for p in pids), "the workers did not start"
        driver.send_signal(sig)
        driver.wait(10)
        deadline = time.monotonic() + 5
        while any(_running(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [p for p in pids if _running(p)], "workers outlived their driver"
    finally:
        for p in [driver.pid, *pids]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        driver.wait()


# ----------------------------------------------------------------------------- ray stays on this machine

@pytest.mark.skipif(NO_RAY, reason="ray is not installed (pip install 'bitwidth[ray]')")
def test_local_ray_is_started_on_loopback_without_dashboard(monkeypatch):
    import ray
    import ray._private.ray_constants as constants

    from bitwidth.executors import start_local_ray

    seen = {}

    def fake_init(**kwargs):
        seen.update(kwargs, env=os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"),
                    cluster=constants.ENABLE_RAY_CLUSTER)

    before = constants.ENABLE_RAY_CLUSTER
    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
    monkeypatch.setattr(ray, "init", fake_init)
    start_local_ray(3)
    assert seen["_node_ip_address"] == "127.0.0.1" and seen["num_cpus"] == 3
    assert seen["include_dashboard"] is False and seen["dashboard_host"] == "127.0.0.1"
    # Ray turns a node address of 127.0.0.1 into the network one unless clusters are off while it starts.
    assert seen["env"] == "0" and seen["cluster"] is False
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ and constants.ENABLE_RAY_CLUSTER == before


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, rest = stat.read_text().split(" ", 1)
            children.setdefault(int(rest.rsplit(")", 1)[1].split()[1]), []).append(int(pid))
        except (OSError, ValueError, IndexError):
            continue
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo.extend(children.get(pid, []))
    return found


@pytest.mark.skipif(NO_RAY or shutil.which("ss") is None, reason="needs ray and ss (iproute2)")
def test_local_ray_listens_on_loopback_only(ray_local):
    ray = ray_local
    assert ray._private.worker._global_node.node_ip_address == "127.0.0.1"
    ours = _descendants(os.getpid())
    listening = []
    for flags in ("-ltnpH", "-lunpH"):
        for line in subprocess.run(["ss", flags], capture_output=True, text=True).stdout.splitlines():
            pids = {int(p) for p in re.findall(r"pid=(\d+)", line)}
            if pids & ours:
                listening.append(line.split()[3])  # Local Address:Port
    assert listening, "found no socket of the Ray processes"
    loopback = ("127.0.0.1:", "[::ffff:127.0.0.1]:", "[::1]:")
    assert [a for a in listening if not a.startswith(loopback)] == []
