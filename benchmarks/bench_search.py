"""Search cost: grid, bisect, predict and predict with early stopping, side by side.

Prints one table per run. For each model every search starts from the same cached fp32
baseline in a fresh run directory (nothing reused) and runs the whole search: per-pair
minima, best uniform width, joint step. Columns:

- ``full evals / pair``: validation samples evaluated by every trial the search ran,
  divided by the validation set's size and by the number of (site, kind) pairs: 1.0 is one
  full pass over the validation set per pair, joint and uniform steps included;
- ``vs bisect``: how many times fewer samples than bisect evaluated;
- ``trials``: trials run, all steps; ``wall s``: the search (baseline excluded);
- ``minima = grid``: whether every pair's minimum equals grid's.

Models: ``digits_cnn`` (configs/quickstart.yaml: int weights and activations, 2..8,
accuracy within 1 point), ``tiny_lm`` (configs/tiny_lm.yaml: every site of the byte-level
transformer, loss within 5%), and ``deep_mlp``, a residual MLP on digits with 52 linear
layers (104 pairs), for timing. ``--profile`` prints a post-training trial on digits_cnn
against a bare evaluation of the same quantized model, with a cProfile of the trial.

    python benchmarks/bench_search.py                 # everything: about 10 min on 2 quiet cores
    python benchmarks/bench_search.py --quick         # smaller language model and data: about 3 min
    python benchmarks/bench_search.py --models digits_cnn --profile
    python benchmarks/bench_search.py --keep runs/bench   # keep the run directories (reports, tables)

``--aimet`` adds AIMET's automatic mixed precision on digits_cnn (benchmarks/aimet_amp.py:
the same baseline, integer candidates 2..8 with a layer's weight and activation at one
width, as AMP groups them, and 1 point of accuracy) as an optional row. aimet-torch goes
into a virtual environment the benchmark creates (``--aimet-venv``, default beside the run
directories; it sees this Python's packages, torch included), never into bitwidth's own.

    python benchmarks/bench_search.py --models digits_cnn --aimet --aimet-venv /tmp/aimet_venv
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitwidth.criteria import make_criterion
from bitwidth.runner import run_search
from bitwidth.search import SearchResult
from bitwidth.tasks import TaskLike, make_task
from bitwidth.trial import BASELINE_FILE, TrialCache, TrialOptions, run_trial, train_baseline

SEARCHES = {
    "grid": {"strategy": "grid"},
    "bisect": {"strategy": "bisect"},
    "predict": {"strategy": "predict"},
    "predict + early stop": {"strategy": "predict", "early_stop": True},
}


class _Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.1 * self.fc(torch.relu(x))


def deep_mlp(depth: int = 50, width: int = 64) -> nn.Module:
    """A residual MLP on 8x8 digits: ``depth`` hidden linear layers plus input and output (52 sites)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, width), *[_Residual(width) for _ in range(depth)],
                         nn.ReLU(), nn.Linear(width, 10))


def models(quick: bool) -> dict[str, dict[str, Any]]:
    """Each model's task, baseline schedule and search settings (the shipped configs')."""
    lm_data = {"train_bytes": 131_072, "val_bytes": 16_384} if quick else {}
    return {
        "digits_cnn": {
            "task": lambda: make_task("digits_cnn", "digits"), "options": TrialOptions(epochs=10),
            "search": {"kinds": ("weight", "activation"), "candidates": (2, 3, 4, 5, 6, 8),
                       "criterion": make_criterion("accuracy", max_drop=0.01)}},
        "tiny_lm": {
            "task": lambda: make_task("tiny_lm", "pytext", **lm_data),
            "options": TrialOptions(epochs=3 if quick else 6, lr=0.003, optimizer="adam", batch_size=32),
            "search": {"kinds": ("weight", "activation"), "candidates": (2, 3, 4, 5, 6, 8),
                       "criterion": make_criterion("loss", max_rise=0.05)}},
        "deep_mlp": {
            "task": lambda: make_task(f"{Path(__file__).resolve()}:deep_mlp", "digits"),
            "options": TrialOptions(epochs=10, lr=0.05),
            "search": {"kinds": ("weight", "activation"), "candidates": (2, 3, 4, 5, 6, 8),
                       "criterion": make_criterion("accuracy", max_drop=0.01)}},
    }


def timed_search(task: TaskLike, base_dir: Path, name: str, **config: Any) -> tuple[float, SearchResult]:
    run_dir = base_dir / name.replace(" ", "").replace("+", "_")
    run_dir.mkdir()
    shutil.copy(base_dir / BASELINE_FILE, run_dir / BASELINE_FILE)
    start = time.perf_counter()
    result = run_search(task, run_dir=run_dir, mode="ptq", **config)
    return time.perf_counter() - start, result


