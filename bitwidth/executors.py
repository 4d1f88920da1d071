"""Where trials run: in this process, in a local process pool, or on a Ray cluster.

The search hands an executor a job function, a context (task, baseline, options: the
heavy part, identical for every trial) and a round of items (plans). The context reaches
each worker once, not once per trial: pool initializer locally, actors on Ray. Results
come back as they finish; only the caller writes them to the trial store.

>>> ex = make_executor("local")
>>> sorted((d.index, d.value) for d in ex.map_unordered(lambda ctx, item: ctx + item, 10, [1, 2]))
[(0, 11), (1, 12)]
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import multiprocessing as mp
import os
import pickle
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

__all__ = ["Done", "Executor", "LocalExecutor", "ProcessExecutor", "RayExecutor", "make_executor", "start_local_ray",
           "local_ray_init_kwargs", "EXECUTORS"]

EXECUTORS = ("local", "process", "ray")


@dataclass
class Done:
    """One finished item: its ``value``, or the ``error`` text when the job raised.

    ``lost`` marks an item whose worker died (killed, out of memory, node gone): it is
    not a result, so it must not be stored; a rerun tries it again.
    """

    index: int
    value: Any = None
    error: str | None = None
    lost: bool = False


def _call(fn: Callable[[Any, Any], Any], context: Any, index: int, item: Any) -> Done:
    try:
        return Done(index, fn(context, item))
    except Exception:  # a failing trial is a result to record, not a reason to stop
        return Done(index, error=traceback.format_exc(limit=8))


class Executor:
    """Runs ``fn(context, item)`` for each item and yields :class:`Done` as they finish."""

    workers: int = 1

    def map_unordered(self, fn: Callable[[Any, Any], Any], context: Any, items: Iterable[Any]) -> Iterator[Done]:
        raise NotImplementedError

    def close(self) -> None:
        """Release workers; the executor can be used again afterwards."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalExecutor(Executor):
    """Serial, in this process: the default, and the reference the others must match.

    ``threads`` sets torch's intra-op threads while trials run (None: leave as is); small
    models train faster on one thread than on several.
    """

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads

    def map_unordered(self, fn, context, items):
        import torch

        before = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            for i, item in enumerate(items):
                yield _call(fn, context, i, item)
        finally:
            torch.set_num_threads(before)


# ----------------------------------------------------------------------------- process pool

_WORKER: dict[str, Any] = {}

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_WATCH_INTERVAL_S = 0.5


def _die_with_parent(parent: int, kernel: bool) -> None:
    """Make this worker exit when the driver ``parent`` dies, however it dies (SIGKILL too).

    A killed driver runs no cleanup, so nothing would stop its workers: they would live
    on, reparented to init, holding their memory. Two guards: on Linux, when ``kernel``,
    ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` has the kernel kill the worker the moment its
    parent goes (it fires when the parent *thread* that forked it ends, so the driver
    asks for it only when that is its main thread); and everywhere a daemon thread
    that exits the worker within half a second of its parent pid changing.
    """
    if kernel and sys.platform.startswith("linux"):
        try:
            import ctypes
            import signal

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # no prctl here: the watchdog still works
            pass
    if os.getppid() != parent:  # the driver died before the guards were up
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(_WATCH_INTERVAL_S)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="bitwidth-parent-watchdog", daemon=True).start()


def _init_worker(context_bytes: bytes, threads: int, slots: Any, gpus: int, parent: int = 0,
                 kernel_guard: bool = False) -> None:
    if parent:
        _die_with_parent(parent, kernel_guard)
    import torch

    if gpus:
        # One GPU per worker, round robin, before CUDA is initialised in this process.
        os.environ["CUDA_VISIBLE_DEVICES"] = str(slots.get() % gpus)
    torch.set_num_threads(threads)
    _WORKER["context"] = pickle.loads(context_bytes)


def _run_in_worker(fn: Callable[[Any, Any], Any], index: int, item: Any) -> Done:
    return _call(fn, _WORKER["context"], index, item)


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


