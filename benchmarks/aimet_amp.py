"""AIMET's automatic mixed precision (AMP) on digits_cnn, for bench_search.py's optional row.

Runs inside the virtual environment that ``bench_search.py --aimet`` creates (aimet-torch is
never a dependency of bitwidth). Same task, baseline schedule, candidates (integer widths
2..8, weight and activation of a layer at the same width: AMP groups them) and tolerance
(1 point of accuracy) as the quickstart row. Prints one JSON line: samples evaluated, the
number of evaluations, wall time and the chosen widths.

    python benchmarks/aimet_amp.py BASELINE_DIR RESULTS_DIR
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from aimet_torch.common.defs import CallbackFunc, QuantizationDataType
from aimet_torch.mixed_precision import choose_mixed_precision
from aimet_torch.quantsim import QuantizationSimModel

from bitwidth.tasks import make_task
from bitwidth.tasks.base import evaluate
from bitwidth.trial import TrialOptions, train_baseline


def main() -> None:
    baseline_dir, results_dir = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    task, options = make_task("digits_cnn"), TrialOptions(epochs=10)
    base = train_baseline(task, options, cache_dir=baseline_dir)
    model = task.build_model(0)
    model.load_state_dict(base.state_dict)
    model.eval()
    val = list(task.val_batches())
    calib = [x for x, _ in task.calib_batches(options.calib_batches)]
    count = {"samples": 0, "evaluations": 0}

    def accuracy(m: torch.nn.Module, *_: object) -> float:
        count["samples"] += sum(len(y) for _, y in val)
        count["evaluations"] += 1
        return evaluate(m, val)["accuracy"]

    def calibrate(m: torch.nn.Module, *_: object) -> None:
        with torch.no_grad():
            for x in calib:
                m(x)

    dummy = task.example_input()
    start = time.perf_counter()
    sim = QuantizationSimModel(model, dummy, default_output_bw=8, default_param_bw=8)
    sim.compute_encodings(calibrate)
    candidates = [((n, QuantizationDataType.int), (n, QuantizationDataType.int)) for n in (2, 3, 4, 5, 6, 8)]
    evaluate_cb = CallbackFunc(accuracy, None)
    choose_mixed_precision(sim, dummy, candidates, evaluate_cb, evaluate_cb, allowed_accuracy_drop=0.01,
                           results_dir=str(results_dir), clean_start=True,
                           forward_pass_callback=CallbackFunc(calibrate, None))
    wall = time.perf_counter() - start
    final = accuracy(sim.model)
    widths = {name: [q.bitwidth for q in (*module.input_quantizers, *module.param_quantizers.values())
                     if q is not None]
              for name, module in sim.model.named_modules() if hasattr(module, "param_quantizers")}
    print(json.dumps({**count, "wall_s": wall, "val_size": sum(len(y) for _, y in val),
                      "baseline": base.metrics["accuracy"], "accuracy": final, "widths": widths}))


if __name__ == "__main__":
    main()
