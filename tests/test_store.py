"""The trial store: durable appends, truncated tails, bad lines skipped, keys that change with the config."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bitwidth import store as store_module
from bitwidth.store import (
    LOCK_FILE,
    RunLock,
    RunLocked,
    TrialStore,
    atomic_file,
    atomic_write,
    canonical_json,
    trial_key,
)


def rec(x=0.5):
    """A minimal valid trial record."""
    return {"outcome": {"metrics": {"accuracy": x}}}

PARTS = dict(task={"name": "digits", "n_train": 1347}, mode="ptq", plan={"fc1": {"weight": {"type": "int", "bits": 4}}},
             seed=0, options={"epochs": 10, "lr": 0.05})


def test_put_get_persist_across_reopen(tmp_path):
    path = tmp_path / "trials.jsonl"
    store = TrialStore(path)
    assert len(store) == 0 and "k" not in store
    store.put("k1", {"outcome": {"metrics": {"accuracy": 0.9}}})
    store.put("k2", {"outcome": {"metrics": {"accuracy": float("nan")}}})
    again = TrialStore(path)
    assert "k1" in again and again.get("k1")["outcome"]["metrics"]["accuracy"] == 0.9
    assert [k for k, _ in again.records()] == ["k1", "k2"]
    assert again.get("missing") is None
    assert len(path.read_text().splitlines()) == 2


def test_truncated_last_line_is_ignored_and_repaired(tmp_path):
    path = tmp_path / "trials.jsonl"
    store = TrialStore(path)
    store.put("a", rec(1))
    store.put("b", rec(2))
    store.close()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 7])  # killed in the middle of writing "b"
    reopened = TrialStore(path)
    assert "a" in reopened and "b" not in reopened
    reopened.put("c", rec(3))  # the next append starts on a clean line
    final = TrialStore(path)
    assert final.keys() == ["a", "c"]
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_unreadable_middle_line_warns_and_is_skipped(tmp_path, caplog):
    path = tmp_path / "trials.jsonl"
    good = json.dumps(rec())
    path.write_text(f'{{"key": "a", "record": {good}}}\nnot json\n{{"key": "b", "record": {good}}}\n')
    with caplog.at_level(logging.WARNING, logger="bitwidth"):
        store = TrialStore(path)
    assert store.keys() == ["a", "b"]
    assert [r.name for r in caplog.records] == ["bitwidth.store"]
    assert f"{path}:2: not a valid trial record" in caplog.text


def test_later_line_with_same_key_wins(tmp_path):
    store = TrialStore(tmp_path / "t.jsonl")
    store.put("a", rec(1))
    store.put("a", rec(2))
    assert TrialStore(tmp_path / "t.jsonl").get("a") == rec(2)


def test_key_is_canonical_and_changes_with_every_part():
    key = trial_key(**PARTS)
    assert key == trial_key(**dict(reversed(list(PARTS.items()))))
    assert len(key) == 64
    changed = [
        {**PARTS, "mode": "train"},
        {**PARTS, "seed": 1},
        {**PARTS, "options": {"epochs": 11, "lr": 0.05}},
        {**PARTS, "task": {"name": "digits", "n_train": 1000}},
        {**PARTS, "plan": {"fc1": {"weight": {"type": "int", "bits": 5}}}},
        {**PARTS, "numerics": "0.0.0"},
    ]
    assert len({trial_key(**p) for p in changed} | {key}) == len(changed) + 1


def test_key_parts_must_be_json():
    assert canonical_json({"b": 1, "a": [1.5, None]}) == '{"a":[1.5,null],"b":1}'
    with pytest.raises(ValueError, match="JSON"):
        trial_key(plan=object())


def test_readonly_store_skips_a_cut_line_without_touching_the_file(tmp_path):
    path = tmp_path / "trials.jsonl"
    TrialStore(path).put("a", rec(1))
    with open(path, "a") as f:
        f.write('{"key": "b", "rec')  # a run is writing this line right now
    before = path.read_bytes()
    store = TrialStore(path, readonly=True)
    assert store.keys() == ["a"] and path.read_bytes() == before
    with pytest.raises(ValueError, match="read-only"):
        store.put("c", rec())


# ----------------------------------------------------------------------------- bad lines

KEY = "f" * 64
VALID = json.dumps({"key": KEY, "record": rec()})
BAD_LINES = {
    "no outcome": json.dumps({"key": KEY, "record": {"mode": "ptq", "seed": 0, "plan": {}}}),
    "bad json": "not json",
    "cut line": VALID[:40],
    "bad utf-8": b'{"key": "\xff\xfe", "record": {}}',
    "not an object": "[1, 2]",
    "a string": '"hello"',
    "no record": json.dumps({"key": KEY}),
    "int key": json.dumps({"key": 5, "record": rec()}),
    "list key": json.dumps({"key": ["a"], "record": rec()}),
    "record a list": json.dumps({"key": KEY, "record": [1]}),
    "outcome a string": json.dumps({"key": KEY, "record": {"outcome": "ok"}}),
    "metrics null": json.dumps({"key": KEY, "record": {"outcome": {"metrics": None}}}),
    "metric a string": json.dumps({"key": KEY, "record": {"outcome": {"metrics": {"accuracy": "0.9"}}}}),
    "metric a bool": json.dumps({"key": KEY, "record": {"outcome": {"metrics": {"accuracy": True}}}}),
    "diverged a string": json.dumps({"key": KEY, "record": {"outcome": {"metrics": {}, "diverged": "no"}}}),
    "curve of strings": json.dumps({"key": KEY, "record": {"outcome": {"metrics": {}, "loss_curve": ["x"]}}}),
    "seed a string": json.dumps({"key": KEY, "record": {"seed": "0", **rec()}}),
}


@pytest.mark.parametrize("bad", list(BAD_LINES.values()), ids=list(BAD_LINES))
def test_a_bad_line_is_skipped_with_a_warning_naming_file_and_line(tmp_path, caplog, bad):
    path = tmp_path / "trials.jsonl"
    bad = bad if isinstance(bad, bytes) else bad.encode()
    a, b = (json.dumps({"key": k, "record": rec()}).encode() for k in "ab")
    path.write_bytes(b"\n".join([a, b"", bad, b]) + b"\n")  # the bad line is line 3
    with caplog.at_level(logging.WARNING, logger="bitwidth"):
        store = TrialStore(path)
    assert store.keys() == ["a", "b"] and KEY not in store
    assert f"{path}:3: not a valid trial record, skipped" in caplog.text
    assert all(r.levelno == logging.WARNING and r.name == "bitwidth.store" for r in caplog.records)
    store.put(KEY, rec(0.7))  # the trial runs again and is stored after the bad line
    assert TrialStore(path).get(KEY) == rec(0.7)


def test_a_bad_later_line_does_not_replace_a_good_earlier_one(tmp_path, caplog):
    path = tmp_path / "trials.jsonl"
    path.write_text(VALID + "\n" + BAD_LINES["no outcome"] + "\n")
    assert TrialStore(path).get(KEY) == rec()


def test_cut_last_line_is_reported_when_repaired_but_not_by_readers(tmp_path, caplog):
    path = tmp_path / "trials.jsonl"
    path.write_text(VALID + "\n" + VALID[:30])
    with caplog.at_level(logging.WARNING, logger="bitwidth"):
        TrialStore(path, readonly=True)
    assert caplog.text == ""  # a run may be writing that line right now
    with caplog.at_level(logging.WARNING, logger="bitwidth"):
        TrialStore(path)
    assert f"{path}:2: cut-off last line" in caplog.text
    assert path.read_text() == VALID + "\n"


def test_put_refuses_a_record_it_could_not_read_back(tmp_path):
    store = TrialStore(tmp_path / "trials.jsonl")
    with pytest.raises(ValueError, match="no 'outcome'"):
        store.put(KEY, {"mode": "ptq"})
    with pytest.raises(ValueError, match="no string 'key'"):
        store.put("", rec())
    assert not (tmp_path / "trials.jsonl").exists()
    free = TrialStore(tmp_path / "other.jsonl", validate=None)  # any JSON object, for other uses
    free.put("k", {"x": 1})
    assert TrialStore(tmp_path / "other.jsonl", validate=None).get("k") == {"x": 1}


# ----------------------------------------------------------------------------- run lock

STORE_PY = Path(store_module.__file__)
# A holder process that loads store.py on its own (no torch: starts in milliseconds), takes the
# lock, optionally forks a child that keeps sleeping, and reports its pid(s).
HOLDER = """
import importlib.util, os, sys, time
spec = importlib.util.spec_from_file_location("store", sys.argv[1])
store = importlib.util.module_from_spec(spec); spec.loader.exec_module(store)
lock = store.RunLock(sys.argv[2]).acquire()
child = os.fork() if sys.argv[3] == "fork" else 0
if child == 0 and sys.argv[3] == "fork":  # the at-fork handlers have run once fork returns here
    print("child", flush=True)
    time.sleep(60); os._exit(0)
