"""Shared machinery of the experiments: the models studied, cached per-seed searches, result files.

Every claim script draws on the same searches, so one search feeds several claims: a
search of one model, mode and seed runs once into ``experiments/runs/<model>/<mode>/seed<k>/``
(git-ignored) and every later script reads it back. A run directory holds

- ``baseline.pt``: the fp32 baseline (trained once by :func:`bitwidth.trial.train_baseline`);
- ``trials.jsonl``: one line per finished trial, appended as it finishes (a killed run resumes);
- ``stats.csv``: each (site, kind)'s distribution statistics, recorded on the fp32 model
  *before* the search (calibration batches, forward and, in train mode, backward);
- ``sqnr.csv``: the quantization SQNR of every candidate on the recorded sample (the
  predictor's input: :func:`bitwidth.stats_analysis.sweep`);
- ``minima.csv``: the minimum of each (site, kind), found by bisection over the candidates.

The search quantizes one (site, kind) at a time, all else fp32, and bisects its candidates
assuming a monotone pass/fail (as ``strategy: bisect`` does); a pair that fails even at
the largest candidate has no minimum (``<NA>``) and counts as "more than the largest".
Unlike :func:`bitwidth.run_search` it skips the joint and uniform steps, which no claim
here needs, so the whole study fits the time budget.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as TF

from bitwidth.coverage import coverage
from bitwidth.criteria import make_criterion
from bitwidth.families import make_format
from bitwidth.report.document import Table
from bitwidth.report.markdown import table_markdown
from bitwidth.report.tables import distribution_table
from bitwidth.runner import select_pairs
from bitwidth.stats import record
from bitwidth.stats_analysis import sweep
from bitwidth.tasks import make_task
from bitwidth.trial import Baseline, TrialOptions, TrialOutcome, run_trial, train_baseline
from bitwidth.wrap import QuantSpec

__all__ = [
    "FAMILY_OF_MODE", "HERE", "MODELS", "ModelSpec", "RESULTS", "RUNS", "Study", "TrialCache", "collect",
    "ensure_run", "fill_cache", "gallop_min", "md_table", "parallel", "ranked_bits", "read_run", "run_options",
    "run_table", "save_figure", "search_minima", "seed_summary", "sqnr_bits", "study_from_args", "write_result",
]

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
RUNS = HERE / "runs"
# The format family each mode searches: integers (per-tensor max scale) after training, fixed
# point (binary point placed at each tensor's measured range) while training, as a
# fixed-point accelerator would.
FAMILY_OF_MODE = {"ptq": "int", "train": "fixed"}
# Post-training trials take milliseconds: a fine grid. Each training-mode trial retrains the model: a coarser one.
CANDIDATES = {"ptq": (2, 3, 4, 5, 6, 7, 8, 10, 12, 16), "train": (2, 3, 4, 6, 8, 12, 16)}
QUICK_CANDIDATES = {"ptq": (2, 4, 8), "train": (2, 4, 8)}


@dataclass(frozen=True)
class ModelSpec:
    """One studied model: its task, training options per mode, criteria and the sites searched in train mode."""

    name: str
    kind: str  # the model family: mlp, cnn, resnet, transformer
    model: str
    data: str = "digits"
    data_options: dict[str, Any] = field(default_factory=dict)
    train_options: dict[str, Any] = field(default_factory=dict)  # both modes: the baseline's schedule
    ptq_criterion: dict[str, Any] = field(default_factory=lambda: {"name": "accuracy", "max_drop": 0.01})
    # Training is chaotic: a retrained model lands up to a point away from its baseline even
    # with a 16-bit tensor, so training mode allows 2 points (digits: 450 validation images)
    # where ptq allows 1; the final training loss may be 1.5 times the baseline's plus 0.01.
    train_criterion: dict[str, Any] = field(
        default_factory=lambda: {"name": "converge", "max_drop": 0.02, "loss_tol": 0.5, "loss_abs_tol": 0.01})

    def task(self) -> Any:
        """The task (model and data) of this spec."""
        return make_task(self.model, self.data, **self.data_options)

    def criterion(self, mode: str) -> Any:
        """The criterion a trial of ``mode`` must pass."""
        d = dict(self.ptq_criterion if mode == "ptq" else self.train_criterion)
        return make_criterion(d.pop("name"), **d)


_LM_CRITERION = {"name": "loss", "max_rise": 0.05}
# Every schedule anneals its learning rate (cosine, per epoch): a run that ends at a small rate
# lands where a 16-bit perturbation moves its accuracy by under a point, where a constant rate
# left digits_resnet anywhere between 81% and 99% (experiments/README.md).
_COSINE = {"lr_schedule": "cosine"}
MODELS: dict[str, ModelSpec] = {m.name: m for m in [
    ModelSpec("digits_mlp", "mlp", "digits_mlp", train_options={"epochs": 10, "lr": 0.05, **_COSINE}),
    ModelSpec("digits_cnn", "cnn", "digits_cnn", train_options={"epochs": 10, "lr": 0.05, **_COSINE}),
    ModelSpec("digits_resnet", "resnet", "digits_resnet", train_options={"epochs": 4, "lr": 0.05, **_COSINE}),
    # MNIST-1D is harder (fp32 about 60% accuracy) and its retrained runs scatter more: 3 points.
    ModelSpec("mnist1d_mlp", "mlp", "digits_mlp", "mnist1d", train_options={"epochs": 10, "lr": 0.05, **_COSINE},
              train_criterion={"name": "converge", "max_drop": 0.03, "loss_tol": 0.5}),
    # A byte-level transformer on 64 KiB of the standard library's source.
    ModelSpec("tiny_lm", "transformer", "tiny_lm", "pytext", {"train_bytes": 65_536, "val_bytes": 16_384},
              {"epochs": 2, "lr": 0.003, "optimizer": "adam", "batch_size": 32, **_COSINE},
              ptq_criterion=_LM_CRITERION, train_criterion=_LM_CRITERION),
]}
# Rough cost of one run per (model, mode), to start the longest first when runs fill the cache in parallel.
_COST = {"tiny_lm": 20, "digits_resnet": 4, "digits_cnn": 3, "mnist1d_mlp": 1, "digits_mlp": 1}


@dataclass(frozen=True)
class Study:
    """What a script runs: models, seeds, candidates, and where runs and results go."""

    models: tuple[str, ...]
    seeds: tuple[int, ...]
    candidates: dict[str, tuple[int, ...]]  # per mode
    runs: Path
    out: Path
    quick: bool
    epochs: int | None = None  # overrides every model's epochs (quick mode)

    def config(self) -> dict[str, Any]:
        """The study's settings, as written into each result file."""
        return {"models": list(self.models), "seeds": list(self.seeds), "candidates": self.candidates,
                "quick": self.quick, "epochs override": self.epochs,
                "families": FAMILY_OF_MODE, "torch threads": torch.get_num_threads()}


