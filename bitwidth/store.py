"""Append-only trial store: one JSON line per finished trial, keyed by what determined it.

Rerunning a search into the same run directory looks every trial up here first, so a
run killed at any moment continues where it stopped. Each line is written whole and
flushed to the kernel the moment its trial finishes, so a killed process loses nothing
stored; :meth:`TrialStore.sync` (the runner calls it after every round) and ``close``
fsync it to the disk, so a power cut loses at most the round in flight. A last line cut
short by a kill is dropped on open.
Keys hash the whole trial definition, so a changed config never reuses a trial
that no longer matches: it simply finds no record under the new key.

A line that is not a valid trial record (bad JSON, wrong types, a record without its
``outcome``) is skipped with a warning on the ``bitwidth.store`` logger naming the file
and the line (the CLI writes it to ``run.log``): that trial simply runs again.

One run at a time may write a run directory: :class:`RunLock` takes an exclusive lock
on ``<run dir>/run.lock`` (the kernel drops it when the holder dies, however it dies),
and a writable :class:`TrialStore` holds it while it is open. Other files of a run are
written whole or not at all with :func:`atomic_write` / :func:`atomic_file`.

>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "trials.jsonl"
>>> store = TrialStore(path)
>>> key = trial_key(task={"model": "m"}, mode="ptq", plan={}, seed=0)
>>> store.put(key, {"outcome": {"metrics": {"accuracy": 0.9}}})
>>> key in TrialStore(path), TrialStore(path).get(key)["outcome"]["metrics"]
(True, {'accuracy': 0.9})
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there are not protected against a second writer
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_FILE", "RunLock", "RunLocked", "TrialStore", "atomic_file", "atomic_write", "canonical_json",
           "numerics_version", "trial_key", "trial_record_problem"]

LOCK_FILE = "run.lock"  # bitwidth.rundir.LOCK; this module imports nothing of the package

log = logging.getLogger("bitwidth.store")  # a child of "bitwidth": the CLI's run.log handler gets it


def numerics_version() -> str:
    """The package version: a new release may change the numbers, so trials are not reused across it."""
    from ._version import __version__  # a leaf, imported when needed: this file also loads on its own

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


# ----------------------------------------------------------------------------- record checks

def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_numbers(value: Any) -> bool:
    return isinstance(value, list) and all(_is_number(v) for v in value)


_OUTCOME_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "loss_curve": (_is_numbers, "a list of numbers"),
    "val_curve": (_is_numbers, "a list of numbers"),
    "diverged": (lambda v: isinstance(v, bool), "true or false"),
    "wall_time": (_is_number, "a number"),
    "error": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "samples": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)), "an integer or null"),
    "early_stop": (lambda v: v is None or isinstance(v, dict), "an object or null"),
}
_RECORD_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "mode": (lambda v: isinstance(v, str), "a string"),
    "seed": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "plan": (lambda v: isinstance(v, dict), "an object"),
}


def trial_record_problem(record: Any) -> str | None:
    """Why ``record`` is not a trial record the runner and the report can use, or None.

    A trial record is ``{"outcome": {"metrics": {name: number}, ...}}`` plus, as the
    runner writes it, ``mode``, ``seed`` and ``plan``; the fields it has must have their types.

    >>> trial_record_problem({"outcome": {"metrics": {"accuracy": 0.5}, "diverged": False}, "seed": 0})
    >>> trial_record_problem({"seed": 0})
    "no 'outcome'"
    >>> trial_record_problem({"outcome": {"metrics": {"accuracy": "high"}}})
    "'outcome.metrics.accuracy' is not a number"
    """
    if not isinstance(record, dict):
        return f"the record is {type(record).__name__}, not an object"
    for name, (ok, what) in _RECORD_FIELDS.items():
        if name in record and not ok(record[name]):
            return f"'{name}' is not {what}"
    if "outcome" not in record:
        return "no 'outcome'"
    outcome = record["outcome"]
    if not isinstance(outcome, dict):
        return "'outcome' is not an object"
    metrics = outcome.get("metrics")
    if not isinstance(metrics, dict):
        return "'outcome.metrics' is missing or not an object"
    for name, value in metrics.items():
        if not _is_number(value):
            return f"'outcome.metrics.{name}' is not a number"
    for name, (ok, what) in _OUTCOME_FIELDS.items():
        if name in outcome and not ok(outcome[name]):
            return f"'outcome.{name}' is not {what}"
    return None


def _entry_problem(entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return "not a JSON object"
    if not isinstance(entry.get("key"), str) or not entry["key"]:
        return "no string 'key'"
    if "record" not in entry:
        return "no 'record'"
    return None


# ----------------------------------------------------------------------------- atomic files

def _temp_path(path: Path) -> Path:
    """A temp name beside ``path``, unique to this process and call (pid and random bits)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not possible everywhere (Windows); the rename itself is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], mode: str = "wb", encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open a temp file beside ``path`` for writing; on success it replaces ``path`` in one step.

    Readers see the old file or the new one, never a part; an exception (or a kill)
    leaves ``path`` as it was and removes (or leaves behind, on a kill) only the temp
    file, whose name holds this process's pid and random bits, so two processes never
    write the same temp file. Use it for every run file except the append-only
    ``trials.jsonl``: ``with atomic_file(p, "w", encoding="utf-8") as f: yaml.safe_dump(x, f)``,
    ``with atomic_file(p) as f: torch.save(obj, f)``.
    """
    if mode not in ("w", "wb", "wt"):
        raise ValueError(f"atomic_file writes a whole new file: mode must be 'w' or 'wb', got {mode!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(target)
    f = open(tmp, "x" + mode[1:], encoding=encoding if "b" not in mode else None)  # noqa: SIM115
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)


def atomic_write(path: str | os.PathLike[str], data: bytes | str, *, encoding: str = "utf-8") -> None:
    """Write ``data`` (bytes, or text in ``encoding``) to ``path`` atomically (see :func:`atomic_file`).

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "summary.yaml"
    >>> atomic_write(p, "a: 1\\n"); p.read_text(), [f.name for f in p.parent.iterdir()]
    ('a: 1\\n', ['summary.yaml'])
    """
    with atomic_file(path, "wb") as f:
        f.write(data.encode(encoding) if isinstance(data, str) else data)


# ----------------------------------------------------------------------------- run lock

class RunLocked(ValueError):
    """The run directory is locked by another live process (``pid``, None when unknown).

    A ``ValueError``, so the CLI reports it as a usage problem (exit code 2).
    """

    def __init__(self, run_dir: str | os.PathLike[str], pid: int | None) -> None:
        self.run_dir = Path(run_dir)
        self.pid = pid
        holder = f"pid {pid}" if pid is not None else "a process whose pid it has not yet written"
        super().__init__(
            f"run directory {self.run_dir} is in use by another bitwidth run ({holder}, lock file "
            f"{self.run_dir / LOCK_FILE}); wait for it to finish or stop it, or choose another run directory"
        )


class RunLock:
    """An exclusive lock on a run directory: one run writes it at a time.

    ``with RunLock(run_dir): ...`` (or :meth:`acquire` / :meth:`release`) takes an
    ``fcntl.flock`` on ``run_dir/run.lock`` without waiting and writes this process's pid
    into it; if another process holds it, :class:`RunLocked` names the directory and
    that pid. The kernel releases the lock when the holding process dies, even by
    SIGKILL, so a killed run never leaves a stale lock (the file stays; it is never
    deleted, since deleting a lock file lets two processes lock two different files).

    Within one process the lock is re-entrant: a :class:`TrialStore` opened inside a
    ``with RunLock(run_dir)`` shares it. Process-pool workers forked from a holder do
    not keep it. On systems without ``fcntl`` (Windows) it does nothing.
    """

    _held: dict[str, list[int]] = {}  # real path of the run dir -> [fd, count], in this process
    _guard = threading.Lock()

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self._key: str | None = None

    @property
    def path(self) -> Path:
        return self.run_dir / LOCK_FILE

    @property
    def held(self) -> bool:
        """Whether this object holds (a share of) the lock."""
        return self._key is not None

    def acquire(self) -> RunLock:
        """Take the lock, or raise :class:`RunLocked`; a second call on the same object does nothing."""
        if self._key is not None or fcntl is None:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(self.run_dir)
        with RunLock._guard:
            entry = RunLock._held.get(key)
            if entry is not None:
                entry[1] += 1
            else:
                RunLock._held[key] = [self._lock_file(), 1]
        self._key = key
        return self

    def _lock_file(self) -> int:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                os.close(fd)
                raise RunLocked(self.run_dir, pid) from None
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the file was deleted or replaced between open and flock: lock the new one
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd

    def release(self) -> None:
        """Give up this object's share; the lock goes when the last share in this process goes."""
        key, self._key = self._key, None
        if key is None:
            return
        with RunLock._guard:
            entry = RunLock._held.get(key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] > 0:
                return
            del RunLock._held[key]
            fd = entry[0]
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # no pid left behind for a reader to blame
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release()

    @classmethod
    def _forget_in_child(cls) -> None:
        # A forked child (a process-pool worker) shares the parent's lock only through
        # copies of its descriptors: close the copies (which keeps the parent's lock) so
        # the lock dies with the parent, and forget them so the child never unlocks it.
        cls._guard = threading.Lock()
        for fd, _count in cls._held.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        cls._held = {}


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=RunLock._forget_in_child)