print(os.getpid(), child, flush=True)
time.sleep(60)
"""


@contextlib.contextmanager
def holder(run_dir, fork=False):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(STORE_PY), str(run_dir), "fork" if fork else "-"],
                            stdout=subprocess.PIPE, text=True)
    try:
        # The child's "child" may come first, or even inside the parent's line: the two share the pipe.
        text = " ".join(proc.stdout.readline() for _ in range(2 if fork else 1))
        pid, child = map(int, text.replace("child", " ").split())
        yield proc, child
    finally:
        for p in (proc.pid, locals().get("child") or 0):
            if p:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
        proc.wait()


def test_run_lock_is_exclusive_names_the_holder_and_dies_with_it(tmp_path):
    run_dir = tmp_path / "run"
    with holder(run_dir) as (proc, _):
        with pytest.raises(RunLocked) as caught:
            RunLock(run_dir).acquire()
        err = caught.value
        assert isinstance(err, ValueError) and err.pid == proc.pid and err.run_dir == run_dir
        assert str(run_dir) in str(err) and f"pid {proc.pid}" in str(err)
        with pytest.raises(RunLocked):
            TrialStore(run_dir / "trials.jsonl")  # a writable store takes the lock itself
        assert TrialStore(run_dir / "trials.jsonl", readonly=True).keys() == []  # readers take none
        proc.kill()  # SIGKILL: no cleanup runs, the kernel drops the lock
        proc.wait()
        with RunLock(run_dir) as lock:
            assert lock.held and (run_dir / LOCK_FILE).read_text() == f"{os.getpid()}\n"
        assert not lock.held


def test_run_lock_is_reentrant_in_one_process_and_shared_with_the_store(tmp_path):
    with RunLock(tmp_path) as outer:
        with RunLock(tmp_path):
            store = TrialStore(tmp_path / "trials.jsonl")
            store.put(KEY, rec())
            store.close()
        assert outer.held
        code = "import fcntl,os,sys; fd=os.open(sys.argv[1], os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX|fcntl.LOCK_NB)"
        probe = [sys.executable, "-c", code, str(tmp_path / LOCK_FILE)]
        assert subprocess.run(probe, capture_output=True).returncode != 0  # still held after inner releases
    assert subprocess.run(probe, capture_output=True).returncode == 0  # free after the last one


def test_a_forked_child_does_not_keep_the_lock_of_a_killed_parent(tmp_path):
    with holder(tmp_path, fork=True) as (proc, child):
        proc.kill()
        proc.wait()
        os.kill(child, 0)  # the forked child (like a pool worker) still runs ...
        with RunLock(tmp_path):  # ... but holds no lock
            pass


# ----------------------------------------------------------------------------- atomic writes

def test_atomic_write_replaces_whole_files_and_leaves_no_temp(tmp_path):
    path = tmp_path / "summary.yaml"
    atomic_write(path, "a: 1\n")
    atomic_write(path, b"a: 2\n")
    assert path.read_text() == "a: 2\n" and [p.name for p in tmp_path.iterdir()] == ["summary.yaml"]
    with pytest.raises(RuntimeError), atomic_file(path, "w", encoding="utf-8") as f:
        f.write("a: 3, half written")
        raise RuntimeError("killed")
    assert path.read_text() == "a: 2\n" and [p.name for p in tmp_path.iterdir()] == ["summary.yaml"]


def test_atomic_temp_names_are_unique_per_process_and_call(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (seen.append(Path(src)), real_replace(src, dst)))
    for _ in range(2):
        atomic_write(tmp_path / "x.csv", "1")
    assert len(set(seen)) == 2 and all(p.parent == tmp_path for p in seen)
    assert all(f".x.csv.{os.getpid()}." in p.name for p in seen)