def study_from_args(argv: Sequence[str] | None, doc: str, models: Sequence[str] = tuple(MODELS),
                    quick_models: Sequence[str] = ("digits_mlp",),
                    default_seeds: Sequence[int] = (0, 1, 2)) -> tuple[Study, Any]:
    """Parse the common ``--quick``, ``--out``, ``--runs``, ``--seeds`` arguments into a :class:`Study`."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny run (seconds) for the smoke test")
    parser.add_argument("--out", type=Path, default=None, help="where the result markdown and figures go")
    parser.add_argument("--runs", type=Path, default=None, help="where run directories are cached")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help=f"seeds (default {' '.join(map(str, default_seeds))}; quick 0 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("BITWIDTH_THREADS", "1")))  # a shared 2-core machine
    quick = args.quick
    study = Study(
        models=tuple(quick_models if quick else models),
        seeds=tuple(args.seeds or ((0, 1) if quick else default_seeds)),
        candidates=QUICK_CANDIDATES if quick else CANDIDATES,
        runs=args.runs or (RUNS / "quick" if quick else RUNS),
        out=args.out or RESULTS,
        quick=quick,
        epochs=2 if quick else None,
    )
    return study, args


def gallop_min(passes: Callable[[int], bool], candidates: Sequence[int], guess: int | None = None) -> int | None:
    """The smallest candidate that passes, assuming pass/fail is monotone; None when the largest fails.

    Starts at the candidate nearest ``guess`` (the middle one without a guess) and steps down
    while it passes, or up until it passes: a good guess costs two trials, where bisecting
    seven candidates costs three or four.

    >>> calls = []
    >>> gallop_min(lambda n: calls.append(n) or n >= 5, [2, 3, 4, 5, 6, 8], guess=5), calls
    (5, [5, 4])
    >>> gallop_min(lambda n: n >= 5, [2, 3, 4, 5, 6, 8]), gallop_min(lambda n: False, [2, 4]) is None
    (5, True)
    """
    c = sorted(candidates)
    i = len(c) // 2 if guess is None else min(range(len(c)), key=lambda k: (abs(c[k] - guess), c[k]))
    if passes(c[i]):
        while i > 0 and passes(c[i - 1]):
            i -= 1
        return c[i]
    for j in range(i + 1, len(c)):
        if passes(c[j]):
            return c[j]
    return None


def run_options(study: Study, model: str, mode: str, seed: int, stop: int | None = None) -> TrialOptions:
    """One run's trial options: the model's schedule (quick mode: the study's epochs), stopped after ``stop`` epochs."""
    opts = {**MODELS[model].train_options, **({"epochs": study.epochs} if study.epochs is not None else {})}
    return TrialOptions(mode=mode, seed=seed, stop_epoch=stop, **opts)


def run_dir(study: Study, model: str, mode: str, seed: int, stop: int | None = None) -> Path:
    """``<runs>/<model>/<mode>[_at<stop>]/seed<k>``: ``_at<k>`` for the checkpoint after epoch k."""
    tag = mode if stop is None else f"{mode}_at{stop}"
    return study.runs / model / tag / f"seed{seed}"


def _record_model(task: Any, baseline: Baseline, pairs: list[tuple[str, str]], kinds: Sequence[str],
                  calib_batches: int, state: str = "trained") -> Any:
    """Record the (site, kind) streams of the fp32 model (``trained`` or ``init`` weights) over calibration batches."""
    loss_fn = getattr(task, "loss_fn", TF.cross_entropy)
    model = task.build_model(0)
    model.load_state_dict(baseline.state_dict if state == "trained" else baseline.init_state_dict)
    model.eval()
    with record(model, layers=sorted({p[0] for p in pairs}), kinds=tuple(kinds)) as rec:
        for x, y in task.calib_batches(max(1, calib_batches)):
            model.zero_grad(set_to_none=True)
            out = model(x)
            if "gradient" in kinds:
                loss_fn(out, y).backward()
    return rec


def _absmax(rec: Any) -> dict[tuple[str, str], float]:
    frame = rec.to_frame()
    return {(r.layer, r.kind): float(r.absmax) for r in frame[~frame["quantized"]].itertuples()}


def ensure_run(study: Study, model: str, mode: str, seed: int, *, stop: int | None = None,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or read back) the search of one model, mode and seed; returns its tables and metadata.

    ``stop`` searches the checkpoint after that many epochs of the model's schedule instead
    of the trained model (:attr:`bitwidth.trial.TrialOptions.stop_epoch`). Keys: ``minima``,
    ``stats``, ``sqnr`` (DataFrames) and ``meta``.
    """
    d = run_dir(study, model, mode, seed, stop)
    d.mkdir(parents=True, exist_ok=True)
    with (d / "run.lock").open("w") as lock:  # two scripts filling the cache at once take turns per run
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _ensure_run(study, model, mode, seed, d, stop, log)


def _cached_meta(study: Study, model: str, mode: str, seed: int, stop: int | None) -> dict[str, Any] | None:
    """The run's metadata if its search finished with the study's candidates and the model's current options."""
    meta_path = run_dir(study, model, mode, seed, stop) / "meta.json"
    if not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text())
    options = json.loads(json.dumps(run_options(study, model, mode, seed, stop).to_dict()))
    fresh = meta.get("candidates") == list(study.candidates[mode]) and meta.get("options") == options
    return meta if fresh else None


