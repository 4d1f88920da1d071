"""Every file of a run directory, named in one place (every reader and writer uses these).

::

    <run dir>/
      config.yaml      the resolved config                    CONFIG
      baseline.pt      fp32 weights and curves, per seed      BASELINE
      trials.jsonl     one line per finished trial            TRIALS
      run.lock         held by the run writing the directory   LOCK
      trials.csv  min_bits.csv  costs.csv  joint_plan.yaml  summary.yaml   (RESULT_FILES)
      stats.pt  stats.csv                                     STATS, STATS_CSV
      meta.yaml        versions, seeds, device, wall time     META
      report.html  report.md  plots/*.png                     REPORT_HTML, REPORT_MD, PLOTS
      run.log                                                 LOG
      variants.yaml  comparison.csv   (a run of variants: one run directory per variant inside)
      stats/           what `bitwidth stats` writes           STATS_DIR
      deploy.csv  deploy_sites.csv  deploy/*.onnx   what `bitwidth export` measures   DEPLOY, DEPLOY_SITES, DEPLOY_DIR
      schedule.csv  changes.csv  adaptive.yaml   (mode adaptive) SCHEDULE, CHANGES, ADAPTIVE
      checkpoints/<run>.pt   adaptive runs' checkpoints       CHECKPOINTS

>>> from pathlib import Path
>>> Path("runs/x") / TRIALS
PosixPath('runs/x/trials.jsonl')
"""

from .store import LOCK_FILE as LOCK  # the store takes the lock, and imports nothing of ours

__all__ = [
    "ADAPTIVE", "BASELINE", "CHANGES", "CHECKPOINTS", "COMPARISON", "CONFIG", "COSTS", "JOINT_PLAN", "LOCK", "LOG",
    "META", "MIN_BITS", "PLOTS", "REPORT_HTML", "REPORT_MD", "RESULT_FILES", "SCHEDULE", "STATS", "STATS_CSV",
    "STATS_DIR", "SUMMARY", "TRIALS", "TRIALS_CSV", "VARIANTS",
    "DEPLOY", "DEPLOY_DIR", "DEPLOY_SITES",
]

CONFIG = "config.yaml"
BASELINE = "baseline.pt"
TRIALS = "trials.jsonl"
TRIALS_CSV = "trials.csv"
MIN_BITS = "min_bits.csv"
COSTS = "costs.csv"
JOINT_PLAN = "joint_plan.yaml"
SUMMARY = "summary.yaml"
RESULT_FILES = (TRIALS_CSV, MIN_BITS, COSTS, JOINT_PLAN, SUMMARY)
STATS = "stats.pt"
STATS_CSV = "stats.csv"
META = "meta.yaml"
REPORT_HTML = "report.html"
REPORT_MD = "report.md"
PLOTS = "plots"
LOG = "run.log"
VARIANTS = "variants.yaml"
COMPARISON = "comparison.csv"
STATS_DIR = "stats"
DEPLOY = "deploy.csv"
DEPLOY_SITES = "deploy_sites.csv"
DEPLOY_DIR = "deploy"
SCHEDULE = "schedule.csv"
CHANGES = "changes.csv"
ADAPTIVE = "adaptive.yaml"
CHECKPOINTS = "checkpoints"