def bench_model(name: str, spec: dict[str, Any], tmp: Path,
                searches: list[str]) -> tuple[list[str], dict[str, tuple[float, SearchResult]]]:
    task = spec["task"]()
    base_dir = tmp / name
    base_dir.mkdir()
    start = time.perf_counter()
    train_baseline(task, spec["options"], cache_dir=base_dir)
    lines = [f"| {name} | fp32 baseline | | | | {time.perf_counter() - start:.1f} | | |"]
    results: dict[str, tuple[float, SearchResult]] = {}
    for search in searches:
        results[search] = timed_search(task, base_dir, search, trial_options=spec["options"],
                                       **spec["search"], **SEARCHES[search])
    cols = ["layer", "kind", "min_bits"]
    grid = results.get("grid")
    bisect_samples = results["bisect"][1].summary["counts"]["samples_run"] if "bisect" in results else None
    for search, (wall, result) in results.items():
        counts = result.summary["counts"]
        same = "" if grid is None else str(grid[1].min_bits[cols].equals(result.min_bits[cols]))
        fewer = f"{bisect_samples / counts['samples_run']:.2f}x" if bisect_samples else ""
        joint = result.summary["joint"]
        lines.append(f"| {name} ({counts['pairs']} pairs) | {search} | {counts['full_evaluations_per_pair']:.2f} | "
                     f"{fewer} | {counts['trials_run']} | {wall:.1f} | {same} | "
                     f"{'pass' if joint['passed'] else 'FAIL'} {joint['metric']:.4f} |")
    return lines, results


def aimet_row(base_dir: Path, venv: Path, pairs: int, bisect_samples: int | None) -> str:
    """AIMET's AMP on digits_cnn from ``base_dir``'s baseline, run in ``venv`` (created and filled here)."""
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    if subprocess.run([str(python), "-c", "import aimet_torch"], capture_output=True).returncode:
        install = subprocess.run([str(python), "-m", "pip", "install", "-q", "aimet-torch"],
                                 capture_output=True, text=True)
        if install.returncode:
            why = (install.stderr.strip().splitlines() or ["pip failed"])[-1]
            return f"| digits_cnn | aimet-torch AMP | not installable here: {why} | | | | | |"
    script = Path(__file__).with_name("aimet_amp.py")
    run = subprocess.run([str(python), str(script), str(base_dir), str(base_dir / "aimet_results")],
                         capture_output=True, text=True)
    if run.returncode:
        return f"| digits_cnn | aimet-torch AMP | failed: {(run.stderr.strip().splitlines() or ['?'])[-1]} | | | | | |"
    amp = json.loads(run.stdout.strip().splitlines()[-1])
    fewer = f"{bisect_samples / amp['samples']:.2f}x" if bisect_samples else ""
    passed = "pass" if amp["accuracy"] >= amp["baseline"] - 0.01 else "FAIL"
    return (f"| digits_cnn ({pairs} pairs) | aimet-torch AMP (w = a per layer) | "
            f"{amp['samples'] / amp['val_size'] / pairs:.2f} | {fewer} | {amp['evaluations']} | {amp['wall_s']:.1f} "
            f"| n/a | {passed} {amp['accuracy']:.4f} |")