def search_minima(pairs: Sequence[tuple[str, str]], candidates: Sequence[int], store: TrialCache,
                  format_of: Callable[[str, str, int], Any], trial: Callable[[dict], TrialOutcome],
                  passes: Callable[[TrialOutcome], bool]) -> pd.DataFrame:
    """Each (site, kind)'s minimum, quantized alone: ``format_of(site, kind, bits)`` runs through
    ``trial(plan)`` (each outcome kept in ``store``) and is judged by ``passes``.

    The search of a pair starts at the median minimum of the pairs of its kind found so far:
    sites of one model and kind need similar widths, so most pairs cost two trials.
    """
    rows: list[dict[str, Any]] = []
    for layer, kind in pairs:
        def ok(n: int, layer: str = layer, kind: str = kind) -> bool:
            fmt = format_of(layer, kind, n)
            key = f"{layer}|{kind}|{fmt.name}"
            if key not in store:
                outcome = trial({layer: QuantSpec(**{kind: fmt})})
                store.put(key, {"bits": n, "metrics": outcome.metrics, "diverged": outcome.diverged,
                                "error": outcome.error, "loss_curve": outcome.loss_curve,
                                "wall_time": outcome.wall_time})
            got = store.get(key)
            return bool(passes(TrialOutcome(got["metrics"], got.get("loss_curve") or [], [], got["diverged"],
                                            got["error"])))

        found = [r["min_bits"] for r in rows if r["kind"] == kind and r["min_bits"] is not None]
        guess = int(np.median(found)) if found else None
        rows.append({"layer": layer, "kind": kind, "min_bits": gallop_min(ok, candidates, guess)})
    return pd.DataFrame(rows, columns=["layer", "kind", "min_bits"]).astype({"min_bits": "Int64"})