class ProcessExecutor(Executor):
    """A pool of ``workers`` processes (default: one per core), kept across rounds.

    Each worker limits torch to ``threads`` intra-op threads, so N workers use N cores
    without oversubscription. The context is pickled once per worker by the initializer.
    Workers die with this process, even when it is killed (see :func:`_die_with_parent`).
    """

    def __init__(self, workers: int | None = None, threads: int = 1, gpus: int | None = None) -> None:
        self.workers = workers or os.cpu_count() or 1
        self.threads = threads
        self.gpus = _gpu_count() if gpus is None else gpus
        self._pool: ProcessPoolExecutor | None = None
        self._context_id: int | None = None

    def _ensure_pool(self, context: Any) -> ProcessPoolExecutor:
        if self._pool is not None and self._context_id == id(context):
            return self._pool
        self.close()
        ctx = mp.get_context(self.start_method())
        slots = ctx.SimpleQueue()
        for i in range(self.workers):
            slots.put(i)
        self._pool = ProcessPoolExecutor(
            self.workers, mp_context=ctx, initializer=_init_worker,
            # The pool forks its workers from the thread that submits (this one): the kernel's
            # parent-death signal is safe only when that thread lives as long as the process.
            initargs=(pickle.dumps(context), self.threads, slots, self.gpus, os.getpid(),
                      threading.current_thread() is threading.main_thread()),
        )
        self._context_id = id(context)
        return self._pool

    def start_method(self) -> str:
        """``fork`` where it is safe, else ``spawn``.

        A forked worker inherits the imports and warm state of this process (torch, the
        model code), so it starts in milliseconds instead of seconds. That is safe for
        one-threaded workers while CUDA is not initialised here: OpenMP and CUDA state
        do not survive a fork, which is why torch's own DataLoader workers run one thread.
        """
        import torch

        forkable = "fork" in mp.get_all_start_methods() and sys.platform.startswith("linux")
        return "fork" if forkable and self.threads == 1 and not torch.cuda.is_initialized() else "spawn"

    def map_unordered(self, fn, context, items):
        pool = self._ensure_pool(context)
        futures: dict[Future, int] = {}
        broken = False
        for i, item in enumerate(items):
            try:
                futures[pool.submit(_run_in_worker, fn, i, item)] = i
            except BrokenProcessPool:  # a worker died while the round was still being submitted
                broken = True
                yield Done(i, error="worker process died", lost=True)
        while futures:
            finished, _ = wait(futures, return_when=FIRST_COMPLETED)
            for fut in finished:
                index = futures.pop(fut)
                try:
                    yield fut.result()
                except BrokenProcessPool:
                    broken = True
                    yield Done(index, error="worker process died", lost=True)
        if broken:
            self.close()  # a dead worker breaks the whole pool: start a fresh one next round

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool, self._context_id = None, None


# ----------------------------------------------------------------------------- ray


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ValueError(
            "executor 'ray' needs Ray: pip install 'bitwidth[ray]' (or pip install ray)"
        ) from None
    return ray


class RayExecutor(Executor):
    """Trials on Ray actors: one actor per worker holds the context, fetched once.

    ``address``: ``"local"`` starts a private Ray instance on this machine, ``"auto"``
    joins the cluster this machine belongs to, ``"ray://host:10001"`` connects a client.
    ``gpus_per_trial`` defaults to 1 when the cluster has GPUs (one trial per GPU).
    """

    def __init__(self, workers: int | None = None, address: str = "local", threads: int = 1,
                 gpus_per_trial: float | None = None) -> None:
        self.ray = _import_ray()
        self.address = address
        self.threads = threads
        self._workers = workers
        self.gpus_per_trial = gpus_per_trial
        self._actors: list[Any] = []
        self._context_id: int | None = None
        self._started_here = False

    @property
    def workers(self) -> int:  # type: ignore[override]
        if self._workers:
            return self._workers
        self._init_ray()
        return max(1, int(self.ray.cluster_resources().get("CPU", 1)))

    def _init_ray(self) -> None:
        ray = self.ray
        if ray.is_initialized():
            return
        if self.address == "local":
            start_local_ray(self._workers or os.cpu_count() or 1)
        else:
            ray.init(address=self.address, log_to_driver=False, configure_logging=False)
        self._started_here = True

    def _new_actor(self, context_ref: Any) -> Any:
        gpus = self.gpus_per_trial
        if gpus is None:
            gpus = 1 if self.ray.cluster_resources().get("GPU", 0) else 0
        return _ray_worker_class(self.ray).options(num_cpus=self.threads, num_gpus=gpus).remote(
            context_ref, self.threads
        )

    def _ensure_actors(self, context: Any) -> None:
        if self._actors and self._context_id == id(context):
            return
        self._init_ray()
        self._kill_actors()
        self._context_ref = self.ray.put(context)  # into the object store once
        self._actors = [self._new_actor(self._context_ref) for _ in range(self.workers)]
        self._context_id = id(context)

    def map_unordered(self, fn, context, items):
        ray = self.ray
        self._ensure_actors(context)
        pending = list(enumerate(items))[::-1]
        idle = list(self._actors)
        running: dict[Any, tuple[int, Any]] = {}
        while pending or running:
            while pending and idle:
                index, item = pending.pop()
                actor = idle.pop()
                running[actor.run.remote(fn, index, item)] = (index, actor)
            ready, _ = ray.wait(list(running), num_returns=1)
            index, actor = running.pop(ready[0])
            try:
                yield ray.get(ready[0])
                idle.append(actor)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                    ray.exceptions.NodeDiedError) as err:
                yield Done(index, error=f"ray worker lost: {type(err).__name__}", lost=True)
                fresh = self._new_actor(self._context_ref)
                self._actors = [fresh if a is actor else a for a in self._actors]
                idle.append(fresh)

    def _kill_actors(self) -> None:
        for actor in self._actors:
            self.ray.kill(actor)
        self._actors, self._context_id = [], None

    def close(self) -> None:
        if self.ray.is_initialized():
            self._kill_actors()
            if self._started_here:
                self.ray.shutdown()
                self._started_here = False


