"""Append-only trial store: one JSON line per finished trial, keyed by what determined it.

Rerunning a search into the same run directory looks every trial up here first, so a
run killed at any moment continues where it stopped. Each line is flushed and fsynced
before the next trial starts; a last line cut short by a kill is dropped on open.
Keys hash the whole trial definition, so a changed config never reuses a trial
that no longer matches: it simply finds no record under the new key.

>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "trials.jsonl"
>>> store = TrialStore(path)
>>> key = trial_key(task={"model": "m"}, mode="ptq", plan={}, seed=0)
>>> store.put(key, {"metrics": {"accuracy": 0.9}})
>>> key in TrialStore(path), TrialStore(path).get(key)["metrics"]
(True, {'accuracy': 0.9})
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["TrialStore", "canonical_json", "numerics_version", "trial_key"]


def numerics_version() -> str:
    """The package version: a new release may change the numbers, so trials are not reused across it."""
    from . import __version__  # at call time: importing the package may still be under way

    return __version__


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: equal content gives equal text.

    >>> canonical_json({"b": (1, 2), "a": None})
    '{"a":null,"b":[1,2]}'
    """
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=True)
    except TypeError as err:
        raise ValueError(f"trial key parts must be JSON data (dicts, lists, numbers, strings): {err}") from None


def trial_key(**parts: Any) -> str:
    """sha256 of the canonical JSON of ``parts`` plus the numerics version (``numerics``).

    Pass everything that determines a trial: task fingerprint, mode, plan (as dicts),
    seed and trial options. The package version is added unless given, because a
    change in the numerics changes every outcome.

    >>> trial_key(mode="ptq", seed=0) == trial_key(seed=0, mode="ptq")
    True
    >>> trial_key(mode="ptq", seed=0) == trial_key(mode="ptq", seed=1)
    False
    """
    parts.setdefault("numerics", numerics_version())
    return hashlib.sha256(canonical_json(parts).encode()).hexdigest()


class TrialStore:
    """``trials.jsonl`` as a dict from key to record that only ever grows.

    Lines are ``{"key": ..., "record": {...}}``. A later line with the same key wins.
    """

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly  # readers (the report) never touch a file a run may be writing
        self._records: dict[str, dict[str, Any]] = {}
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data) and not self.readonly:
            # A kill during a write leaves a partial last line: that trial was in flight,
            # so drop it here and cut it from the file, or the next append would join it.
            with open(self.path, "r+b") as f:
                f.truncate(end)
                os.fsync(f.fileno())
        for number, line in enumerate(data[:end].splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                self._records[entry["key"]] = entry["record"]
            except (ValueError, KeyError, TypeError):
                warnings.warn(f"{self.path}:{number}: unreadable trial record skipped", stacklevel=3)

    def __contains__(self, key: object) -> bool:
        return key in self._records

    def __len__(self) -> int:
        return len(self._records)

    def get(self, key: str, default: Any = None) -> dict[str, Any] | Any:
        """The record stored under ``key``, or ``default``."""
        return self._records.get(key, default)

    def put(self, key: str, record: dict[str, Any]) -> None:
        """Append ``record`` under ``key`` and make it durable before returning."""
        if self.readonly:
            raise ValueError(f"{self.path} is open read-only")
        line = json.dumps({"key": key, "record": record}, separators=(",", ":"), allow_nan=True) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One write of one whole line, then fsync: a kill can only ever cut the last line.
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self._records[key] = record

    def keys(self) -> list[str]:
        return list(self._records)

    def records(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """``(key, record)`` pairs in the order they were first stored."""
        return iter(list(self._records.items()))