def _ensure_run(study: Study, model: str, mode: str, seed: int, d: Path, stop: int | None,
                log: Callable[[str], None]) -> dict[str, Any]:
    spec = MODELS[model]
    cached = _cached_meta(study, model, mode, seed, stop)
    if cached is not None:
        return read_run(d, cached)
    start, cpu_start = time.perf_counter(), time.process_time()
    family = FAMILY_OF_MODE[mode]
    kinds = ("weight", "activation") + (("gradient",) if mode == "train" else ())
    task = spec.task()
    options = run_options(study, model, mode, seed, stop)
    baseline = train_baseline(task, options, cache_dir=d)
    table = coverage(task.build_model(seed), {"*": QuantSpec()}, task.example_input()).table
    pairs = select_pairs(table, list(dict.fromkeys(table["site"])), kinds)

    rec = _record_model(task, baseline, pairs, kinds, options.calib_batches)
    absmax = _absmax(rec)
    if mode == "train":  # gradients are largest early: the binary point must fit the initial weights' too
        for key, v in _absmax(_record_model(task, baseline, pairs, kinds, options.calib_batches, "init")).items():
            absmax[key] = max(absmax.get(key, 0.0), v)
    stats = distribution_table(rec.to_frame(), recorder=rec)
    candidates = study.candidates[mode]
    sq = sweep(rec, family, candidates)[["layer", "kind", "bits", "format", "sqnr_db", "clip_frac",
                                               "flush_frac"]]

    store = TrialCache(d / "trials.jsonl")
    criterion = spec.criterion(mode)

    def format_of(layer: str, kind: str, n: int) -> Any:
        return make_format(family, n, **({"absmax": absmax.get((layer, kind), 0.0)} if family == "fixed" else {}))

    minima = search_minima(pairs, candidates, store, format_of, lambda plan: run_trial(task, plan, options, baseline),
                           lambda out: criterion.passes(out, baseline.metrics, baseline.loss_curve))
    meta = {"model": model, "mode": mode, "seed": seed, "family": family, "candidates": list(candidates),
            "epochs": options.epochs, "stop_epoch": stop, "baseline": baseline.metrics,
            "criterion": criterion.to_dict(), "pairs": len(pairs), "trials": len(store),
            "wall_time_s": time.perf_counter() - start, "cpu_time_s": time.process_time() - cpu_start,
            "options": options.to_dict()}
    minima.to_csv(d / "minima.csv", index=False)
    stats.to_csv(d / "stats.csv", index=False)
    sq.to_csv(d / "sqnr.csv", index=False)
    (d / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
    log(f"{model} {mode} seed {seed}{'' if stop is None else f' at epoch {stop}'}: {len(pairs)} pairs, "
        f"{len(store)} trials, {meta['wall_time_s']:.0f} s")
    return read_run(d, meta)


def _one_thread(fn: Callable[..., Any], *args: Any) -> Any:
    torch.set_num_threads(1)  # one job per core
    return fn(*args)


def parallel(fn: Callable[..., Any], jobs: Sequence[tuple], workers: int | None = None) -> list[Any]:
    """``fn(*job)`` for every job, in forked processes, one per core (in this process when one suffices).

    >>> parallel(divmod, [(7, 2), (9, 4)], workers=1)
    [(3, 1), (2, 1)]
    """
    workers = min(len(jobs), workers or os.cpu_count() or 1)
    if workers <= 1:
        return [fn(*job) for job in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return [f.result() for f in [pool.submit(_one_thread, fn, *job) for job in jobs]]


def _fill(study: Study, model: str, mode: str, seed: int, stop: int | None) -> None:
    ensure_run(study, model, mode, seed, stop=stop)


def fill_cache(study: Study, runs: Iterable[tuple[str, str, int, int | None]]) -> None:
    """Search every (model, mode, seed, stop) not yet cached, one process per core, the costliest first.

    Each run is one process's serial search (torch on one thread), so the cores stay busy
    with whole runs and a killed script loses only the trials in flight.
    """
    todo = [r for r in dict.fromkeys(runs) if _cached_meta(study, *r) is None]
    todo.sort(key=lambda r: -_COST[r[0]] * (6 if r[1] == "train" else 1))
    parallel(_fill, [(study, *r) for r in todo])


def read_run(d: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """A finished search's tables (``minima``, ``stats``, ``sqnr``) as written in ``d``, with ``meta``."""
    minima = pd.read_csv(d / "minima.csv").astype({"min_bits": "Int64"})
    return {"minima": minima, "stats": pd.read_csv(d / "stats.csv"), "sqnr": pd.read_csv(d / "sqnr.csv"),
            "meta": meta}


def run_table(run: dict[str, Any]) -> pd.DataFrame:
    """One run's minima beside each pair's statistics and its SQNR per candidate (``sqnr_<bits>``)."""
    df = run["minima"].merge(run["stats"], on=["layer", "kind"], how="left")
    sq = run["sqnr"].pivot_table(index=["layer", "kind"], columns="bits", values="sqnr_db")
    sq.columns = [f"sqnr_{b}" for b in sq.columns]
    return df.merge(sq.reset_index(), on=["layer", "kind"], how="left")


class TrialCache:
    """Append-only JSON lines of ``{key, value}``; the last line of a key wins."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.items: dict[str, dict] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    e = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill
                    continue
                self.items[e["key"]] = e["value"]

    def __contains__(self, key: str) -> bool:
        return key in self.items

    def __len__(self) -> int:
        return len(self.items)

    def get(self, key: str) -> dict:
        return self.items[key]

    def put(self, key: str, value: dict) -> None:
        self.items[key] = value
        with self.path.open("a") as f:
            f.write(json.dumps({"key": key, "value": value}, default=_json_default) + "\n")
            f.flush()


def _json_default(x: Any) -> Any:
    return None if isinstance(x, float) and math.isnan(x) else str(x)


def collect(study: Study, modes: Iterable[str], *, stop: int | None = None) -> pd.DataFrame:
    """Every (model, mode, seed) run of the study, in long form: one row per (model, mode, seed, layer, kind).

    Columns: ``model, family, mode, seed, layer, kind, min_bits`` and the statistics of
    ``stats.csv``; each run's search wall and CPU seconds are in ``collect.attrs["wall"]`` and ``["cpu"]``.
    """
    modes = list(modes)
    fill_cache(study, [(m, mode, s, stop) for m in study.models for mode in modes for s in study.seeds])
    frames, wall, cpu = [], {}, {}
    for model in study.models:
        for mode in modes:
            for seed in study.seeds:
                run = ensure_run(study, model, mode, seed, stop=stop)
                df = run_table(run)
                df.insert(0, "seed", seed)
                df.insert(0, "mode", mode)
                df.insert(0, "family", MODELS[model].kind)
                df.insert(0, "model", model)
                frames.append(df)
                wall[(model, mode, seed)] = run["meta"]["wall_time_s"]
                cpu[(model, mode, seed)] = run["meta"].get("cpu_time_s", math.nan)
    out = pd.concat(frames, ignore_index=True)
    out.attrs["wall"], out.attrs["cpu"] = wall, cpu
    return out


def md_table(df: pd.DataFrame, formats: dict[str, str] | None = None) -> str:
    """A pipe table of ``df`` (no index), numbers formatted by ``formats``."""
    return table_markdown(Table(df.reset_index(drop=True), formats=formats or {}, index=False))


def write_result(study: Study, name: str, title: str, sections: Sequence[str], wall_s: float) -> Path:
    """Write ``<out>/<name>.md``: title, the study's config and seeds, the sections, the wall time."""
    study.out.mkdir(parents=True, exist_ok=True)
    cfg = json.dumps(study.config(), default=str)
    head = [f"# {title}", "", f"*Made by `python experiments/{name}.py{' --quick' if study.quick else ''}`; "
            f"wall time {wall_s:.0f} s (this script, reusing cached runs where present).*", "",
            f"Config: `{cfg}`", ""]
    path = study.out / f"{name}.md"
    path.write_text("\n".join(head + list(sections)).rstrip() + "\n")
    return path


def save_figure(study: Study, fig: Any, name: str) -> str:
    """Save ``fig`` as ``<out>/<name>.png``; returns the file name for a Markdown link."""
    import matplotlib.pyplot as plt

    study.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(study.out / f"{name}.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f"{name}.png"


def seed_summary(long: pd.DataFrame, keys: Sequence[str], candidates: Sequence[int]) -> pd.DataFrame:
    """Per ``keys`` group: the minima of each seed (``–``: none passed), their median and range.

    The median and range count "no candidate passed" as one above the largest candidate.
    """
    def agg(g: pd.DataFrame) -> pd.Series:
        v = ranked_bits(g, candidates).to_numpy()
        return pd.Series({"seeds": " ".join("–" if pd.isna(b) else str(int(b)) for b in g["min_bits"]),
                          "median": float(np.median(v)), "range": float(v.max() - v.min())})

    return long.groupby(list(keys), sort=False).apply(agg, include_groups=False).reset_index()


def ranked_bits(long: pd.DataFrame, candidates: Sequence[int]) -> pd.Series:
    """``min_bits`` as floats, "no candidate passed" as one above the largest candidate."""
    return long["min_bits"].astype("Float64").fillna(max(candidates) + 1).astype(float)


def sqnr_bits(long: pd.DataFrame, candidates: Sequence[int], threshold: float) -> pd.Series:
    """Per row: the fewest candidate bits whose recorded SQNR reaches ``threshold`` (one above the largest: none)."""
    out = pd.Series(float(max(candidates) + 1), index=long.index)
    for b in sorted(candidates, reverse=True):
        col = f"sqnr_{b}"
        if col in long.columns:
            out[long[col] >= threshold] = float(b)
    return out
