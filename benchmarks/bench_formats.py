"""Throughput of fake quantization, ours beside torch's, torchao's, QPyTorch's, Brevitas' and ml_dtypes'.

Default: Melem/s on 2^24 float32 elements for int, fixed and float formats (forward, and
forward+backward), with the ratio to ``x.clamp(-1, 1)`` measured in the same run (one
read and one write per element: the memory's limit), then a wrapped resnet18.

``--sweep``: Melem/s at every size from 2^12 to 2^24 elements (every ``--step`` powers) for
int8, fixed(8,4) and e4m3, nearest and stochastic, forward and forward+backward, beside
torch's ``fake_quantize_per_tensor_affine`` (int8), torchao's ``IntxFakeQuantizer`` (int8,
static per-row scales), QPyTorch's ``float_quantize`` (e4m3), Brevitas' ``IntQuant`` (int8)
and an ml_dtypes float8_e4m3fn round trip, whichever are installed. Repetitions alternate
between the contenders, so every ratio compares timings taken side by side; each figure is
the best of ``--repeat``. It ends with the issue's targets at each size, naming any missed.

``--startup``: what the first call costs in a fresh process: on a cold machine (an empty
cache directory: it compiles every kernel, once), then in a fresh process with that cache,
then in each of two fresh pool workers (spawned).

    python benchmarks/bench_formats.py [--log2n 24] [--repeat 7]
    python benchmarks/bench_formats.py --sweep [--step 2] [--repeat 5] [--threads N]
    python benchmarks/bench_formats.py --startup
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

import torch
import torchvision

import bitwidth as bw
from bitwidth import functional as F

SCALE = 0.03  # int8 over about ±3.8: a standard normal input clips rarely, as activations do


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def best_time(fn, repeat: int, device: str = "cpu") -> float:
    fn()  # warm-up (allocator, lazy compilation)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def interleaved(ops: dict[str, Callable[[], object]], repeat: int, device: str, budget: float = 2e-3) -> dict:
    """Seconds per call of each op: the best of ``repeat`` rounds, each round timing every op in turn.

    A round times enough calls of an op to last ``budget`` seconds, so that small tensors are
    not timed at the clock's resolution.
    """
    calls = {}
    for name, fn in ops.items():
        fn()  # warm-up, and an estimate of the calls per round
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        calls[name] = max(1, int(budget / max(time.perf_counter() - t0, 1e-7)))
    best = dict.fromkeys(ops, float("inf"))
    for _ in range(repeat):
        for name, fn in ops.items():
            t0 = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            sync(device)
            best[name] = min(best[name], (time.perf_counter() - t0) / calls[name])
    return best


# ----------------------------------------------------------------------------- contenders

def ours(n: int, device: str) -> dict[str, tuple[Callable, Callable]]:
    """(forward, forward+backward) of each of our formats and roundings."""
    x = torch.randn(n, device=device)
    xg, g = x.clone().requires_grad_(), torch.randn_like(x)
    quantizers = {
        "int8": lambda t, r: F.quantize_int(t, SCALE, 0, -128, 127, rounding=r),
        "fixed8_4": lambda t, r: F.quantize_fixed(t, 8, 4, rounding=r),
        "e4m3": lambda t, r: F.quantize_float(t, 4, 3, max_value=448.0, rounding=r),
    }
    out = {}
    for name, q in quantizers.items():
        for rounding in ("nearest", "stochastic"):
            label = f"{name} {rounding}"
            out[label] = (lambda q=q, r=rounding: q(x, r), backward(lambda q=q, r=rounding: q(xg, r), xg, g))
    return out


def backward(fn: Callable[[], torch.Tensor], x: torch.Tensor, g: torch.Tensor) -> Callable[[], None]:
    """Forward and backward of ``fn``, with ``x.grad`` reset first as ``zero_grad()`` does: accumulating
    into it would time an extra addition (multi-threaded, so erratic on a shared machine)."""

    def run() -> None:
        x.grad = None
        fn().backward(g)

    return run


def others(n: int, device: str) -> dict[str, tuple[Callable, Callable | None]]:
    """The same work by other libraries, where installed (forward+backward None where it has none)."""
    x = torch.randn(n, device=device)
    xg, g = x.clone().requires_grad_(), torch.randn_like(x)
    out: dict[str, tuple[Callable, Callable | None]] = {
        "torch fake_quantize int8": (
            lambda: torch.fake_quantize_per_tensor_affine(x, SCALE, 0, -128, 127),
            backward(lambda: torch.fake_quantize_per_tensor_affine(xg, SCALE, 0, -128, 127), xg, g)),
    }
    try:
        from torchao.quantization.qat import IntxFakeQuantizeConfig, IntxFakeQuantizer

        fq = IntxFakeQuantizer(IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True, is_dynamic=False))
        rows = x.reshape(-1, 64)
        fq(rows)  # its static scales, once
        out["torchao IntxFakeQuantizer int8"] = (
            lambda: fq(rows), backward(lambda: fq(xg.reshape(-1, 64)).reshape(-1), xg, g))
    except ImportError:
        pass
    try:
        from brevitas.core.function_wrapper import RoundSte, TensorClamp
        from brevitas.core.quant import IntQuant

        iq = IntQuant(narrow_range=False, signed=True, input_view_impl=torch.nn.Identity(),
                      float_to_int_impl=RoundSte(), tensor_clamp_impl=TensorClamp())
        s, z, b = (torch.tensor(v, device=device) for v in (SCALE, 0.0, 8.0))
        out["Brevitas IntQuant int8"] = (lambda: iq(s, z, b, x), backward(lambda: iq(s, z, b, xg), xg, g))
    except ImportError:
        pass
    try:
        from qtorch.quant import float_quantize

        out["QPyTorch e4m3 nearest"] = (lambda: float_quantize(x, 4, 3, rounding="nearest"), None)
        out["QPyTorch e4m3 stochastic"] = (lambda: float_quantize(x, 4, 3, rounding="stochastic"), None)
    except Exception:  # noqa: BLE001 - not installed, or its C++ extension failed to build
        pass
    try:
        import ml_dtypes

        if device == "cpu":
            out["ml_dtypes e4m3 round trip"] = (
                lambda: torch.from_numpy(x.numpy().astype(ml_dtypes.float8_e4m3fn).astype("float32")), None)
    except ImportError:
        pass
    return out


# ----------------------------------------------------------------------------- sweep

def sweep(args) -> None:
    if args.device == "cpu" and F._fuse["enabled"]:
        from bitwidth import kernels

        kernels.warm()  # a cold machine compiles here, before any timing
    sizes = list(range(12, 25, args.step))
    table: dict[tuple[str, str], dict[int, float]] = {}
    t_start = time.perf_counter()
    for log2n in sizes:
        n = 2**log2n
        contenders = {**ours(n, args.device), **others(n, args.device)}
        ops = {}
        for name, (fwd, fwd_bwd) in contenders.items():
            ops[(name, "fwd")] = fwd
            if fwd_bwd is not None:
                ops[(name, "fwd+bwd")] = fwd_bwd
        for key, t in interleaved(ops, args.repeat, args.device).items():
            table.setdefault(key, {})[log2n] = n / t / 1e6
    print(f"device={args.device} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"compiled={'on' if F._fuse['enabled'] else 'off (BITWIDTH_COMPILE=0)'}; Melem/s, best of {args.repeat} "
          f"alternating rounds; sweep {time.perf_counter() - t_start:.0f} s")
    head = f"| {'op':34s} | {'pass':7s} | " + " | ".join(f"2^{k:<4d}" for k in sizes) + " |"
    print(head)
    print("|" + "---|" * (2 + len(sizes)))
    for (name, kind), row in table.items():
        print(f"| {name:34s} | {kind:7s} | " + " | ".join(f"{row[k]:6.0f}" for k in sizes) + " |")
    print()
    for line in targets(table, sizes):
        print(line)


def targets(table: dict, sizes: list[int]) -> list[str]:
    """The issue's targets at every size: one line per target, naming the sizes that miss it."""
    checks = []  # (target, ours key, reference key, factor)
    for fmt in ("int8", "fixed8_4"):
        for kind in ("fwd", "fwd+bwd"):
            checks.append((f"{fmt} nearest {kind} >= torch fake_quantize int8",
                           (f"{fmt} nearest", kind), ("torch fake_quantize int8", kind), 1.0))
    for rounding in ("nearest", "stochastic"):
        checks.append((f"e4m3 {rounding} fwd >= 2x QPyTorch",
                       (f"e4m3 {rounding}", "fwd"), (f"QPyTorch e4m3 {rounding}", "fwd"), 2.0))
    for fmt in ("int8", "fixed8_4", "e4m3"):
        for kind in ("fwd", "fwd+bwd"):
            checks.append((f"{fmt} stochastic {kind} >= 0.7x nearest",
                           (f"{fmt} stochastic", kind), (f"{fmt} nearest", kind), 0.7))
    lines = ["Targets (ratio at each size; '!' marks a miss):"]
    for target, mine, ref, factor in checks:
        if ref not in table:
            lines.append(f"  {target}: not measured ({ref[0]} unavailable)")
            continue
        ratios = {k: table[mine][k] / table[ref][k] for k in sizes}
        missed = [k for k in sizes if ratios[k] < factor]
        cells = " ".join(f"2^{k}:{ratios[k]:.2f}{'!' if k in missed else ''}" for k in sizes)
        verdict = "met" if not missed else "MISSED at " + ", ".join(f"2^{k}" for k in missed)
        lines.append(f"  {target}: {verdict}   [{cells}]")
    return lines


