"""The ``bitwidth`` command line: run, validate, report, stats, formats, export.

Exit codes: 0 done; 2 bad usage or config (one clear message, no traceback); 1 a
failure at run time (message plus the log's path); 130 interrupted (the run resumes
from its trial store when started again).

>>> main(["formats", "--names", "int4", "e4m3"])  # doctest: +NORMALIZE_WHITESPACE
name  bits  type   max          smallest step
int4     4  int    7 x scale    1 x scale
e4m3     8  float  448          0.00195312
0
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from . import rundir as rd
from .config import ConfigError, load_config
from .run import close_logs, make_config_task

__all__ = ["main"]

log = logging.getLogger("bitwidth")

EXAMPLE_FORMATS = ["int2", "int4", "int8", "uint8", "int16", "fixed8_4", "fixed16_8", "fixed16_12",
                   "e2m1", "e2m3", "e3m2", "e3m4", "e4m3", "e5m2", "fp16", "bf16",
                   "int4_g128", "int8_g32", "mxfp4", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp8_e4m3", "mxfp8_e5m2",
                   "mxint8", "nvfp4"]


class UsageError(Exception):
    """Bad input found after parsing: exit code 2 with this message."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bitwidth", description="How few bits can each layer use?")
    p.add_argument("--version", action="version", version=f"bitwidth {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def config_cmd(name: str, help_: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help_, description=help_)
        c.add_argument("config", help="experiment config (YAML)")
        c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set search.strategy=grid (repeatable)")
        c.add_argument("--out", help="run directory (default: the config's `out`, else runs/<name>)")
        c.add_argument("--quiet", action="store_true", help="no progress bars")
        return c

    run = config_cmd("run", "run an experiment config into a run directory (resumes by default)")
    run.add_argument("--fresh", action="store_true", help="discard stored trials and the baseline first")
    config_cmd("stats", "record weight/activation/gradient distributions of the baseline, with plots")
    val = sub.add_parser("validate", help="check a config and report every problem at once")
    val.add_argument("config")
    val.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    rep = sub.add_parser("report", help="rebuild report and plots from a run directory (runs nothing)")
    rep.add_argument("run_dir")
    fmt = sub.add_parser("formats", help="list format names with bit width, range and smallest step")
    fmt.add_argument("--names", nargs="*", default=None, help="formats to describe (default: common ones)")
    exp = sub.add_parser("export", help="export a run's plans to ONNX or torchao and measure them in that runtime",
                         description="export a run's plans (default: the joint and the best uniform plan), run them "
                                     "on the validation data in onnxruntime or torchao, and add the deployed metric, "
                                     "file size and CPU latency to the report")
    exp.add_argument("run_dir")
    exp.add_argument("--to", default="onnx", help="onnx (onnxruntime on the CPU) or torchao (default: onnx)")
    exp.add_argument("--plan", dest="plans", action="append", default=None, metavar="joint|uniform|PATH",
                     help="the plan to export: joint, uniform or a plan YAML file (repeatable; default: joint and, "
                          "when a uniform width passed, uniform)")
    exp.add_argument("--out", help="the ONNX file to write (one --plan; default: RUN_DIR/deploy/<plan>.onnx)")
    exp.add_argument("--repeats", type=int, default=20, help="timed batches per latency figure (default: 20)")
    return p


# ----------------------------------------------------------------------------- commands


def _cmd_formats(names: Sequence[str] | None) -> int:
    from .formats import BLOCK_FORMATS, FloatFormat, IntFormat, block_grid, parse_format

    rows = []
    for name in names or EXAMPLE_FORMATS:
        try:
            fmt = parse_format(name)
        except ValueError as err:
            raise UsageError(str(err)) from None
        if fmt is None:
            rows.append((name, "32", "float", "3.40282e+38", "1.4013e-45"))
        elif isinstance(fmt, IntFormat):
            rows.append((fmt.name, str(fmt.bits), fmt.kind_name, f"{fmt.qmax} x scale", "1 x scale"))
        elif isinstance(fmt, BLOCK_FORMATS):  # bits: element width (stored width with block scales)
            top, step = block_grid(fmt)
            rows.append((fmt.name, f"{fmt.bits} ({fmt.storage_bits:g})", f"block of {fmt.block}", top, step))
        else:
            kind = "float" if isinstance(fmt, FloatFormat) else "fixed"
            rows.append((fmt.name, str(fmt.bits), kind, f"{fmt.max_value:g}", f"{fmt.step:g}"))
    header = ("name", "bits", "type", "max", "smallest step")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
    for r in [header, *rows]:
        print(f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]:<{widths[3]}}  {r[4]}")
    return 0


