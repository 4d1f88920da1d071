"""bitwidth: how few bits can each layer's weights, activations and gradients use?

>>> import bitwidth as bw
>>> bw.parse_format("int4").bits
4
"""

from .formats import FixedFormat, FloatFormat, Format, IntFormat, format_from_dict, format_to_dict, parse_format
from .stats import Recorder, analyze, record
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

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "Format",
    "IntFormat",
    "FixedFormat",
    "FloatFormat",
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
]