# ----------------------------------------------------------------------------- one size

def one_size(args) -> None:
    n = 2**args.log2n
    x = torch.randn(n, device=args.device)
    xg = x.clone().requires_grad_()
    grad = torch.randn_like(x)

    forward = {
        "clamp (limit)": lambda: x.clamp(-1, 1),
        "torch fake_quant int8": lambda: torch.fake_quantize_per_tensor_affine(x, SCALE, 0, -128, 127),
        "int8": lambda: F.quantize_int(x, SCALE, 0, -128, 127),
        "int8 stochastic": lambda: F.quantize_int(x, SCALE, 0, -128, 127, rounding="stochastic"),
        "e4m3 stochastic": lambda: F.quantize_float(x, 4, 3, max_value=448.0, rounding="stochastic"),
        "fixed16_8": lambda: F.quantize_fixed(x, 16, 8),
        "e4m3": lambda: F.quantize_float(x, 4, 3, max_value=448.0),
        "e5m2": lambda: F.quantize_float(x, 5, 2),
    }
    backward = {
        "torch fake_quant int8": lambda: torch.fake_quantize_per_tensor_affine(xg, SCALE, 0, -128, 127).backward(grad),
        "int8": lambda: F.quantize_int(xg, SCALE, 0, -128, 127).backward(grad),
        "fixed16_8": lambda: F.quantize_fixed(xg, 16, 8).backward(grad),
        "e4m3": lambda: F.quantize_float(xg, 4, 3, max_value=448.0).backward(grad),
        "int8 stochastic": lambda: F.quantize_int(xg, SCALE, 0, -128, 127, rounding="stochastic").backward(grad),
    }
    print(f"device={args.device} threads={torch.get_num_threads()} n=2^{args.log2n} torch={torch.__version__}")
    limit = best_time(forward["clamp (limit)"], args.repeat, args.device)
    print(f"{'op':28s} {'pass':>8s} {'Melem/s':>9s} {'x clamp':>8s}")
    for name, fn in forward.items():
        t = best_time(fn, args.repeat, args.device)
        print(f"{name:28s} {'fwd':>8s} {n / t / 1e6:9.0f} {limit / t:8.2f}")
    for name, fn in backward.items():
        t = best_time(fn, args.repeat, args.device)
        print(f"{name:28s} {'fwd+bwd':>8s} {n / t / 1e6:9.0f} {limit / t:8.2f}")

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval().to(args.device)
    batch = torch.randn(32, 3, 64, 64, device=args.device)
    wrapped = bw.wrap(copy.deepcopy(model), {})
    with torch.no_grad():
        t_plain = best_time(lambda: model(batch), args.repeat, args.device)
        t_wrapped = best_time(lambda: wrapped(batch), args.repeat, args.device)
        bw.set_plan(wrapped, {"*": "int8"})
        t_int8 = best_time(lambda: wrapped(batch), args.repeat, args.device)
    print(f"resnet18 forward (32x3x64x64): plain {t_plain * 1e3:.1f} ms, wrapped empty {t_wrapped * 1e3:.1f} ms "
          f"({t_wrapped / t_plain:.3f}x), wrapped int8 {t_int8 * 1e3:.1f} ms ({t_int8 / t_plain:.2f}x)")


