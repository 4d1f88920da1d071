"""Wall time of the same digits search with the local, process and Ray executors.

The search of ``configs/digits_train.yaml`` (digits_cnn in training mode; weights,
activations, gradients; fixed point) is run once per executor from the same cached
baseline, into fresh run directories, so every trial really runs. Prints wall times,
ratios to ``local`` and whether the minima agree.

    python benchmarks/bench_executors.py [--workers 2] [--epochs 6]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from bitwidth.executors import make_executor
from bitwidth.runner import run_search
from bitwidth.tasks import make_task
from bitwidth.trial import TrialOptions, train_baseline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--skip-ray", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    task = make_task("digits_cnn", "digits")
    options = TrialOptions(mode="train", epochs=args.epochs)
    root = Path(tempfile.mkdtemp(prefix="bench_executors_"))
    train_baseline(task, options, cache_dir=root)  # shared: each run copies it, so only trials are timed
    search = dict(mode="train", kinds=("weight", "activation", "gradient"), family="fixed",
                  candidates=(2, 3, 4, 6, 8, 12, 16), trial_options=options)
    kinds = [("local", {}), ("process", {"workers": args.workers})]
    if not args.skip_ray:
        kinds.append(("ray", {"workers": args.workers, "address": "local"}))
    rows = []
    for kind, kw in kinds:
        run_dir = root / kind
        run_dir.mkdir()
        shutil.copy(root / "baseline.pt", run_dir / "baseline.pt")
        start = time.perf_counter()
        with make_executor(kind, **kw) as executor:
            result = run_search(task, run_dir=run_dir, executor=executor, **search)
        wall = time.perf_counter() - start
        rows.append((kind, wall, result.summary["counts"]["trials_run"], result.min_bits))
        print(f"{kind:8s} {wall:7.1f} s  ({rows[-1][2]} trials)", flush=True)
    local = rows[0]
    print(f"\ncores={torch.get_num_threads()} thread/trial, workers={args.workers}, torch={torch.__version__}")
    print(f"{'executor':10s} {'wall s':>8s} {'trials':>7s} {'x local':>8s}  same minima")
    for kind, wall, trials, min_bits in rows:
        same = min_bits[["layer", "kind", "min_bits"]].equals(local[3][["layer", "kind", "min_bits"]])
        print(f"{kind:10s} {wall:8.1f} {trials:7d} {wall / local[1]:8.2f}  {same}")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
