"""Deploy a run's plans and measure what the simulation promised against what a runtime delivers.

``deploy_run(run_dir, to="onnx")`` rebuilds the run's task and fp32 baseline from its
files, exports each plan (the joint plan and the best uniform plan by default) with
:func:`bitwidth.export_onnx.export_onnx` or :func:`bitwidth.export_torchao.to_torchao`,
runs it on the validation data in the real runtime (onnxruntime on the CPU, or torchao's
kernels), and writes beside the run's other files:

- ``deploy.csv``: per plan and runtime the simulated and the deployed metric, their gap,
  the file size next to the plan's weight memory, and the CPU latency per batch against
  the fp32 model in the same runtime;
- ``deploy_sites.csv``: per (plan, runtime, site, kind) the simulated and the deployed
  format, whether the deployed numbers are the simulated ones, and how far the deployed
  site's output (one validation batch) lies from the simulation's;
- ``deploy/<plan>.onnx`` and ``deploy/fp32.onnx``.

The simulated metric is a post-training trial of the plan on the baseline weights (the
run's first seed), with the trial's calibration, which the export reuses: the same
weights, scales and data.

>>> PLAN_NAMES
('joint', 'uniform')
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from torch import Tensor, nn

from . import rundir as rd
from .result import read_csv
from .wrap import QuantSpec, plan_from_dict

__all__ = ["DEPLOY_COLUMNS", "PLAN_NAMES", "TARGETS", "OnnxModule", "check_target", "deploy_run", "load_plan",
           "measure_latency"]

TARGETS = ("onnx", "torchao")
PLAN_NAMES = ("joint", "uniform")
DEPLOY_COLUMNS = ["plan", "runtime", "metric", "simulated", "deployed", "gap", "tolerance", "agrees", "file_bytes",
                  "plan_weight_bytes", "deployed_weight_bytes", "latency_ms", "fp32_latency_ms", "speedup",
                  "batch_size", "threads", "exact_sites", "sites", "path"]


def check_target(to: str) -> None:
    """Raise ``ValueError`` for an unknown target or one whose optional packages are missing.

    >>> check_target("tflite")
    Traceback (most recent call last):
    ...
    ValueError: unknown export target 'tflite'; allowed: onnx, torchao
    """
    if to not in TARGETS:
        raise ValueError(f"unknown export target {to!r}; allowed: {', '.join(TARGETS)}")
    from .export_onnx import require

    require(*(("onnx", "onnxruntime", "onnxscript") if to == "onnx" else ("torchao",)),
            extra="export" if to == "onnx" else "ao")


def load_plan(run_dir: str | os.PathLike[str], which: str) -> dict[str, QuantSpec]:
    """The run's ``joint`` plan, its best ``uniform`` plan, or a plan YAML file at a path.

    >>> load_plan("/nonexistent", "joint")
    Traceback (most recent call last):
    ...
    ValueError: /nonexistent has no joint_plan.yaml: not a finished run (run `bitwidth run CONFIG` first)
    """
    run = Path(run_dir)
    if which == "joint":
        if not (run / rd.JOINT_PLAN).exists():
            raise ValueError(f"{run} has no {rd.JOINT_PLAN}: not a finished run (run `bitwidth run CONFIG` first)")
        return _plan_file(run / rd.JOINT_PLAN)
    if which == "uniform":
        return _uniform_plan(run)
    path = Path(which)
    if path.suffix not in (".yaml", ".yml") or not path.is_file():
        raise ValueError(f"--plan is joint, uniform or a plan YAML file (bw.plan_to_dict), got {which!r}")
    return _plan_file(path)


def _plan_file(path: Path) -> dict[str, QuantSpec]:
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path} holds no plan (a mapping of site names or patterns to specs)")
    return plan_from_dict(data)


def _uniform_plan(run: Path) -> dict[str, QuantSpec]:
    """The best uniform plan as the search evaluated it: its stored trial's plan, formats and all."""
    from .store import TrialStore

    summary = _summary(run)
    if not summary:
        raise ValueError(f"{run} has no {rd.SUMMARY}: not a finished run (run `bitwidth run CONFIG` first)")
    bits = (summary.get("uniform") or {}).get("bits")
    if bits is None:
        raise ValueError(f"{run}: no uniform width passed the criterion, so there is no uniform plan to export")
    trials = read_csv(run / rd.TRIALS_CSV)
    rows = trials[(trials["strategy"] == "uniform") & (trials["bits"] == bits)]
    store = TrialStore(run / rd.TRIALS, readonly=True)
    for keys in rows.get("keys", pd.Series(dtype=object)).dropna():
        record = store.get(str(keys).split()[0])
        if record is not None:
            return plan_from_dict(record["plan"])
    raise ValueError(f"{run}: the uniform plan at {bits} bits is not in {rd.TRIALS}")