# ----------------------------------------------------------------------------- start-up

def first_call() -> tuple[float, float, int]:
    """Wall and CPU seconds of the first quantizer call (forward and backward) in this process, and the
    kernels it compiled. CPU seconds hardly change when other jobs share the machine; wall seconds do."""
    from bitwidth import kernels

    t0, c0 = time.perf_counter(), time.process_time()
    x = torch.randn(4096, requires_grad=True)
    F.quantize_int(x, 0.1, 0, -128, 127).sum().backward()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return wall, cpu, sum(sum(k.stats.cache_misses.values()) for k in kernels.KERNELS)


def startup(args) -> None:
    code = "import sys; sys.path.insert(0, 'benchmarks'); import bench_formats as b; print(*b.first_call())"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "BITWIDTH_CACHE_DIR": cache}
        for label in ("cold machine (empty cache)", "fresh process, warm cache"):
            t0 = time.perf_counter()
            run = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                                 check=True)
            wall, cpu, compiled = run.stdout.split()
            logged = [line for line in run.stderr.splitlines() if line.startswith("bitwidth:")]
            print(f"{label:28s}: first call {float(wall):6.2f} s ({float(cpu):5.2f} s CPU), {compiled} kernels "
                  f"compiled, whole process {time.perf_counter() - t0:5.1f} s; log: {logged or 'nothing'}")
        os.environ["BITWIDTH_CACHE_DIR"] = cache  # spawned workers inherit it
        with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
            for i, (wall, cpu, compiled) in enumerate(pool.map(first_call_in_worker, range(2))):
                print(f"{f'pool worker {i} (spawned)':28s}: first call {wall:6.2f} s ({cpu:5.2f} s CPU), "
                      f"{compiled} kernels compiled")


def first_call_in_worker(_: int) -> tuple[float, float, int]:
    return first_call()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="sizes 2^12..2^24 beside other libraries")
    parser.add_argument("--startup", action="store_true", help="first-call cost: cold, warm, pool workers")
    parser.add_argument("--step", type=int, default=2, help="sweep every STEP powers of two")
    parser.add_argument("--log2n", type=int, default=24)
    parser.add_argument("--repeat", type=int, default=None, help="rounds (default: 5 with --sweep, else 7)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeat is None:
        args.repeat = 5 if args.sweep else 7
    if args.startup:
        startup(args)
    elif args.sweep:
        sweep(args)
    else:
        one_size(args)


if __name__ == "__main__":
    main()
