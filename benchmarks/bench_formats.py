"""Throughput of fake quantization against the physical limit of an elementwise op.

For int, fixed and float fake quantization (forward, and forward+backward) this prints
Melem/s on 2^24 float32 elements and the ratio to ``x.clamp(-1, 1)`` measured in the
same run (one read and one write per element). torch's own fake-quant op is in the
same table. Also: a wrapped resnet18 with empty specs vs the plain model.

    python benchmarks/bench_formats.py [--log2n 24] [--repeat 7]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torchvision

import bitwidth as bw
from bitwidth import functional as F


def best_time(fn, repeat: int) -> float:
    fn()  # warm-up (allocator, lazy compilation)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log2n", type=int, default=24)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    n = 2**args.log2n
    x = torch.randn(n, device=args.device)
    xg = x.clone().requires_grad_()
    grad = torch.randn_like(x)

    forward = {
        "clamp (limit)": lambda: x.clamp(-1, 1),
        "torch fake_quant int8": lambda: torch.fake_quantize_per_tensor_affine(x, 0.03, 0, -128, 127),
        "int8": lambda: F.quantize_int(x, 0.03, 0, -128, 127),
        "int8 stochastic": lambda: F.quantize_int(x, 0.03, 0, -128, 127, rounding="stochastic"),
        "e4m3 stochastic": lambda: F.quantize_float(x, 4, 3, max_value=448.0, rounding="stochastic"),
        # What drawing the noise as a tensor costs alone (the eager path, under 2^22 elements).
        "torch.rand (noise alone)": lambda: torch.rand(x.shape, device=x.device),
        "fixed16_8": lambda: F.quantize_fixed(x, 16, 8),
        "e4m3": lambda: F.quantize_float(x, 4, 3, max_value=448.0),
        "e5m2": lambda: F.quantize_float(x, 5, 2),
    }
    backward = {
        "torch fake_quant int8": lambda: torch.fake_quantize_per_tensor_affine(xg, 0.03, 0, -128, 127).backward(grad),
        "int8": lambda: F.quantize_int(xg, 0.03, 0, -128, 127).backward(grad),
        "fixed16_8": lambda: F.quantize_fixed(xg, 16, 8).backward(grad),
        "e4m3": lambda: F.quantize_float(xg, 4, 3, max_value=448.0).backward(grad),
        "int8 stochastic": lambda: F.quantize_int(xg, 0.03, 0, -128, 127, rounding="stochastic").backward(grad),
    }
    print(f"device={args.device} threads={torch.get_num_threads()} n=2^{args.log2n} torch={torch.__version__}")
    limit = best_time(forward["clamp (limit)"], args.repeat)
    print(f"{'op':28s} {'pass':>8s} {'Melem/s':>9s} {'x clamp':>8s}")
    for name, fn in forward.items():
        t = best_time(fn, args.repeat)
        print(f"{name:28s} {'fwd':>8s} {n / t / 1e6:9.0f} {limit / t:8.2f}")
    for name, fn in backward.items():
        t = best_time(fn, args.repeat)
        print(f"{name:28s} {'fwd+bwd':>8s} {n / t / 1e6:9.0f} {limit / t:8.2f}")

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval().to(args.device)
    batch = torch.randn(32, 3, 64, 64, device=args.device)
    wrapped = bw.wrap(copy.deepcopy(model), {})
    with torch.no_grad():
        t_plain = best_time(lambda: model(batch), args.repeat)
        t_wrapped = best_time(lambda: wrapped(batch), args.repeat)
        bw.set_plan(wrapped, {"*": "int8"})
        t_int8 = best_time(lambda: wrapped(batch), args.repeat)
    print(f"resnet18 forward (32x3x64x64): plain {t_plain * 1e3:.1f} ms, wrapped empty {t_wrapped * 1e3:.1f} ms "
          f"({t_wrapped / t_plain:.3f}x), wrapped int8 {t_int8 * 1e3:.1f} ms ({t_int8 / t_plain:.2f}x)")


if __name__ == "__main__":
    main()
