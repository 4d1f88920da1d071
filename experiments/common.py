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
import fnmatch
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
    "FAMILY_OF_MODE", "HERE", "MODELS", "ModelSpec", "RESULTS", "RUNS", "Study", "TrialCache", "bisect_min",
    "ensure_run",
    "collect", "md_table", "ranked_bits", "save_figure", "seed_summary", "sqnr_bits", "study_from_args", "write_result",
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
    train_mode_options: dict[str, Any] = field(default_factory=dict)  # train mode only: overrides (a shorter schedule)
    ptq_criterion: dict[str, Any] = field(default_factory=lambda: {"name": "accuracy", "max_drop": 0.01})
    # Training is chaotic: a retrained fp32 model lands a point or two away from the baseline,
    # so training mode allows 3 points (digits: 450 validation images) where ptq allows 1.
    train_criterion: dict[str, Any] = field(
        default_factory=lambda: {"name": "converge", "max_drop": 0.03, "loss_tol": 0.5})
    train_layers: tuple[str, ...] = ("*",)

    def task(self) -> Any:
        """The task (model and data) of this spec."""
        return make_task(self.model, self.data, **self.data_options)

    def criterion(self, mode: str) -> Any:
        """The criterion a trial of ``mode`` must pass."""
        d = dict(self.ptq_criterion if mode == "ptq" else self.train_criterion)
        return make_criterion(d.pop("name"), **d)


_LM_CRITERION = {"name": "loss", "max_rise": 0.05}
MODELS: dict[str, ModelSpec] = {m.name: m for m in [
    ModelSpec("digits_mlp", "mlp", "digits_mlp", train_options={"epochs": 10, "lr": 0.05}),
    ModelSpec("digits_cnn", "cnn", "digits_cnn", train_options={"epochs": 10, "lr": 0.05}),
    # In train mode the ResNet's stem, first conv of each block, shortcut and head are searched
    # (15 of its 21 pairs; the second conv of each block left out for time).
    ModelSpec("digits_resnet", "resnet", "digits_resnet", train_options={"epochs": 10, "lr": 0.05},
              train_mode_options={"epochs": 4},
              train_layers=("conv1", "layer1.0.conv1", "layer2.0.conv1", "layer2.0.downsample.0", "fc")),
    # MNIST-1D is harder (fp32 about 60% accuracy) and its runs noisier: 5 points in training mode.
    # Training-mode trials of it (5 epochs) and of the ResNet (4) are shorter: the time budget.
    ModelSpec("mnist1d_mlp", "mlp", "digits_mlp", "mnist1d", train_options={"epochs": 10, "lr": 0.05},
              train_mode_options={"epochs": 5},
              train_criterion={"name": "converge", "max_drop": 0.05, "loss_tol": 0.5}),
    # A byte-level transformer on 64 KiB of the standard library's source. In train mode each
    # trial retrains it, so only three sites are searched there: the last block's query projection
    # and second MLP layer, and the head (every site in ptq).
    ModelSpec("tiny_lm", "transformer", "tiny_lm", "pytext", {"train_bytes": 65_536, "val_bytes": 16_384},
              {"epochs": 2, "lr": 0.003, "optimizer": "adam", "batch_size": 32},
              ptq_criterion=_LM_CRITERION, train_criterion=_LM_CRITERION,
              train_layers=("blocks.1.attn.q_proj", "blocks.1.mlp.fc2", "head")),
]}


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


def bisect_min(passes: Callable[[int], bool], candidates: Sequence[int]) -> int | None:
    """The smallest candidate that passes, assuming pass/fail is monotone; None when the largest fails.

    >>> bisect_min(lambda n: n >= 5, [2, 3, 4, 5, 6, 8])
    5
    >>> bisect_min(lambda n: False, [2, 4]) is None
    True
    """
    c = sorted(candidates)
    if not passes(c[-1]):
        return None
    lo, hi = 0, len(c) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if passes(c[mid]):
            hi = mid
        else:
            lo = mid + 1
    return c[lo]


def _options(spec: ModelSpec, mode: str, seed: int, epochs: int | None) -> TrialOptions:
    opts = {**spec.train_options, **(spec.train_mode_options if mode == "train" else {}),
            **({"epochs": epochs} if epochs is not None else {})}
    return TrialOptions(mode=mode, seed=seed, **opts)


def run_dir(study: Study, model: str, mode: str, seed: int, epochs: int | None = None) -> Path:
    """``<runs>/<model>/<mode>[_e<epochs>]/seed<k>``: epochs only when it differs from the model's schedule."""
    tag = mode if epochs is None else f"{mode}_e{epochs}"
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


