"""The trial store: durable appends, truncated tails, keys that change with the config."""

from __future__ import annotations

import json

import pytest

from bitwidth.store import TrialStore, canonical_json, trial_key

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
    store.put("a", {"x": 1})
    store.put("b", {"x": 2})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 7])  # killed in the middle of writing "b"
    reopened = TrialStore(path)
    assert "a" in reopened and "b" not in reopened
    reopened.put("c", {"x": 3})  # the next append starts on a clean line
    final = TrialStore(path)
    assert final.keys() == ["a", "c"]
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_unreadable_middle_line_warns_and_is_skipped(tmp_path):
    path = tmp_path / "trials.jsonl"
    path.write_text('{"key": "a", "record": {}}\nnot json\n{"key": "b", "record": {}}\n')
    with pytest.warns(UserWarning, match="trials.jsonl:2"):
        store = TrialStore(path)
    assert store.keys() == ["a", "b"]


def test_later_line_with_same_key_wins(tmp_path):
    store = TrialStore(tmp_path / "t.jsonl")
    store.put("a", {"v": 1})
    store.put("a", {"v": 2})
    assert TrialStore(tmp_path / "t.jsonl").get("a") == {"v": 2}


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
    TrialStore(path).put("a", {"x": 1})
    with open(path, "a") as f:
        f.write('{"key": "b", "rec')  # a run is writing this line right now
    before = path.read_bytes()
    store = TrialStore(path, readonly=True)
    assert store.keys() == ["a"] and path.read_bytes() == before
    with pytest.raises(ValueError, match="read-only"):
        store.put("c", {})
