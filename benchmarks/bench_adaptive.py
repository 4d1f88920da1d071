"""Adaptive precision training against fp32, uniform widths and a training-mode search's static joint plan.

For each model it prints one table: whether each plan passes the criterion, its metric,
training BOPs relative to fp32 (forward plus both backward products, at the widths in
force at each step), and the total compute to get there (training runs and steps, the
fp32 baseline included). Then the issue's three targets, met or missed, with the figures.

- ``digits_cnn`` (the digits_train.yaml settings: fixed point, weights + activations +
  gradients, 6 epochs of SGD, criterion converge): the search runs here (bisect, about
  60 training runs), or is read from ``--search-dir`` (a finished ``digits_train`` run).
- ``tiny_lm`` (byte-level transformer, Adam, criterion loss within 5%): adaptive against
  fp32 and a uniform width. A training-mode search of its 21 sites x 3 kinds would take
  hundreds of training runs (hours on 2 cores): not run; its size is estimated from the
  digits search's runs per (site, kind) pair.

Printed figures only, never timed asserts. ``python benchmarks/bench_adaptive.py``
(estimated 6-8 minutes on 2 quiet cores from its CPU time; on 2 cores shared with five other
jobs it took 14 minutes for digits_cnn with ``--search-dir`` and 46 for tiny_lm).
``--models digits_cnn`` runs the digits part alone.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

from bitwidth.adaptive_run import AdaptiveSettings, schedule_costs, train_adaptive
from bitwidth.cost import CostModel
from bitwidth.criteria import make_criterion
from bitwidth.result import SearchResult
from bitwidth.runner import run_search
from bitwidth.tasks import make_task
from bitwidth.trial import TrialOptions, train_baseline

SETUPS = {
    "digits_cnn": {"task": ("digits_cnn", "digits"), "train": {"epochs": 6, "lr": 0.05},
                   "criterion": ("converge", {"max_drop": 0.02, "loss_tol": 0.5}), "uniform": [6, 8],
                   "search": {"family": "fixed", "family_options": {"rounding": "nearest"},
                              "candidates": [2, 3, 4, 6, 8, 12, 16], "strategy": "bisect"}},
    "tiny_lm": {"task": ("tiny_lm", "pytext"), "train": {"epochs": 2, "lr": 0.003, "optimizer": "adam"},
                "criterion": ("loss", {"max_rise": 0.05}), "uniform": [8], "search": None,
                # Adam rescales each update: gradients flushed to zero matter where the relative error is small.
                "extra": ("adaptive, gradient max_underflow 0.1", {"gradient": {"max_underflow": 0.1}})},
}
KINDS = ("weight", "activation", "gradient")
# Training runs per (site, kind) pair of the digits_cnn search (58 trials for 12 pairs, bisect
# over 7 widths, uniform and joint steps included): the estimate for a search not run.
RUNS_PER_PAIR = 58 / 12


def _row(plan: str, passed: bool | None, metric: float, bops: float, runs: float, steps: float) -> dict:
    return {"plan": plan, "passes": passed, "metric": metric, "train_bops": bops, "runs": runs, "steps": steps}


def bench(name: str, work: Path, search_dir: Path | None) -> tuple[list[dict], list[str]]:
    setup = SETUPS[name]
    task = make_task(*setup["task"])
    options = TrialOptions(mode="train", seed=0, **setup["train"])
    criterion = make_criterion(setup["criterion"][0], **setup["criterion"][1])
    t0 = time.perf_counter()
    baseline = train_baseline(task, options, cache_dir=work)
    print(f"[{name}] fp32 baseline: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    per_run = options.epochs * sum(1 for _ in task.train_batches(0, 0, options.batch_size))
    costs = CostModel.measure(task.build_model(0), task.example_input())
    metric = criterion.metric
    rows = [_row("fp32", True, baseline.metrics[metric], 1.0, 1, per_run)]
    runs = [("adaptive", None, {})] + [(f"uniform {b} (pinned)", b, {}) for b in setup["uniform"]]
    if "extra" in setup:
        runs.append((setup["extra"][0], None, setup["extra"][1]))
    for label, pinned, policies in runs:
        t0 = time.perf_counter()
        run = train_adaptive(task, options, baseline, AdaptiveSettings(policies=policies), pinned=pinned)
        c = schedule_costs(run.schedule, costs)
        passed = criterion.passes(run.outcome, baseline.metrics, baseline.loss_curve)
        rows.append(_row(label, passed, run.outcome.metrics[metric], c["train_bops_vs_fp32"], 2,
                         per_run + run.steps_trained))
        bits = ", ".join(f"{k} {c[f'avg_bits_{k}']:.1f}" for k in KINDS)
        print(f"[{name}] {label}: {time.perf_counter() - t0:.0f} s; mean bits {bits}; {len(run.changes)} changes"
              + (f"; {'; '.join(run.events)}" if run.events else ""), file=sys.stderr, flush=True)
    notes = []
    if setup["search"] is not None:
        if search_dir is None:
            t0 = time.perf_counter()
            search_dir = work / "search"
            run_search(task, mode="train", kinds=KINDS, criterion=criterion, trial_options=options,
                       run_dir=search_dir, **setup["search"])
            print(f"[{name}] training-mode search: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        res = SearchResult.load(search_dir)
        counts = res.summary.get("counts", {})
        trials = int(counts.get("trials_run", 0)) + int(counts.get("trials_reused", 0))
        for label, part in (("static joint plan (search)", "joint"), ("best uniform (search)", "uniform")):
            info = res.summary.get(part, {})
            bits = f" {info.get('bits')}" if part == "uniform" else ""
            rows.append(_row(label + bits, bool(info.get("passed")), float(info.get("metric", math.nan)),
                             float(res.costs.loc[part, "train_bops_vs_fp32"]), trials + 1, (trials + 1) * per_run))
    else:
        pairs = len(costs.layers) * len(KINDS)
        notes.append(f"no training-mode search run: {len(costs.layers)} sites x 3 kinds = {pairs} pairs; at the "
                     f"digits search's {RUNS_PER_PAIR:.1f} training runs per pair that is ~{pairs * RUNS_PER_PAIR:.0f} "
                     f"runs (~{pairs * RUNS_PER_PAIR * per_run:.0f} steps)")
    return rows, notes


def _targets(rows: list[dict]) -> list[str]:
    by = {r["plan"]: r for r in rows}
    ada, static = by["adaptive"], by.get("static joint plan (search)")
    out = [f"passes in one training run: {'MET' if ada['passes'] else 'MISSED'}"]
    if static is None:
        out.append("training BOPs <= static joint plan: not measured (no search)")
        out.append("total steps <= 1/5 of the search's: not measured (no search)")
        return out
    ok = ada["train_bops"] <= static["train_bops"]
    out.append(f"training BOPs <= static joint plan: {'MET' if ok else 'MISSED'} "
               f"({ada['train_bops']:.2%} vs {static['train_bops']:.2%} of fp32, ratio "
               f"{ada['train_bops'] / static['train_bops']:.2f})")
    ok = ada["steps"] <= static["steps"] / 5
    out.append(f"total steps <= 1/5 of the search's: {'MET' if ok else 'MISSED'} "
               f"({ada['steps']} vs {static['steps']}: 1/{static['steps'] / ada['steps']:.0f})")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--search-dir", type=Path, default=None,
                        help="a finished training-mode search of digits_cnn (e.g. runs/digits_train) to reuse")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            work = Path(tmp) / name
            work.mkdir()
            rows, notes = bench(name, work, args.search_dir if name == "digits_cnn" else None)
            print(f"\n## {name}\n")
            print("| plan | passes | metric | training BOPs vs fp32 | training runs | training steps |")
            print("|---|---|---:|---:|---:|---:|")
            for r in rows:
                print(f"| {r['plan']} | {'yes' if r['passes'] else 'no'} | {r['metric']:.4f} | {r['train_bops']:.2%} "
                      f"| {r['runs']} | {r['steps']} |")
            print()
            for line in _targets(rows) + notes:
                print(f"- {line}")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