def _cmd_validate(path: str, overrides: list[str]) -> int:
    cfg = load_config(path, overrides)
    if cfg.mode == "adaptive":  # no search: the controller's sites and settings
        from .adaptive_run import check_sites

        a = cfg.adaptive
        check_sites(cfg, make_config_task(cfg))
        print(f"{path}: ok — adaptive on {cfg.task.model}@{cfg.task.data}, sites {a.sites}, kinds "
              f"{', '.join(a.kinds)}, measured every {a.every} steps, criterion {cfg.criterion.name}, "
              f"run dir {cfg.run_dir}")
        return 0
    try:  # layer patterns need the model; a data set that is not here yet only skips this check
        task = make_config_task(cfg)
    except FileNotFoundError as err:
        print(f"note: layer patterns not checked, the data is not here ({err})")
    else:
        from .coverage import coverage
        from .runner import select_layers
        from .wrap import QuantSpec

        model = task.build_model(cfg.seeds[0])
        names = select_layers(model, cfg.search.layers, task.example_input())
        kinds = [k for k in cfg.search.kinds if k != "gradient"] or ["weight", "activation"]
        plan = dict.fromkeys(names, QuantSpec(**dict.fromkeys(kinds, "int8")))
        print(f"the search {coverage(model, plan, task.example_input())}")
    s = cfg.search
    print(f"{path}: ok — {cfg.mode} on {cfg.task.model}@{cfg.task.data}, {s.family} {s.candidates}, "
          f"kinds {', '.join(s.kinds)}, strategy {s.strategy}, criterion {cfg.criterion.name}, "
          f"executor {cfg.executor.kind}, run dir {cfg.run_dir}")
    return 0


class _Progress:
    """Progress over trials with the planned total and an ETA: a tqdm bar on a terminal,
    plain lines (at most every 10 s, and at each phase) otherwise; nothing with --quiet."""

    def __init__(self, quiet: bool) -> None:
        from tqdm import tqdm

        self.quiet, self.tty = quiet, sys.stderr.isatty()
        self.bar = tqdm(total=0, unit="trial", disable=quiet or not self.tty, dynamic_ncols=True)
        self.phase, self.start, self.last = "", 0.0, 0.0

    def __call__(self, event: Any) -> None:
        done = event.trials_run + event.trials_reused
        self.start = self.start or time.perf_counter()  # the first event comes after the baselines
        new_phase = event.phase != self.phase
        if new_phase:
            self.phase = event.phase
            self.bar.set_description(event.phase)
            log.info("%s: %s", event.phase, event.message)
        if done < self.bar.n:  # the next variant's search counts from zero again
            self.bar.reset()
        self.bar.total = max(event.planned, done)
        if done > self.bar.n:
            self.bar.update(done - self.bar.n)
        self.bar.set_postfix_str(f"run {event.trials_run}, reused {event.trials_reused}", refresh=True)
        now = time.perf_counter()
        if not self.quiet and not self.tty and (new_phase or now - self.last >= 10):
            self.last = now
            counts = (f" {done}/{max(event.planned, done)} trials ({event.trials_run} run, {event.trials_reused} "
                      f"reused){self._eta(event, now)}" if max(event.planned, done) else "")
            text = f": {event.message}" if counts and new_phase and event.message else f" {event.message}"
            print(f"[{event.phase}]{counts}{text if new_phase else ''}", file=sys.stderr, flush=True)

    def _eta(self, event: Any, now: float) -> str:
        left = max(event.planned - event.trials_run - event.trials_reused, 0)
        if not event.trials_run or not left:
            return ""
        return f", about {(now - self.start) / event.trials_run * left:.0f} s left"

    def close(self) -> None:
        self.bar.close()


def _cmd_run(args: argparse.Namespace) -> int:
    from .run import run_config

    cfg = load_config(args.config, args.overrides)
    if args.out:
        cfg.out = args.out
    progress = _Progress(args.quiet)
    try:
        outcome = run_config(cfg, fresh=args.fresh, progress=progress, source=args.config, announce=print)
    finally:
        progress.close()
    for result, paths in outcome.results.values():
        _print_answer(result, paths)
    if outcome.comparison is not None:
        print(f"comparison of {', '.join(outcome.results)}: {outcome.comparison['html']}")
    return 0


