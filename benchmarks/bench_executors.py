"""Wall time of the same digits searches with the local, process and Ray executors.

Two searches, each run once per executor from the same cached baseline into fresh run
directories, so every trial really runs: the quickstart's (digits_cnn post-training, int
weights and activations, 2..8 bits) and ``configs/digits_train.yaml``'s (training mode;
weights, activations, gradients; fixed point). Prints wall times, ratios to ``local``
and whether the minima and joint plans agree.

    python benchmarks/bench_executors.py [--workers 2] [--epochs 6] [--skip-ray]
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
    searches = {
        "ptq (quickstart)": (TrialOptions(mode="ptq"), dict(mode="ptq", kinds=("weight", "activation"),
                                                            family="int", candidates=(2, 3, 4, 5, 6, 8))),
        "train (digits_train)": (TrialOptions(mode="train", epochs=args.epochs),
                                 dict(mode="train", kinds=("weight", "activation", "gradient"), family="fixed",
                                      candidates=(2, 3, 4, 6, 8, 12, 16))),
    }
    kinds = [("local", {}), ("process", {"workers": args.workers})]
    if not args.skip_ray:
        kinds.append(("ray", {"workers": args.workers, "address": "local"}))
    table = []
    for search_name, (options, search) in searches.items():
        root = Path(tempfile.mkdtemp(prefix="bench_executors_"))
        train_baseline(task, options, cache_dir=root)  # shared: each run copies it, so only the search is timed
        rows = []
        for kind, kw in kinds:
            run_dir = root / kind
            run_dir.mkdir()
            shutil.copy(root / "baseline.pt", run_dir / "baseline.pt")
            start = time.perf_counter()
            with make_executor(kind, **kw) as executor:  # executor start-up counts
                result = run_search(task, run_dir=run_dir, executor=executor, trial_options=options, **search)
            answer = (result.min_bits[["layer", "kind", "min_bits"]], result.summary["joint"]["bits"])
            rows.append((kind, time.perf_counter() - start, result.summary["counts"]["trials_run"], answer))
            print(f"{search_name:22s} {kind:8s} {rows[-1][1]:7.1f} s", flush=True)
        table += [(search_name, kind, wall, trials, wall / rows[0][1],
                   answer[0].equals(rows[0][3][0]) and answer[1] == rows[0][3][1])
                  for kind, wall, trials, answer in rows]
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n1 torch thread per trial, workers={args.workers}, torch={torch.__version__}")
    print("| search | executor | wall s | trials | x local | same minima and joint plan |")
    print("|---|---|---:|---:|---:|---|")
    for search_name, kind, wall, trials, ratio, same in table:
        print(f"| {search_name} | {kind} | {wall:.1f} | {trials} | {ratio:.2f} | {same} |")


if __name__ == "__main__":
    main()
