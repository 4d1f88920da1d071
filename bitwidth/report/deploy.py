"""The report's "Simulation vs deployment" section, from ``deploy.csv`` and ``deploy_sites.csv``.

``bitwidth export RUN_DIR`` writes those files (:mod:`bitwidth.export`); this module only
reads them. The section answers: does the deployed model score what the simulation
promised, how big is its file against the plan's weight memory, and how fast does it run
against fp32 in the same runtime? Where a plan's gap exceeds its tolerance, it lists the
sites whose deployed inputs differ from the simulated ones, first difference first.

>>> import tempfile
>>> deploy_section(tempfile.mkdtemp(), "accuracy") is None
True
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from .. import rundir as rd
from ..result import format_metric, read_csv
from .document import Section, Table, Text

__all__ = ["deploy_section"]


def _points(metric: str, value: float) -> str:
    return f"{value * 100:+.2f} pt" if "acc" in metric else f"{value:+.4g}"


def deploy_section(run_dir: str | os.PathLike[str], metric: str) -> Section | None:
    """The section, or None when the run has not been exported (no ``deploy.csv``)."""
    path = Path(run_dir)
    if not (path / rd.DEPLOY).exists():
        return None
    table = read_csv(path / rd.DEPLOY)
    if table.empty:
        return None
    sites = read_csv(path / rd.DEPLOY_SITES) if (path / rd.DEPLOY_SITES).exists() else pd.DataFrame()
    lines = []
    for r in table.itertuples():
        verdict = "within" if str(r.agrees) == "True" else "BEYOND"
        lines.append(f"{r.plan} in {r.runtime}: {format_metric(r.metric, r.deployed, 2)} deployed against "
                     f"{format_metric(r.metric, r.simulated, 2)} simulated ({_points(r.metric, r.gap)}, {verdict} "
                     f"the tolerance of {_points(r.metric, r.tolerance).lstrip('+')})")
    blocks: list = [Text("; ".join(lines) + ".", "lead")]
    shown = pd.DataFrame({
        "plan": table["plan"], "runtime": table["runtime"], f"simulated {metric}": table["simulated"],
        f"deployed {metric}": table["deployed"],
        "gap (pt)" if "acc" in metric else "gap": table["gap"] * (100 if "acc" in metric else 1),
        "file (KiB)": table["file_bytes"] / 1024, "plan weights (KiB)": table["plan_weight_bytes"] / 1024,
        "stored weights (KiB)": table["deployed_weight_bytes"] / 1024, "ms / batch": table["latency_ms"],
        "fp32 ms / batch": table["fp32_latency_ms"], "speed-up": table["speedup"],
        "batch": table["batch_size"], "exact sites": [f"{e}/{n}" for e, n in zip(table["exact_sites"], table["sites"],
                                                                                   strict=True)]})
    pct = ".2%" if "acc" in metric else ".4g"
    blocks.append(Table(shown, caption="Simulation vs deployment: the simulated metric is bitwidth's post-training "
                        "trial of the plan on the fp32 baseline's weights with the trial's calibration, which the "
                        "export reuses; latency is the median per validation batch on the CPU, against the fp32 "
                        "model in the same runtime", index=False,
                        formats={f"simulated {metric}": pct, f"deployed {metric}": pct, "gap (pt)": "+.2f",
                                 "gap": "+.4g", "file (KiB)": ".1f", "plan weights (KiB)": ".1f",
                                 "stored weights (KiB)": ".1f", "ms / batch": ".2f", "fp32 ms / batch": ".2f",
                                 "speed-up": ".2f"}))
    blocks.append(Text("Plan weights count each weight at its simulated width (the plan's weight-memory figure); "
                       "stored weights at the width the runtime stores (int3 in int4, weights torchao leaves in "
                       "float at 32 bits). The file adds biases, scales and the graph.", "note"))
    if not sites.empty:
        changed = sites[(sites["note"].astype(object).fillna("").astype(str) != "")
                        | (sites["exact"].astype(str) != "True")]
        if not changed.empty:
            blocks.append(Table(changed[["plan", "runtime", "site", "kind", "simulated", "deployed", "exact",
                                         "note"]],
                                caption="What the export changed: sites stored wider than simulated, and sites whose "
                                        "deployed numbers are not the simulated ones (exact = no)", index=False))
        for r in table.itertuples():
            if str(r.agrees) == "True" or "mismatch" not in sites.columns:
                continue
            ours = sites[(sites["plan"] == r.plan) & (sites["runtime"] == r.runtime)]
            mine = ours[ours["mismatch"] > 0]
            if ours["mismatch"].isna().all():
                blocks.append(Text(f"{r.plan} in {r.runtime}: site outputs are compared for ONNX exports; here the "
                                   "format changes listed above are the sites that differ.", "note"))
                continue
            if mine.empty:
                blocks.append(Text(f"{r.plan} in {r.runtime}: no site's input differs on the compared batch; "
                                   "the gap comes from elsewhere (the ops between sites).", "note"))
                continue
            blocks.append(Table(mine[["site", "kind", "simulated", "deployed", "mismatch", "max_abs_diff"]],
                                caption=f"{r.plan} in {r.runtime}: the sites whose deployed input differs from the "
                                        f"simulated one on one validation batch, in model order (the first is where "
                                        "the two part); mismatch is the fraction of elements that differ",
                                index=False, formats={"mismatch": ".2%", "max_abs_diff": ".3g"}))
    return Section("Simulation vs deployment", "deployment", "answer", blocks)
