"""bitwidth: how few bits can each layer's weights, activations and gradients use?

>>> import bitwidth as bw
>>> bw.parse_format("int4").bits
4
"""

from ._version import __version__
from .adaptive import KindPolicy, PrecisionController
from .coverage import Coverage, coverage, sites
from .export_onnx import ExportSummary, export_onnx
from .export_torchao import to_torchao
from .families import make_format
from .formats import (
    FixedFormat,
    FloatFormat,
    Format,
    GroupIntFormat,
    IntFormat,
    MXFormat,
    NVFP4Format,
    format_from_dict,
    format_to_dict,
    parse_format,
)
from .registry import register_module
from .result import SearchResult
from .runner import run_search
from .stats import Recorder, analyze, predict_min_bits, record
from .tasks import Task, make_task
from .trial import TrialOptions
from .wrap import (
    QuantSpec,
    calibrate,
    plan_from_dict,
    plan_of,
    plan_to_dict,
    quant_layers,
    resolve_plan,
    set_plan,
    unwrap,
    wrap,
)

__all__ = [
    "__version__",
    "make_format",
    "SearchResult",
    "run_search",
    "predict_min_bits",
    "Task",
    "make_task",
    "TrialOptions",
    "Format",
    "IntFormat",
    "FixedFormat",
    "FloatFormat",
    "GroupIntFormat",
    "MXFormat",
    "NVFP4Format",
    "parse_format",
    "format_from_dict",
    "format_to_dict",
    "QuantSpec",
    "wrap",
    "unwrap",
    "set_plan",
    "plan_of",
    "resolve_plan",
    "calibrate",
    "quant_layers",
    "plan_to_dict",
    "plan_from_dict",
    "record",
    "Recorder",
    "analyze",
    "sites",
    "coverage",
    "Coverage",
    "register_module",
    "PrecisionController",
    "KindPolicy",
    "export_onnx",
    "ExportSummary",
    "to_torchao",
]