def ensure_run(study: Study, model: str, mode: str, seed: int, *, epochs: int | None = None,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or read back) the search of one model, mode and seed; returns its tables and metadata.

    ``epochs`` trains the baseline for that many epochs instead of the model's schedule (a
    checkpoint of the same run: the schedule has no decay and the data order depends on
    seed and epoch only). Keys: ``minima``, ``stats``, ``sqnr`` (DataFrames) and ``meta``.
    """
    d = run_dir(study, model, mode, seed, epochs)
    d.mkdir(parents=True, exist_ok=True)
    with (d / "run.lock").open("w") as lock:  # two scripts filling the cache at once take turns per run
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _ensure_run(study, model, mode, seed, d, epochs, log)


def _ensure_run(study: Study, model: str, mode: str, seed: int, d: Path, epochs: int | None,
                log: Callable[[str], None]) -> dict[str, Any]:
    spec = MODELS[model]
    meta_path = d / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("candidates") == list(study.candidates[mode]):
            return _read_run(d, meta)
    start = time.perf_counter()
    family = FAMILY_OF_MODE[mode]
    kinds = ("weight", "activation") + (("gradient",) if mode == "train" else ())
    task = spec.task()
    options = _options(spec, mode, seed, epochs if epochs is not None else study.epochs)
    baseline = train_baseline(task, options, cache_dir=d)
    table = coverage(task.build_model(seed), {"*": QuantSpec()}, task.example_input()).table
    patterns = ("*",) if mode == "ptq" else spec.train_layers
    names = [n for n in dict.fromkeys(table["site"]) if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    pairs = select_pairs(table, names, kinds)

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
    rows = []
    for layer, kind in pairs:
        def passes(n: int, layer: str = layer, kind: str = kind) -> bool:
            extra = {"absmax": absmax.get((layer, kind), 0.0)} if family == "fixed" else {}
            fmt = make_format(family, n, **extra)
            key = f"{layer}|{kind}|{fmt.name}"
            if key not in store:
                outcome = run_trial(task, {layer: QuantSpec(**{kind: fmt})}, options, baseline)
                store.put(key, {"bits": n, "metrics": outcome.metrics, "diverged": outcome.diverged,
                                "error": outcome.error, "loss_curve": outcome.loss_curve,
                                "wall_time": outcome.wall_time})
            got = store.get(key)
            out = TrialOutcome(got["metrics"], got.get("loss_curve") or [], [], got["diverged"], got["error"])
            return bool(criterion.passes(out, baseline.metrics, baseline.loss_curve))

        rows.append({"layer": layer, "kind": kind, "min_bits": bisect_min(passes, candidates)})
    minima = pd.DataFrame(rows, columns=["layer", "kind", "min_bits"]).astype({"min_bits": "Int64"})
    meta = {"model": model, "mode": mode, "seed": seed, "family": family, "candidates": list(candidates),
            "epochs": options.epochs, "baseline": baseline.metrics, "criterion": criterion.to_dict(),
            "trials": len(store), "wall_time_s": time.perf_counter() - start,
            "options": options.to_dict()}
    minima.to_csv(d / "minima.csv", index=False)
    stats.to_csv(d / "stats.csv", index=False)
    sq.to_csv(d / "sqnr.csv", index=False)
    meta_path.write_text(json.dumps(meta, indent=1, default=str))
    log(f"{model} {mode} seed {seed} epochs {options.epochs}: {len(pairs)} pairs, {len(store)} trials, "
        f"{meta['wall_time_s']:.0f} s")
    return _read_run(d, meta)


def _read_run(d: Path, meta: dict[str, Any]) -> dict[str, Any]:
    minima = pd.read_csv(d / "minima.csv").astype({"min_bits": "Int64"})
    return {"minima": minima, "stats": pd.read_csv(d / "stats.csv"), "sqnr": pd.read_csv(d / "sqnr.csv"),
            "meta": meta}


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


def collect(study: Study, modes: Iterable[str], *, epochs: int | None = None) -> pd.DataFrame:
    """Every (model, mode, seed) run of the study, in long form: one row per (model, mode, seed, layer, kind).

    Columns: ``model, family, mode, seed, layer, kind, min_bits`` and the statistics of
    ``stats.csv``; wall times are in ``collect.attrs["wall"]``.
    """
    frames, wall = [], {}
    for model in study.models:
        for mode in modes:
            for seed in study.seeds:
                run = ensure_run(study, model, mode, seed, epochs=epochs)
                df = run["minima"].merge(run["stats"], on=["layer", "kind"], how="left")
                sq = run["sqnr"].pivot_table(index=["layer", "kind"], columns="bits", values="sqnr_db")
                sq.columns = [f"sqnr_{b}" for b in sq.columns]
                df = df.merge(sq.reset_index(), on=["layer", "kind"], how="left")
                df.insert(0, "seed", seed)
                df.insert(0, "mode", mode)
                df.insert(0, "family", MODELS[model].kind)
                df.insert(0, "model", model)
                frames.append(df)
                wall[(model, mode, seed)] = run["meta"]["wall_time_s"]
    out = pd.concat(frames, ignore_index=True)
    out.attrs["wall"] = wall
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
