"""Throughput of block-scaled fake quantization beside today's formats and torchao's round trips.

Prints ms and the ratio ``t(x.clamp) / t(format)`` (1.0 = as fast as one elementwise pass;
the issue's targets: forward >= 0.5, forward+backward >= 0.3) on 2^24 float32 elements
shaped (2^24 / 4096, 4096), all measured in the same run: group-wise int, MX and NVFP4
beside int8 per tensor and ``x.clamp``, and torchao's ``MXTensor`` / ``NVFP4Tensor``
quantize-then-dequantize of the same tensor (forward only: they have no backward).

    python benchmarks/bench_blocks.py [--log2n 24] [--repeat 5]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

import bitwidth as bw


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


def torchao_round_trips(x: torch.Tensor) -> dict:
    try:
        from torchao.prototype.mx_formats.mx_tensor import MXTensor
        from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale
    except ImportError:
        print("torchao is not installed: its MX and NVFP4 rows are left out (pip install 'bitwidth[ao]')")
        return {}
    return {
        "torchao MXTensor mxfp4": lambda: MXTensor.to_mx(x, torch.float4_e2m1fn_x2, 32).dequantize(x.dtype),
        "torchao MXTensor mxfp8_e4m3": lambda: MXTensor.to_mx(x, torch.float8_e4m3fn, 32).dequantize(x.dtype),
        "torchao NVFP4Tensor nvfp4": lambda: NVFP4Tensor.to_nvfp4(
            x, 16, per_tensor_scale=per_tensor_amax_to_scale(x.abs().amax())).dequantize(x.dtype),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log2n", type=int, default=24)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    n = 2**args.log2n
    x = torch.randn(n // 4096, 4096, device=args.device)
    xg = x.clone().requires_grad_()
    grad = torch.randn_like(x)
    names = ["int8", "int4_g128", "int4_g32", "mxfp4", "mxfp6_e2m3", "mxfp8_e4m3", "mxint8", "nvfp4"]
    fmts = {name: bw.parse_format(name) for name in names}

    forward = {"clamp (limit)": lambda: x.clamp(-1, 1)}
    forward.update({name: (lambda f=f: f.quantize(x)) for name, f in fmts.items()})
    forward.update(torchao_round_trips(x) if args.device == "cpu" or torch.cuda.is_available() else {})
    backward = {"clamp (limit)": lambda: xg.clamp(-1, 1).backward(grad)}
    backward.update({name: (lambda f=f: f.quantize(xg).backward(grad)) for name, f in fmts.items()})

    print(f"{n:,} float32 elements as {tuple(x.shape)} on {args.device}, {torch.get_num_threads()} threads; "
          f"best of {args.repeat}")
    for title, table in (("forward", forward), ("forward+backward", backward)):
        limit = best_time(table["clamp (limit)"], args.repeat)
        print(f"\n{title:<30} {'ms':>9} {'x clamp':>9}")
        for name, fn in table.items():
            t = limit if name == "clamp (limit)" else best_time(fn, args.repeat)
            print(f"{name:<30} {t * 1e3:9.1f} {limit / t:9.2f}")


if __name__ == "__main__":
    main()
