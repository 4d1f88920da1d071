"""A plan applied with torchao's per-module configurations: real integer kernels on the CPU.

``to_torchao(model, plan)`` gives each ``nn.Linear`` weight site of the plan the torchao
configuration closest to its formats:

| simulated (weight, activation) | torchao configuration |
| --- | --- |
| int8 weight, no integer activation | ``Int8WeightOnlyConfig`` |
| int8 weight, int activation (≤ 8 bits) | ``Int8DynamicActivationInt8WeightConfig`` |
| int2..int7 weight, no integer activation | ``IntxWeightOnlyConfig(weight_dtype=torch.int<n>)`` per output channel |
| int2..int7 weight, int activation (≤ 8 bits) | ``Int8DynamicActivationIntxWeightConfig`` per output channel |

torchao's activations are int8 with a scale per token computed at run time, where the
simulation used one static scale per tensor, and its weights have a scale per output
channel; the summary says so per site. What torchao has no CPU configuration for
(convolutions, embeddings, attention inputs, float and fixed-point formats, widths above
8 bits) stays in float and is listed, never dropped silently. The packed
``Int4WeightOnlyConfig`` needs the ``mslk`` kernel package, so int4 uses ``IntxWeightOnlyConfig``.

>>> import torch
>>> m, sites = to_torchao(torch.nn.Sequential(torch.nn.Linear(8, 4)), {"0": "int8"})  # doctest: +SKIP
>>> sites[["site", "kind", "deployed"]].values.tolist()  # doctest: +SKIP
[['0', 'weight', 'Int8DynamicActivationInt8WeightConfig'], ['0', 'activation', 'Int8DynamicActivationInt8WeightConfig']]
"""

from __future__ import annotations

import copy
import io
from typing import Any

import pandas as pd
import torch
from torch import nn

from .export_onnx import SITE_COLUMNS, require
from .formats import Format, IntFormat
from .wrap import Plan, resolve_plan

__all__ = ["deploy_torchao", "to_torchao"]



def _int_bits(fmt: Format | None) -> int | None:
    return fmt.bits if isinstance(fmt, IntFormat) and fmt.signed else None


def _config(weight: Format | None, activation: Format | None) -> tuple[Any, str]:
    """torchao's configuration for one Linear, or ``(None, why not)``."""
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8DynamicActivationIntxWeightConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
    )
    from torchao.quantization.granularity import PerAxis

    bits = _int_bits(weight)
    if bits is None or bits > 8:
        what = weight.name if weight is not None else "no weight format"
        return None, f"torchao has no CPU configuration for {what}: left in float"
    act = _int_bits(activation) is not None and activation.bits <= 8  # type: ignore[union-attr]
    if bits == 8:
        return (Int8DynamicActivationInt8WeightConfig() if act else Int8WeightOnlyConfig()), ""
    dtype = getattr(torch, f"int{bits}")
    if act:
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=dtype, weight_granularity=PerAxis(0)), ""
    return IntxWeightOnlyConfig(weight_dtype=dtype, granularity=PerAxis(0)), ""


def to_torchao(model: nn.Module, plan: Plan, *, inplace: bool = False) -> tuple[nn.Module, pd.DataFrame]:
    """``model`` (a copy unless ``inplace``) with ``plan`` applied by torchao; and per (site, kind) what ran.

    The table has the columns of :class:`bitwidth.export_onnx.ExportSummary`'s ``sites``:
    ``site, kind, simulated, deployed`` (the torchao configuration, or ``float``),
    ``granularity, exact, note, stored_bits``. Needs ``pip install 'bitwidth[ao]'``.
    """
    from torchao.quantization import quantize_

    require("torchao", extra="ao")
    m = model if inplace else copy.deepcopy(model)
    m.eval()
    slots = {name: mod for name, mod in m.named_modules()}
    rows = []
    for site, spec in resolve_plan(m, plan).items():
        module = slots.get(site)
        linear = isinstance(module, nn.Linear)
        config, why = _config(spec.weight, spec.activation) if linear else (None, "")
        if not linear:
            what = type(module).__name__ if module is not None else "an op site"
            why = f"torchao's CPU configurations cover nn.Linear only; {site} is {what}: left in float"
        name = type(config).__name__ if config is not None else "float"
        for kind in ("weight", "activation"):
            fmt = getattr(spec, kind)
            if fmt is None:
                continue
            note = why
            if config is not None and kind == "activation":
                note = ("int8 with a scale per token computed at run time (simulated: static per tensor)"
                        if "Dynamic" in name else f"torchao weight-only: activation {fmt.name} left in float")
            elif config is not None and getattr(fmt, "granularity", "tensor") == "tensor":
                note = "a scale per output channel (simulated: per tensor)"
            gran = "token" if kind == "activation" and "Dynamic" in name else "channel" if config else ""
            stored = 8 if config is not None and kind == "weight" else 32  # int8, or sub-8-bit unpacked to int8
            rows.append({"site": site, "kind": kind, "simulated": fmt.name, "deployed": name,
                         "granularity": gran, "exact": False, "note": note, "stored_bits": stored})
        if spec.gradient is not None:
            rows.append({"site": site, "kind": "gradient", "simulated": spec.gradient.name, "deployed": "-",
                         "granularity": "", "exact": True, "note": "training only: not part of inference",
                         "stored_bits": 0})
        if config is not None:
            quantize_(m, config, filter_fn=lambda mod, fqn, site=site: fqn == site)
    return m, pd.DataFrame(rows, columns=SITE_COLUMNS)


def deploy_torchao(task: Any, baseline: Any, options: Any, plan: Plan, batches: list,
                   repeats: int) -> tuple[dict, pd.DataFrame, float, int, int]:
    """(metrics, sites, latency ms per batch, state-dict bytes, batch size) of ``plan`` under torchao."""
    from .export import measure_latency
    from .tasks.base import evaluate

    model = task.build_model(options.seed)
    model.load_state_dict(baseline.state_dict)
    model, sites = to_torchao(model, plan, inplace=True)
    loss_fn = getattr(task, "loss_fn", torch.nn.functional.cross_entropy)
    with torch.inference_mode():
        metrics = evaluate(model, batches, loss_fn)
        x0 = batches[0][0]
        latency = measure_latency(lambda: model(x0), repeats)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return metrics, sites, latency, len(buf.getvalue()), len(x0)