# ----------------------------------------------------------------------------- the store

class TrialStore:
    """``trials.jsonl`` as a dict from key to record that only ever grows.

    Lines are ``{"key": ..., "record": {...}}``. A later line with the same key wins.
    Records are trial records (see :func:`trial_record_problem`); ``validate=None``
    stores any JSON object. A writable store holds the :class:`RunLock` of its directory
    from opening until :meth:`close` (or until it is garbage collected), so two
    processes never write one store; opening one another process holds raises
    :class:`RunLocked`. A read-only store takes no lock and never changes the file.
    """

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False, lock: bool = True,
                 validate: Callable[[Any], str | None] | None = trial_record_problem) -> None:
        self.path = Path(path)
        self.readonly = readonly  # readers (the report) never touch a file a run may be writing
        self.validate = validate
        self._records: dict[str, dict[str, Any]] = {}
        self._unsynced = False
        self._lock = RunLock(self.path.parent) if lock and not readonly else None
        if self._lock is not None:
            self._lock.acquire()  # before reading: a repair of the last line must not race a writer
        self._load()

    def close(self) -> None:
        """Make the stored lines durable and release the run lock (a writable store); the records stay readable."""
        self.sync()
        if self._lock is not None:
            self._lock.release()

    def sync(self) -> None:
        """fsync the lines written since the last sync (a no-op when there are none)."""
        if not self._unsynced:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            os.fsync(f.fileno())
        self._unsynced = False

    def __enter__(self) -> TrialStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _problem(self, entry: Any) -> str | None:
        problem = _entry_problem(entry)
        if problem is None and self.validate is not None:
            problem = self.validate(entry["record"])
        return problem

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data) and not self.readonly:
            # A kill during a write leaves a partial last line: that trial was in flight,
            # so drop it here and cut it from the file, or the next append would join it.
            log.warning("%s:%d: cut-off last line (a trial in flight when the run stopped) removed; "
                        "that trial will run again", self.path, data[:end].count(b"\n") + 1)
            with open(self.path, "r+b") as f:
                f.truncate(end)
                os.fsync(f.fileno())
        # split, not splitlines: the numbers must be the file's line numbers.
        for number, line in enumerate(data[:end].split(b"\n"), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError as err:  # bad JSON or bad UTF-8
                problem: str | None = f"not valid JSON ({err})"
            else:
                problem = self._problem(entry)
            if problem is not None:
                log.warning("%s:%d: not a valid trial record, skipped (%s); that trial will run again",
                            self.path, number, problem)
                continue
            self._records[entry["key"]] = entry["record"]

    def __contains__(self, key: object) -> bool:
        return key in self._records

    def __len__(self) -> int:
        return len(self._records)

    def get(self, key: str, default: Any = None) -> dict[str, Any] | Any:
        """The record stored under ``key``, or ``default``."""
        return self._records.get(key, default)

    def put(self, key: str, record: dict[str, Any]) -> None:
        """Append ``record`` under ``key`` in one write, flushed to the kernel before returning
        (a killed process loses nothing; :meth:`sync` makes it survive a power cut too).

        A record the store would skip when reading it back is refused with ``ValueError``.
        """
        if self.readonly:
            raise ValueError(f"{self.path} is open read-only")
        problem = self._problem({"key": key, "record": record})
        if problem is not None:
            raise ValueError(f"not a valid trial record for {self.path}: {problem}")
        line = json.dumps({"key": key, "record": record}, separators=(",", ":"), allow_nan=True) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One write of one whole line: a kill can only ever cut the last line.
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
        self._unsynced = True
        self._records[key] = record

    def keys(self) -> list[str]:
        return list(self._records)

    def records(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """``(key, record)`` pairs in the order they were first stored."""
        return iter(list(self._records.items()))
