"""Search speed on digits_cnn: grid vs bisect post-training, and a whole training-mode search.

Prints one table. Post-training: int weights and activations of every layer,
candidates 2..8, grid and bisect from the same cached baseline (each into a fresh run
directory, so nothing is reused); the minima must agree. Training mode: weight,
activation and gradient of every layer, candidates 2,3,4,6,8,12,16, a short schedule,
bisect with one worker. Wall times exclude training the baseline, which is reported
on its own line.

    python benchmarks/bench_search.py                 # both parts
    python benchmarks/bench_search.py --skip-train    # post-training only (about a minute)
    python benchmarks/bench_search.py --keep runs/bench   # keep the run directories (reports, tables)
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bitwidth.criteria import make_criterion
from bitwidth.runner import run_search
from bitwidth.search import SearchResult
from bitwidth.tasks import TaskLike, make_task
from bitwidth.trial import BASELINE_FILE, TrialOptions, train_baseline


def timed_search(task: TaskLike, base_dir: Path, name: str, **config: Any) -> tuple[float, SearchResult]:
    run_dir = base_dir / name
    run_dir.mkdir()
    shutil.copy(base_dir / BASELINE_FILE, run_dir / BASELINE_FILE)
    start = time.perf_counter()
    result = run_search(task, run_dir=run_dir, **config)
    return time.perf_counter() - start, result


def row(name: str, seconds: float, result: SearchResult | None = None, note: str = "") -> str:
    if result is None:
        return f"| {name} | | | {seconds:8.1f} | {note} |"
    counts = result.summary["counts"]
    per_layer = int(result.min_bits["evaluations"].sum())
    return f"| {name} | {per_layer} | {counts['trials_run']} | {seconds:8.1f} | {note} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="digits_cnn")
    parser.add_argument("--ptq-epochs", type=int, default=10, help="baseline epochs for the post-training part")
    parser.add_argument("--train-epochs", type=int, default=3, help="the short schedule of the training-mode search")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--keep", type=Path, help="write the run directories here instead of a temporary one")
    args = parser.parse_args()

    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=False)
        bench(args, args.keep)
        return
    with tempfile.TemporaryDirectory(prefix="bench_search_") as tmp:
        bench(args, Path(tmp))


def bench(args: argparse.Namespace, tmp: Path) -> None:
    task = make_task(args.model)
    lines = [f"{args.model}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, one worker", "",
             "| search | per-layer evaluations | trials run (all steps) | wall s | note |",
             "| --- | ---: | ---: | ---: | --- |"]

    ptq_options = TrialOptions(epochs=args.ptq_epochs)
    base_dir = tmp / "ptq"
    base_dir.mkdir()
    start = time.perf_counter()
    train_baseline(task, ptq_options, cache_dir=base_dir)
    lines.append(row(f"fp32 baseline ({args.ptq_epochs} epochs)", time.perf_counter() - start))
    ptq = dict(mode="ptq", kinds=("weight", "activation"), candidates=tuple(range(2, 9)),
               criterion=make_criterion("accuracy", max_drop=0.01), trial_options=ptq_options)
    t_grid, by_grid = timed_search(task, base_dir, "grid", strategy="grid", **ptq)
    t_bisect, by_bisect = timed_search(task, base_dir, "bisect", strategy="bisect", **ptq)
    cols = ["layer", "kind", "min_bits"]
    same = by_grid.min_bits[cols].equals(by_bisect.min_bits[cols])
    ratio = by_grid.min_bits["evaluations"].sum() / by_bisect.min_bits["evaluations"].sum()
    lines.append(row("ptq grid, int w+a, 2..8", t_grid, by_grid))
    lines.append(row("ptq bisect, int w+a, 2..8", t_bisect, by_bisect,
                     f"{ratio:.2f}x fewer evaluations; same minima: {same}"))

    if not args.skip_train:
        train_options = TrialOptions(mode="train", epochs=args.train_epochs)
        train_dir = tmp / "train"
        train_dir.mkdir()
        start = time.perf_counter()
        train_baseline(task, train_options, cache_dir=train_dir)
        lines.append(row(f"fp32 baseline ({args.train_epochs} epochs)", time.perf_counter() - start))
        t_train, by_train = timed_search(
            task, train_dir, "train", mode="train", kinds=("weight", "activation", "gradient"),
            candidates=(2, 3, 4, 6, 8, 12, 16), criterion=make_criterion("converge"), trial_options=train_options)
        lines.append(row(f"train bisect, int w+a+g, {args.train_epochs} epochs", t_train, by_train,
                         f"{t_train / 60:.1f} min; joint passed: {by_train.joint_passed}"))

    print("\n".join(lines))
    print("\nmin_bits (ptq, bisect):")
    print(by_bisect.min_bits.to_string(index=False))
    print("\ncosts (ptq, bisect):")
    ptq_cols = ["memory_bits", "bops", "memory_bits_vs_fp32", "bops_vs_fp32", "bops_vs_uniform"]
    print(by_bisect.costs[ptq_cols].to_string())
    if not args.skip_train:
        print("\nmin_bits (train):")
        print(by_train.min_bits.to_string(index=False))
        print(by_train.costs[["memory_bits", "train_bops", "train_bops_vs_fp32", "train_bops_vs_uniform"]].to_string())


if __name__ == "__main__":
    main()
