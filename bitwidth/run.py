"""One owner for a run: a config executed into its run directory, end to end.

``run_config`` takes the run directory's lock, writes the resolved config and ``run.log``,
records the baseline's statistics, runs the search (:func:`bitwidth.runner.run_search`),
writes ``meta.yaml`` and the report, and does so for every variant, then writes their
comparison. ``record_config_stats`` is ``bitwidth stats``. The command line only parses
arguments, calls these and maps exceptions to exit codes; a problem with the run
directory itself (not writable, in use by another run) is a :class:`RunDirectoryError`,
a ``ValueError``.

>>> from bitwidth.config import load_config
>>> cfg = load_config(None, ["search.strategy=grid"])
>>> cfg.search.strategy, RunDirectoryError.__mro__[1].__name__
('grid', 'ValueError')
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from . import __version__
from . import rundir as rd
from .config import Config, config_to_yaml, variant_configs

__all__ = ["RunDirectoryError", "RunOutcome", "close_logs", "make_config_task", "record_config_stats",
           "run_config", "trial_options"]

log = logging.getLogger("bitwidth")


class RunDirectoryError(ValueError):
    """The run directory cannot be used: not writable, a file, or in use by another run."""


@dataclass
class RunOutcome:
    """What a config run produced: per variant (``""`` without variants) its result and report paths."""

    results: dict[str, tuple[Any, dict[str, Path]]]
    comparison: dict[str, Path] | None = None


def make_config_task(cfg: Config) -> Any:
    """The config's task (:func:`bitwidth.tasks.make_task`)."""
    from .tasks import make_task

    return make_task(cfg.task.model, cfg.task.data, **cfg.task.options)


def trial_options(cfg: Config) -> Any:
    """The config's :class:`~bitwidth.trial.TrialOptions` (mode, first seed, ``train`` section)."""
    from .trial import TrialOptions

    return TrialOptions(mode=cfg.mode, seed=cfg.seeds[0], **cfg.train.model_dump())


def close_logs() -> None:
    """Detach and close the ``run.log`` handler, if any."""
    for h in list(log.handlers):
        if isinstance(h, logging.FileHandler):
            log.removeHandler(h)
            h.close()