class OnnxModule(nn.Module):
    """An onnxruntime session as a module: ``forward`` feeds tensors, returns the first output.

    ``outputs`` names extra graph outputs to fetch; they land in :attr:`last` by name.
    """

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None,
                 model_bytes: bytes | None = None, outputs: Sequence[str] = ()) -> None:
        super().__init__()
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(model_bytes or str(path), opts, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]
        self.outputs = [self.session.get_outputs()[0].name, *outputs]
        self.last: dict[str, np.ndarray] = {}

    def forward(self, *inputs: Tensor) -> Tensor:
        feed = {n: x.detach().cpu().numpy() for n, x in zip(self.names, inputs, strict=True)}
        got = self.session.run(self.outputs, feed)
        self.last = dict(zip(self.outputs[1:], got[1:], strict=True))
        return torch.from_numpy(got[0])


def measure_latency(fn: Callable[[], Any], repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` in milliseconds, after ``warmup`` calls.

    >>> measure_latency(lambda: None, repeats=3, warmup=0) >= 0
    True
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _context(run: Path) -> tuple[Any, Any, Any, Any]:
    """(config, task, trial options in ptq, fp32 baseline) of a run directory, from its files."""
    from .config import load_config
    from .run import make_config_task, trial_options
    from .trial import train_baseline

    if not (run / rd.CONFIG).exists():
        raise ValueError(f"{run} is not a run directory (no {rd.CONFIG}); run `bitwidth run CONFIG` first")
    if not (run / rd.BASELINE).exists():
        raise ValueError(f"{run} has no {rd.BASELINE}: the fp32 weights the plans apply to")
    cfg = load_config(run / rd.CONFIG)
    task = make_config_task(cfg)
    options = dataclasses.replace(trial_options(cfg), mode="ptq")  # the baseline's key ignores the mode
    baseline = train_baseline(task, options, cache_dir=run)
    return cfg, task, options, baseline


def deploy_run(
    run_dir: str | os.PathLike[str],
    *,
    to: str = "onnx",
    plans: Sequence[str] | None = None,
    out: str | os.PathLike[str] | None = None,
    repeats: int = 20,
    tolerance: float | None = None,
    progress: Callable[[str], None] | None = None,
    report: bool = True,
) -> pd.DataFrame:
    """Export and measure ``plans`` of a run (``joint``, ``uniform``, or plan YAML paths) in ``to``.

    ``plans`` default: the joint plan, and the best uniform plan when a uniform width passed.
    ``out``: the ONNX file (one plan only; default ``RUN_DIR/deploy/<plan>.onnx``).
    ``tolerance``: how far the deployed metric may lie from the simulated one before
    the report lists the sites that differ (default: 0.5 points of accuracy, else 1%
    of the simulated value). ``report``: rebuild the run's report, which gains the
    "simulation vs deployment" section. Returns the rows of ``deploy.csv``; a plan that
    cannot be loaded raises ``ValueError`` before anything is exported.
    """
    check_target(to)
    run = Path(run_dir)
    if plans is None:
        plans = ["joint", *(["uniform"] if _summary(run).get("uniform", {}).get("bits") is not None else [])]
    if out is not None and (len(plans) != 1 or to != "onnx"):
        raise ValueError("--out names one ONNX file: give exactly one --plan with --to onnx")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    loaded = {name: load_plan(run, name) for name in plans}  # every bad plan fails before any work
    from .store import RunLock

    with RunLock(run):  # a run writing this directory, or another export, would race these files
        table = _deploy(run, loaded, to, out, repeats, tolerance, progress)
        if report:
            from .report import write_report

            write_report(run)
    return table


def _deploy(run: Path, loaded: dict[str, dict[str, QuantSpec]], to: str, out: str | os.PathLike[str] | None,
            repeats: int, tolerance: float | None, progress: Callable[[str], None] | None) -> pd.DataFrame:
    from .trial import run_trial

    cfg, task, options, baseline = _context(run)
    say = progress or (lambda _: None)
    batches = list(task.val_batches())
    x0 = batches[0][0]
    calib = [x for x, _ in task.calib_batches(options.calib_batches or 4)]
    metric = _metric_name(run)
    tol = tolerance if tolerance is not None else (0.005 if "acc" in metric else None)
    rows, site_rows = [], []
    reference: dict[str, float] = {}
    for name, plan in loaded.items():
        label = Path(name).stem if name not in PLAN_NAMES else name
        say(f"{label}: simulating")
        simulated = run_trial(task, plan, options, baseline).metrics
        say(f"{label}: exporting to {to} and measuring")
        if to == "onnx":
            path = Path(out) if out is not None else run / rd.DEPLOY_DIR / f"{label}.onnx"
            deployed, sites, latency, size, batch_size = _deploy_onnx(task, baseline, options, plan, path, calib,
                                                                      batches, repeats)
            if "onnx" not in reference:
                reference["onnx"] = _fp32_onnx_latency(task, baseline, options, run, x0, repeats)
        else:
            from .export_torchao import deploy_torchao

            path = None
            deployed, sites, latency, size, batch_size = deploy_torchao(task, baseline, options, plan, batches,
                                                                        repeats)
            reference.setdefault("torchao", _fp32_torch_latency(task, baseline, options, x0, repeats))
        sim, dep = float(simulated.get(metric, math.nan)), float(deployed.get(metric, math.nan))
        limit = tol if tol is not None else 0.01 * abs(sim)
        memory = _weight_bytes(run, plan, sites)
        rows.append({"plan": label, "runtime": "onnxruntime" if to == "onnx" else "torchao", "metric": metric,
                     "simulated": sim, "deployed": dep, "gap": dep - sim, "tolerance": limit,
                     "agrees": bool(abs(dep - sim) <= limit), "file_bytes": size, **memory,
                     "latency_ms": latency, "fp32_latency_ms": reference[to],
                     "speedup": reference[to] / latency if latency else math.nan, "batch_size": batch_size,
                     "threads": torch.get_num_threads(), "exact_sites": int(sites["exact"].astype(bool).sum()),
                     "sites": len(sites), "path": str(path) if path is not None else ""})
        site_rows.append(sites.assign(plan=label, runtime=rows[-1]["runtime"]))
    table = _store(run, rd.DEPLOY, pd.DataFrame(rows, columns=DEPLOY_COLUMNS), ["plan", "runtime"])
    _store(run, rd.DEPLOY_SITES, pd.concat(site_rows, ignore_index=True), ["plan", "runtime"])
    return table


def _summary(run: Path) -> dict[str, Any]:
    """``summary.yaml`` of a run, empty when absent."""
    return (yaml.safe_load((run / rd.SUMMARY).read_text()) if (run / rd.SUMMARY).exists() else None) or {}


def _metric_name(run: Path) -> str:
    return str((_summary(run).get("baseline") or {}).get("metric_name", "accuracy"))


def _store(run: Path, name: str, new: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Write ``new`` into ``run/name``, replacing the rows of the same (plan, runtime)."""
    path = run / name
    if path.exists():
        old = read_csv(path)
        mine = set(map(tuple, new[keys].astype(str).values.tolist()))
        old = old[[tuple(r) not in mine for r in old[keys].astype(str).values.tolist()]]
        new = pd.concat([old, new], ignore_index=True) if not old.empty else new
    new.to_csv(path, index=False)
    return new


def _weight_bytes(run: Path, plan: dict[str, QuantSpec], sites: pd.DataFrame) -> dict[str, float]:
    """The plan's weight memory as simulated (its bits) and as stored (the deployed types), in bytes."""
    from .cost import CostModel, LayerCost

    layers = _summary(run).get("layer_costs") or {}
    if not layers:
        return {"plan_weight_bytes": math.nan, "deployed_weight_bytes": math.nan}
    costs = CostModel({n: LayerCost(**v) for n, v in layers.items()})
    from .wrap import _resolver, as_spec

    resolve = _resolver({k: as_spec(v) for k, v in plan.items()})  # patterns too: a plan file may hold them
    exact = {n: spec for n in costs.layers if not (spec := resolve(n)).empty}
    stored = {r.site: r.stored_bits / 8 for r in sites.itertuples() if r.kind == "weight"}
    deployed = sum(size.params * stored.get(n, 4) for n, size in costs.layers.items())
    return {"plan_weight_bytes": costs.of(exact)["memory_bits"] / 8, "deployed_weight_bytes": float(deployed)}


def _model(task: Any, baseline: Any, options: Any) -> nn.Module:
    model = task.build_model(options.seed)
    model.load_state_dict(baseline.state_dict)
    return model.eval()


def _deploy_onnx(task: Any, baseline: Any, options: Any, plan: dict[str, QuantSpec], path: Path,
                 calib: list[Tensor], batches: list, repeats: int) -> tuple[dict, pd.DataFrame, float, int, int]:
    from .export_onnx import export_onnx
    from .tasks.base import evaluate

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)  # the trial's calibration sample, drawn the same way
        summary = export_onnx(_model(task, baseline, options), plan, batches[0][0][:1], path, calib=calib)
    module = OnnxModule(path)
    loss_fn = getattr(task, "loss_fn", torch.nn.functional.cross_entropy)
    metrics = evaluate(module, batches, loss_fn)
    x0 = batches[0][0]
    latency = measure_latency(lambda: module(x0), repeats)
    sites = summary.sites.merge(_site_gaps(task, baseline, options, plan, path, calib, x0), how="left",
                                on=["site", "kind"])
    return metrics, sites, latency, summary.file_bytes, len(x0)


def _fp32_onnx_latency(task: Any, baseline: Any, options: Any, run: Path, x0: Tensor, repeats: int) -> float:
    from .export_onnx import export_onnx

    path = run / rd.DEPLOY_DIR / "fp32.onnx"
    export_onnx(_model(task, baseline, options), {}, x0[:1], path)
    module = OnnxModule(path)
    return measure_latency(lambda: module(x0), repeats)


def _fp32_torch_latency(task: Any, baseline: Any, options: Any, x0: Tensor, repeats: int) -> float:
    model = _model(task, baseline, options)
    with torch.inference_mode():
        return measure_latency(lambda: model(x0), repeats)


def _site_gaps(task: Any, baseline: Any, options: Any, plan: dict[str, QuantSpec], path: Path,
               calib: list[Tensor], x: Tensor) -> pd.DataFrame:
    """Per activation site: how far onnxruntime's quantized input lies from the simulation's, on ``x``.

    ``mismatch``: the fraction of elements that differ by more than 1e-5 of the site's
    largest magnitude (a different code, or a different float); ``max_abs_diff`` the largest
    difference. The first site in model order with a mismatch is where the two part.
    """
    import onnx

    from .sites import engine_of
    from .wrap import calibrate, wrap

    model = _model(task, baseline, options)
    wrap(model, plan)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)
        calibrate(model, calib)
    seen: dict[str, Tensor] = {}

    def tap(site: str, kind: str, t: Tensor, quantized: bool) -> None:
        if kind == "activation" and quantized and site not in seen:
            seen[site] = t.detach().clone()

    eng = engine_of(model)
    eng.taps.append(tap)
    eng.refresh()
    with torch.no_grad():
        model(x)
    eng.taps.remove(tap)
    proto = onnx.load(str(path))
    ends = {}
    for site in seen:  # the output of a site's first call: the one its own nodes do not read
        mine = [n for n in proto.graph.node if n.name.startswith(f"{site}.activation/")]
        read = {i for n in mine for i in n.input}
        last = [o for n in mine for o in n.output if o not in read]
        if last:
            ends[site] = last[0]
    have = {o.name for o in proto.graph.output}
    for out in ends.values():
        if out not in have:
            proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(out))
    module = OnnxModule(path, model_bytes=proto.SerializeToString(), outputs=list(ends.values()))
    module(x)
    rows = []
    for site, out in ends.items():
        sim, dep = seen[site].float().numpy(), module.last[out]
        diff = np.abs(sim - dep) if sim.shape == dep.shape else np.full(1, np.inf)
        scale = float(np.abs(sim).max()) if sim.size else 1.0
        rows.append({"site": site, "kind": "activation", "max_abs_diff": float(diff.max()) if diff.size else 0.0,
                     "mismatch": float((diff > 1e-5 * max(scale, 1e-12)).mean()) if diff.size else 0.0})
    return pd.DataFrame(rows, columns=["site", "kind", "max_abs_diff", "mismatch"])