def _print_answer(result: Any, paths: dict[str, Path]) -> None:
    from .adaptive_run import AdaptiveResult
    from .result import format_metric

    if isinstance(result, AdaptiveResult):  # mode adaptive: one training run, no per-layer minima
        print("\n".join(result.answer_lines()))
        print(f"report: {paths['html']}")
        return
    table = result.min_bits[["layer", "kind", "min_bits"]].pivot(index="layer", columns="kind", values="min_bits")
    print(table.to_string())
    joint = result.summary.get("joint", {})
    uni = result.summary.get("uniform", {})
    name = result.summary.get("baseline", {}).get("metric_name", "accuracy")
    print(f"joint plan: {'passes' if joint.get('passed') else 'FAILS'} with {name} "
          f"{format_metric(name, joint.get('metric'))}; best uniform width: {uni.get('bits')}")
    cov = result.summary.get("coverage")
    if cov:
        print(f"coverage: the search {cov['text']}")
    if (paths["html"].parent / rd.DEPLOY).exists():  # deploy.to in the config, or an earlier `bitwidth export`
        from .result import read_csv

        _print_deployed(read_csv(paths["html"].parent / rd.DEPLOY))
    print(f"report: {paths['html']}")


def _cmd_stats(args: argparse.Namespace) -> int:
    from .run import record_config_stats

    cfg = load_config(args.config, args.overrides)
    if args.out:
        cfg.out = args.out
    csv, paths = record_config_stats(cfg)
    print(f"statistics: {csv}; report: {paths['html']}")
    return 0


def _cmd_report(run_dir: str) -> int:
    from .report import write_report

    path = Path(run_dir)
    if (path / rd.VARIANTS).exists():
        from .report.compare import write_variant_reports

        paths = write_variant_reports(path)  # checks every name first: nothing is written outside the run
    elif (path / rd.SUMMARY).exists() or (path / rd.STATS).exists() or (path / rd.SCHEDULE).exists():
        paths = write_report(path)
    else:
        raise UsageError(f"{run_dir}: not a run directory (no summary.yaml, stats.pt or schedule.csv); "
                         "run `bitwidth run` first")
    print(f"report: {paths['html']}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import TARGETS, deploy_run

    if args.to not in TARGETS:
        raise UsageError(f"unknown export target {args.to!r}; allowed: {', '.join(TARGETS)}")
    if not Path(args.run_dir).is_dir():
        raise UsageError(f"{args.run_dir}: no such run directory")
    table = deploy_run(args.run_dir, to=args.to, plans=args.plans, out=args.out, repeats=args.repeats,
                       progress=lambda line: print(line, file=sys.stderr, flush=True))
    runtime = "onnxruntime" if args.to == "onnx" else "torchao"
    names = [Path(p).stem for p in args.plans or ("joint", "uniform")]
    _print_deployed(table[(table["runtime"] == runtime) & table["plan"].isin(names)])
    print(f"report: {Path(args.run_dir) / rd.REPORT_HTML}")
    return 0


def _print_deployed(table: Any) -> None:
    """One line per (plan, runtime) of ``deploy.csv``: deployed vs simulated, size, latency."""
    from .result import format_metric

    for r in table.itertuples():
        gap = f"{r.gap * 100:+.2f} pt" if "acc" in r.metric else f"{r.gap:+.4g}"
        agrees = str(r.agrees) == "True"
        print(f"{r.plan}: {r.runtime} {r.metric} {format_metric(r.metric, r.deployed, 2)} (simulated "
              f"{format_metric(r.metric, r.simulated, 2)}, gap {gap}{'' if agrees else ', BEYOND the tolerance'}); "
              f"{r.file_bytes / 1024:.1f} KiB (plan weights {r.plan_weight_bytes / 1024:.1f} KiB); "
              f"{r.latency_ms:.2f} ms per batch of {r.batch_size} vs fp32 {r.fp32_latency_ms:.2f} ms"
              + (f"; {r.path}" if isinstance(r.path, str) and r.path else ""))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``bitwidth`` and ``python -m bitwidth``; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "formats":
            return _cmd_formats(args.names)
        if args.command == "validate":
            return _cmd_validate(args.config, args.overrides)
        if args.command == "report":
            return _cmd_report(args.run_dir)
        if args.command == "stats":
            return _cmd_stats(args)
        if args.command == "export":
            return _cmd_export(args)
        return _cmd_run(args)
    except (ConfigError, UsageError, ValueError) as err:
        # Bad configs, names and layer patterns all surface as ValueError: usage, not a crash.
        print(f"bitwidth: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bitwidth: interrupted; finished trials are stored, run the same command to resume",
              file=sys.stderr)
        return 130
    except Exception as err:  # a failure at run time: short message, details in the log
        where = next((h.baseFilename for h in log.handlers if isinstance(h, logging.FileHandler)), None)
        if where:  # without a run.log, logging would print the traceback on the terminal
            log.exception("run failed")
        print(f"bitwidth: failed: {type(err).__name__}: {err}" + (f" (details: {where})" if where else ""),
              file=sys.stderr)
        return 1
    finally:
        close_logs()


if __name__ == "__main__":
    sys.exit(main())