def _log_to(run_dir: Path) -> None:
    """Send the log to ``run_dir/run.log`` (only there: one log file per run directory)."""
    close_logs()
    handler = logging.FileHandler(run_dir / rd.LOG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def _lock(run_dir: Path) -> Any:
    from .store import RunLock

    try:
        return RunLock(run_dir).acquire()
    except OSError as err:
        raise RunDirectoryError(f"cannot use {run_dir} as a run directory: {err.strerror or err}") from None


def _setup(cfg: Config, run_dir: Path, fresh: bool) -> None:
    try:
        if fresh and run_dir.exists():
            for name in (rd.TRIALS, rd.BASELINE):
                (run_dir / name).unlink(missing_ok=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / rd.CONFIG).write_text(config_to_yaml(cfg))
        _log_to(run_dir)
    except OSError as err:  # --out naming a file, a read-only directory: the user's to fix
        raise RunDirectoryError(f"cannot write the run directory {run_dir}: {err.strerror or err}") from None


def _record(cfg: Config, task: Any, run_dir: Path, out: Path, kinds: Sequence[str]) -> None:
    """Distributions of the trained baseline (first seed) into ``out``: stats.pt and stats.csv."""
    import torch

    from .stats import record
    from .trial import train_baseline

    options = trial_options(cfg)
    baseline = train_baseline(task, options, cache_dir=run_dir)
    model = task.build_model(options.seed)
    model.load_state_dict(baseline.state_dict)
    loss_fn = getattr(task, "loss_fn", torch.nn.functional.cross_entropy)
    with record(model, layers=cfg.search.layers, kinds=kinds, seed=options.seed) as rec:
        for x, y in task.calib_batches(cfg.stats.batches):
            model.zero_grad()
            loss_fn(model(x), y).backward()
    out.mkdir(parents=True, exist_ok=True)
    rec.save(out / rd.STATS)
    rec.to_frame().to_csv(out / rd.STATS_CSV, index=False)
    log.info("recorded statistics of %d (site, kind) pairs", len(rec.to_frame()))


def _meta(cfg: Config, run_dir: Path, wall: float, result: Any) -> None:
    import torch

    counts = result.summary.get("counts", {}) if result is not None else {}
    meta = {
        "bitwidth": __version__, "torch": str(torch.__version__), "python": platform.python_version(),
        "platform": platform.platform(), "device": cfg.train.device,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "threads": torch.get_num_threads(), "executor": cfg.executor.model_dump(), "seeds": cfg.seeds,
        "wall_time_s": round(wall, 2), "trials_run": counts.get("trials_run"),
        "trials_reused": counts.get("trials_reused"), "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    (run_dir / rd.META).write_text(yaml.safe_dump(meta, sort_keys=False))


def _run_one(cfg: Config, fresh: bool, progress: Callable[[Any], None] | None,
             source: str) -> tuple[Any, dict[str, Path]]:
    from .executors import make_executor
    from .report import write_report
    from .runner import run_search

    run_dir = cfg.run_dir
    with _lock(run_dir):
        _setup(cfg, run_dir, fresh)
        start = time.perf_counter()
        log.info("bitwidth %s: run %s (%s) into %s", __version__, source, cfg.run_name, run_dir)
        task = make_config_task(cfg)
        if cfg.mode == "adaptive":  # one training run under the precision controller, not a search
            from .adaptive_run import run_adaptive

            adaptive = run_adaptive(cfg, task, run_dir, fresh=fresh, progress=progress)
            _meta(cfg, run_dir, time.perf_counter() - start, None)
            paths = write_report(run_dir)
            log.info("done in %.1f s", time.perf_counter() - start)
            return adaptive, paths
        from .runner import select_layers  # the site patterns, checked before anything trains

        select_layers(task.build_model(cfg.seeds[0]), cfg.search.layers, task.example_input())
        if cfg.deploy.to:  # a missing extra fails now, not after the search
            from .export import check_target

            for target in cfg.deploy.to:
                check_target(target)
        if cfg.stats.enabled:
            if progress is not None:
                from .runner import ProgressEvent

                progress(ProgressEvent("statistics", 0, 0, "the fp32 baseline's distributions"))
            _record(cfg, task, run_dir, run_dir, cfg.stats.kinds or cfg.search.kinds)
        ex = cfg.executor
        with make_executor(ex.kind, workers=ex.workers, address=ex.address, threads=ex.threads) as executor:
            result = run_search(
                task, mode=cfg.mode, layers=cfg.search.layers, kinds=tuple(cfg.search.kinds),
                family=cfg.search.family, family_options=cfg.search.options, candidates=cfg.search.candidates,
                criterion=cfg.criterion.build(), strategy=cfg.search.strategy, trial_options=trial_options(cfg),
                seeds=cfg.seeds, run_dir=run_dir, executor=executor, progress=progress,
                early_stop=cfg.search.early_stop, early_stop_error=cfg.search.early_stop_error,
            )
        _meta(cfg, run_dir, time.perf_counter() - start, result)
        if cfg.deploy.to:  # the deployed metric beside the simulated one (what `bitwidth export` does)
            from .export import deploy_run

            for target in cfg.deploy.to:
                log.info("deploying the plans in %s", target)
                deploy_run(run_dir, to=target, repeats=cfg.deploy.repeats, report=False)
        paths = write_report(run_dir)
        log.info("done in %.1f s", time.perf_counter() - start)
    return result, paths


def run_config(cfg: Config, *, fresh: bool = False, progress: Callable[[Any], None] | None = None,
               source: str = "config", announce: Callable[[str], None] | None = None) -> RunOutcome:
    """Run ``cfg`` (each of its variants) into its run directory; resumes from stored trials.

    ``fresh`` drops the stored trials and baseline first. ``progress`` receives the
    search's :class:`~bitwidth.runner.ProgressEvent`; ``announce`` a line per variant.
    """
    if not cfg.variants:
        return RunOutcome({"": _run_one(cfg, fresh, progress, source)})
    from .report.compare import write_comparison

    results = {}
    for name, variant in variant_configs(cfg).items():
        if announce is not None:
            announce(f"== variant {name}: {variant.run_dir}")
        results[name] = _run_one(variant, fresh, progress, source)
    with _lock(cfg.run_dir):
        _setup(cfg, cfg.run_dir, fresh=False)
        comparison = write_comparison(cfg.run_dir, list(results))
    return RunOutcome(results, comparison)


def record_config_stats(cfg: Config) -> tuple[Path, dict[str, Path]]:
    """``bitwidth stats``: weight, activation and gradient statistics of the baseline, with a report,
    into ``RUN_DIR/stats/`` (its own files: the run's report and statistics stay as they are)."""
    from .report import write_report

    run_dir = cfg.run_dir
    with _lock(run_dir):
        _setup(cfg, run_dir, fresh=False)
        out = run_dir / rd.STATS_DIR
        _record(cfg, make_config_task(cfg), run_dir, out, ("weight", "activation", "gradient"))
        return out / rd.STATS_CSV, write_report(out)
