"""The compiled CPU kernels' start-up: compiled once per machine into the cache directory, loaded
(never recompiled) by every later process, pool workers included; BITWIDTH_COMPILE=0 bypasses them."""

import multiprocessing as mp
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numba
import numpy as np
import pytest
import torch

from bitwidth import functional as F
from bitwidth import kernels

needs_compile = pytest.mark.skipif(not F._fuse["enabled"], reason="compiled kernels disabled by BITWIDTH_COMPILE=0")


def first_calls() -> dict:
    """In a fresh process: the time of the first quantizer call, and whether any kernel compiled."""
    t0 = time.perf_counter()
    x = torch.randn(4096, requires_grad=True)
    F.quantize_int(x, 0.1, 0, -128, 127).sum().backward()
    first = time.perf_counter() - t0
    F.quantize_float(x.detach().double(), 4, 3, rounding="stochastic")
    return {"first_call_s": first, "compiled": sum(sum(k.stats.cache_misses.values()) for k in kernels.KERNELS),
            "loaded": sum(sum(k.stats.cache_hits.values()) for k in kernels.KERNELS),
            "cache": str(kernels.CACHE_DIR)}


@needs_compile
def test_pool_workers_load_the_cache_without_compiling():
    kernels.warm()  # this process has compiled (a cold machine) or found the cache warm
    with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
        reports = [pool.submit(first_calls).result() for _ in range(2)]
    for r in reports:
        assert r["compiled"] == 0 and r["loaded"] >= 2 and r["cache"] == str(kernels.CACHE_DIR), r


@needs_compile
def test_every_call_uses_a_signature_warm_compiled():
    """No call compiles a new specialisation, which on a cold machine would pause in mid-run."""
    kernels.warm()
    warmed = {k: set() for k in kernels.KERNELS}
    for dtype in (np.float32, np.float64):
        for kernel, args in kernels._examples(dtype):
            warmed[kernel].add(tuple(numba.typeof(a) for a in args))
    x = torch.randn(6, 35)
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        xd = x.to(dtype).requires_grad_()
        for rounding in ("nearest", "stochastic"):
            ys = [F.quantize_int(xd, 0.1, 2, -8, 7, rounding=rounding),
                  F.quantize_int(xd, torch.rand(35) + 0.1, 0, -8, 7, axis=1, rounding=rounding),
                  F.quantize_int(xd.t(), torch.rand(35, dtype=torch.float64) + 0.1, torch.zeros(35, dtype=torch.int32),
                                 0, 15, axis=0, rounding=rounding),
                  F.quantize_fixed(xd, 8, 4, rounding=rounding),
                  F.quantize_float(xd, 4, 3, max_value=448.0, rounding=rounding)]
            torch.autograd.grad(sum(y.sum() for y in ys), xd)
    for k in kernels.KERNELS:
        assert k.signatures and set(k.signatures) <= warmed[k], (k.__name__, set(k.signatures) - warmed[k])


@needs_compile
@pytest.mark.parametrize("layout", ["per-tensor", "channels-first", "channels-last", "float"])
def test_threaded_chunks_equal_one_thread_bit_for_bit(layout, monkeypatch):
    """A large tensor is cut into one chunk per torch thread: values, stochastic noise and gradients unchanged."""
    monkeypatch.setattr(kernels, "PARALLEL_MIN_NUMEL", 1 << 12)  # cut small tensors too: the test stays fast
    x = torch.randn(64, 97) * 3
    scales = torch.rand(97) + 0.05

    def quantize(rounding: str, threads: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch.set_num_threads(threads)
        xg = x.clone().requires_grad_()
        gen = torch.Generator().manual_seed(5)
        if layout == "per-tensor":
            y = F.quantize_int(xg, 0.1, 0, -8, 7, rounding=rounding, generator=gen)
        elif layout == "channels-first":
            y = F.quantize_int(xg.t(), scales, 0, -8, 7, axis=0, rounding=rounding, generator=gen)
        elif layout == "channels-last":
            y = F.quantize_int(xg, scales, 0, -8, 7, axis=1, rounding=rounding, generator=gen)
        else:
            y = F.quantize_float(xg, 2, 1, rounding=rounding, generator=gen)
        return y.detach(), torch.autograd.grad((y * torch.arange(y.numel()).reshape(y.shape)).sum(), xg)[0]

    threads = torch.get_num_threads()
    try:
        for rounding in ("nearest", "stochastic"):
            one, three = quantize(rounding, 1), quantize(rounding, 3)
            assert torch.equal(one[0], three[0]) and torch.equal(one[1], three[1]), rounding
            assert kernels._pools, "nothing ran on the threads"
    finally:
        torch.set_num_threads(threads)


def run_fresh(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, **env}, cwd=Path(__file__).parent.parent)


@pytest.mark.slow
@needs_compile
def test_cold_cache_compiles_once_with_one_log_line_then_loads(tmp_path):
    code = ("import torch; from tests.test_kernels import first_calls; r = first_calls(); "
            "print(r['compiled'], r['loaded'])")
    cold = run_fresh(code, BITWIDTH_CACHE_DIR=str(tmp_path))
    compiling = [line for line in cold.stderr.splitlines() if "compiling" in line]
    assert len(compiling) == 1 and str(tmp_path) in compiling[0], cold.stderr
    assert list(tmp_path.glob("numba/ready-*")) and list(tmp_path.rglob("*.nbi"))
    warm = run_fresh(code, BITWIDTH_CACHE_DIR=str(tmp_path))
    assert "compiling" not in warm.stderr and warm.stdout.split()[0] == "0", warm.stdout + warm.stderr


def test_bitwidth_compile_0_uses_the_tensor_ops():
    code = ("import sys, torch; from bitwidth import functional as F; "
            "y = F.quantize_int(torch.tensor([0.26, -3.0]), 0.5, 0, -4, 3); "
            "print(y.tolist(), 'bitwidth.kernels' in sys.modules)")
    assert run_fresh(code, BITWIDTH_COMPILE="0").stdout.split() == ["[0.5,", "-2.0]", "False"]
