"""Recording overhead: forward+backward step time with ``bw.record`` on vs off.

Models: the digits CNN on real digits batches (32 images, 1x8x8) and torchvision
resnet18 (batch 32, 3x64x64). Off and on blocks alternate so that load from other
processes hits both alike; each figure is the median over blocks, in wall time and in
process CPU time (the CPU figure is the steadier one on a shared machine). An "on"
block is one whole ``with record(...)`` (entry, steps, exit), so the exit work counts.
The ratio is the median over adjacent (off, on) pairs, the times the medians over blocks.

    python benchmarks/bench_record.py [--steps 5] [--repeats 5] [--threads N] [--models digits resnet18] [--device cuda]

The digits blocks run 40x the steps (its steps are ~1000x shorter).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torchvision
from torch import nn

from bitwidth.stats import record
from bitwidth.tasks.digits import load_digits_split
from bitwidth.tasks.models import digits_cnn


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()

    return step


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def block(step: Callable[[], None], steps: int, model: nn.Module | None, every: int | None) -> tuple[float, float]:
    """Seconds per step (wall, CPU) for one block; recording when ``model`` is given."""
    sync()
    t, c = time.perf_counter(), time.process_time()
    if model is None:
        for _ in range(steps):
            step()
    else:
        with record(model, every=every) as rec:
            for _ in range(steps):
                step()
                rec.step()
    sync()
    return (time.perf_counter() - t) / steps, (time.process_time() - c) / steps


def bench(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, repeats: int) -> None:
    step = make_step(model, x, y)
    for _ in range(3):
        step()
    for label, every in (("record()", None), ("record(every=1), step() each batch", 1)):
        block(step, 2, model, every)  # warm-up
        off, on = [], []
        for i in range(repeats):
            # Adjacent blocks form a pair, in alternating order: the ratio is taken per pair,
            # so a machine whose speed drifts (shared cores) shifts both halves alike.
            for recording in (False, True) if i % 2 == 0 else (True, False):
                if recording:
                    on.append(block(step, steps, model, every))
                else:
                    off.append(block(step, steps, None, None))
        wall, cpu = (statistics.median(b[k] / a[k] for a, b in zip(off, on, strict=True)) for k in (0, 1))
        w_off, w_on = (statistics.median(t[0] for t in ts) for ts in (off, on))
        print(f"{name:34s} {label:36s} off {w_off * 1e3:8.2f} ms  on {w_on * 1e3:8.2f} ms  "
              f"ratio {wall:5.2f}x wall  {cpu:5.2f}x cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="resnet18 steps per timed block")
    parser.add_argument("--repeats", type=int, default=5, help="off/on block pairs")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--models", nargs="+", choices=("digits", "resnet18"), default=("digits", "resnet18"))
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: the tensor-op path with pooling")
    args = parser.parse_args()
    dev = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {dev}")
    torch.manual_seed(0)
    if "digits" in args.models:
        xt, yt, _, _ = load_digits_split()
        bench("digits_cnn  batch 32  1x8x8", digits_cnn().to(dev), xt[:32].to(dev), yt[:32].to(dev), args.steps * 40,
              args.repeats)
    if "resnet18" in args.models:
        resnet = torchvision.models.resnet18(num_classes=10).to(dev)
        x, y = torch.randn(32, 3, 64, 64, device=dev), torch.randint(0, 10, (32,), device=dev)
        bench("resnet18    batch 32  3x64x64", resnet, x, y, args.steps, args.repeats)


if __name__ == "__main__":
    main()