def profile_trial(tmp: Path, repeats: int = 200) -> str:
    """A post-training trial on digits_cnn (as the runner runs it, and without the per-process
    cache) against a bare evaluation of the same quantized model; the cached trial's cProfile."""
    from bitwidth.tasks.base import evaluate
    from bitwidth.wrap import QuantSpec, calibrate, wrap

    task, options = make_task("digits_cnn"), TrialOptions(epochs=10)
    base = train_baseline(task, options, cache_dir=tmp)
    plan = {"conv2": QuantSpec(weight="int4", activation="int4")}
    model = task.build_model(0)
    model.load_state_dict(base.state_dict)
    wrap(model, plan)
    calibrate(model, [x for x, _ in task.calib_batches(options.calib_batches)])
    batches = list(task.val_batches())
    cache = TrialCache()

    def bare() -> None:
        evaluate(model, batches)

    def fresh() -> None:
        run_trial(task, plan, options, base)

    def cached() -> None:
        run_trial(task, plan, options, base, cache=cache)

    times: dict[str, list[float]] = {"bare": [], "fresh": [], "cached": []}
    fns = {"bare": bare, "fresh": fresh, "cached": cached}
    for fn in fns.values():
        fn()
    for _ in range(repeats):  # interleaved, so load on the machine hits all three alike
        for label, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - start)
    med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}
    from bitwidth.executors import LocalExecutor, ProcessExecutor

    runner = _through_runner(task, options, base, tmp / "local", LocalExecutor()) * 1e3
    with ProcessExecutor(workers=1) as pool:
        pooled = _through_runner(task, options, base, tmp / "pool", pool) * 1e3
    out = [f"post-training trial on digits_cnn ({repeats} interleaved repetitions, medians):",
           f"  bare quantized evaluation  {med['bare']:6.2f} ms",
           f"  trial, fresh model         {med['fresh']:6.2f} ms  ({med['fresh'] / med['bare']:.2f}x bare)",
           f"  trial, per-process cache   {med['cached']:6.2f} ms  ({med['cached'] / med['bare']:.2f}x bare)",
           f"  trial through the runner   {runner:6.2f} ms  ({runner / med['bare']:.2f}x bare; key, store, "
           "executor, verdict: the mean over 48 distinct single-pair plans)",
           f"  same, 1-process pool       {pooled:6.2f} ms  ({pooled / med['bare']:.2f}x bare; plus the round trip "
           "to the worker process)"]
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(50):
        cached()
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(14)
    return "\n".join(out) + "\n\ncProfile of 50 cached trials:\n" + text.getvalue().split("\n\n", 1)[-1]


def _through_runner(task: TaskLike, options: TrialOptions, base: Any, tmp: Path, executor: Any) -> float:
    """Seconds per trial of the runner's ``evaluate`` (keys, store writes, the executor, verdicts)."""
    from bitwidth.runner import _Evaluator
    from bitwidth.store import TrialStore
    from bitwidth.wrap import QuantSpec

    plans = [{layer: QuantSpec(**{kind: f"int{n}"})} for layer in ("conv1", "conv2", "fc1", "fc2")
             for kind in ("weight", "activation") for n in (2, 3, 4, 5, 6, 8)]
    tmp.mkdir()
    store = TrialStore(tmp / "trials.jsonl")
    evaluate = _Evaluator(task, options, {0: base}, make_criterion("accuracy"), store, executor, None)
    evaluate(plans[:1])  # the worker's cache fills on the first trial, as in a search
    start = time.perf_counter()
    for plan in plans[1:]:
        evaluate([plan])
    store.close()
    return (time.perf_counter() - start) / (len(plans) - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["digits_cnn", "tiny_lm", "deep_mlp"],
                        choices=["digits_cnn", "tiny_lm", "deep_mlp"])
    parser.add_argument("--searches", nargs="+", default=list(SEARCHES), choices=list(SEARCHES))
    parser.add_argument("--quick", action="store_true", help="a smaller language model run (less data, 3 epochs)")
    parser.add_argument("--profile", action="store_true", help="also profile one post-training trial")
    parser.add_argument("--keep", type=Path, help="write the run directories here instead of a temporary one")
    parser.add_argument("--aimet", action="store_true", help="add AIMET's mixed precision on digits_cnn")
    parser.add_argument("--aimet-venv", type=Path, help="the virtual environment for aimet-torch (made if missing)")
    args = parser.parse_args()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=False)
        bench(args, args.keep)
        return
    with tempfile.TemporaryDirectory(prefix="bench_search_") as tmp:
        bench(args, Path(tmp))


def bench(args: argparse.Namespace, tmp: Path) -> None:
    torch.set_num_threads(1)
    specs = models(args.quick)
    print(f"{os.cpu_count()} cores, torch threads 1, one local worker{', --quick' if args.quick else ''}\n")
    lines = ["| model | search | full evals / pair | fewer samples than bisect | trials | wall s | minima = grid "
             "| joint plan |", "| --- | --- | ---: | ---: | ---: | ---: | --- | --- |"]
    for name in args.models:
        rows, results = bench_model(name, specs[name], tmp, args.searches)
        lines += rows
        if name == "digits_cnn" and args.aimet:
            bisect = results.get("bisect")
            lines.append(aimet_row(tmp / name, args.aimet_venv or tmp / "aimet_venv", len(results[args.searches[0]][1]
                                   .min_bits), bisect[1].summary["counts"]["samples_run"] if bisect else None))
        print("\n".join(lines), flush=True)
        lines = []
    if args.profile:
        (tmp / "profile").mkdir()
        print("\n" + profile_trial(tmp / "profile"))


if __name__ == "__main__":
    main()