LOOPBACK = "127.0.0.1"


def local_ray_init_kwargs(num_cpus: int) -> dict[str, Any]:
    """The ``ray.init`` arguments of :func:`start_local_ray`: a private instance reachable only from here.

    >>> kw = local_ray_init_kwargs(2)
    >>> kw["_node_ip_address"], kw["include_dashboard"], kw["dashboard_host"]
    ('127.0.0.1', False, '127.0.0.1')
    """
    return {
        "num_cpus": num_cpus,
        # Every server of the instance (GCS, raylet, object manager, workers, agents) binds
        # to the node address; the loopback one keeps them off the network.
        "_node_ip_address": LOOPBACK,
        "include_dashboard": False,
        "dashboard_host": LOOPBACK,  # in case a Ray version starts it anyway
        "log_to_driver": False,
        "configure_logging": False,
        # Its workers see this process's import path, so user task modules import there too.
        "runtime_env": {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}},
    }


@contextlib.contextmanager
def _ray_loopback_only() -> Iterator[None]:
    """Let Ray keep the loopback node address while it starts an instance.

    ``ray.init`` replaces a node address of 127.0.0.1 by this machine's network address
    (so other nodes could join), and its servers then listen on every interface, unless
    "clusters" are disabled: the switch Ray itself uses on macOS and Windows
    (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read into ``ray_constants.ENABLE_RAY_CLUSTER``).
    It is set only while this instance starts (its processes inherit it), then restored,
    so a later ``ray.init(address=...)`` in this process joins clusters as usual.
    """
    name = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
    before_env = os.environ.get(name)
    try:
        constants: Any = importlib.import_module("ray._private.ray_constants")
    except ImportError:  # another layout: the environment variable alone must do
        constants = None
    before_const = getattr(constants, "ENABLE_RAY_CLUSTER", None)
    os.environ[name] = "0"
    if before_const is not None:
        constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if before_env is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before_env
        if before_const is not None:
            constants.ENABLE_RAY_CLUSTER = before_const


def start_local_ray(num_cpus: int) -> Any:
    """Start a private Ray instance on this machine; returns the ``ray`` module.

    It listens on 127.0.0.1 only, with no dashboard: nothing of it is reachable from
    the network. Its workers see this process's import path, so user task modules
    import there too. To use a cluster instead, give :class:`RayExecutor` an address.
    """
    ray = _import_ray()
    with _ray_loopback_only():
        ray.init(**local_ray_init_kwargs(num_cpus))
    try:
        node_ip = ray._private.worker._global_node.node_ip_address
    except AttributeError:  # another Ray layout: nothing to check against
        node_ip = LOOPBACK
    if node_ip != LOOPBACK:
        logging.getLogger("bitwidth.executors").warning(
            "this Ray version put the local instance on %s, not %s: it may be reachable from the network",
            node_ip, LOOPBACK)
    return ray


_RAY_WORKER: list[Any] = []


def _ray_worker_class(ray: Any) -> Any:
    """The actor class, defined once Ray is imported (Ray stays an optional dependency)."""
    if not _RAY_WORKER:

        @ray.remote
        class TrialWorker:
            def __init__(self, context: Any, threads: int) -> None:
                import torch

                torch.set_num_threads(threads)
                self.context = context

            def run(self, fn: Callable[[Any, Any], Any], index: int, item: Any) -> Done:
                return _call(fn, self.context, index, item)

        _RAY_WORKER.append(TrialWorker)
    return _RAY_WORKER[0]


def make_executor(kind: str = "local", *, workers: int | None = None, address: str = "local",
                  threads: int | None = None) -> Executor:
    """An executor by name: ``local`` (serial), ``process`` (local cores) or ``ray``.

    >>> make_executor("process", workers=2).workers
    2
    """
    if kind == "local":
        return LocalExecutor(threads)
    if kind == "process":
        return ProcessExecutor(workers, threads=threads or 1)
    if kind == "ray":
        return RayExecutor(workers, address=address, threads=threads or 1)
    raise ValueError(f"unknown executor {kind!r}; allowed: {', '.join(EXECUTORS)}")
