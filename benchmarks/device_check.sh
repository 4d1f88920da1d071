#!/usr/bin/env bash
# What only a GPU can check, as one short run (a few minutes on a fresh machine): the
# CUDA tests (wrappers on CUDA; the quantizers on CUDA equal to the eager tensor ops and to
# the CPU kernels, eager below 2^22 elements and fused by Triton above, with in-kernel
# stochastic noise; recording's tensor-op path with pooling) and the benchmarks on the
# device (the quantizers' size sweep beside torch's fake_quantize and torchao).
#
#     bash benchmarks/device_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
python -m pip install -q -e ".[test]"
python -m pytest -q -rs -k cuda tests/
python benchmarks/bench_formats.py --device cuda --log2n 24 --repeat 5
python benchmarks/bench_formats.py --device cuda --sweep --repeat 3
python benchmarks/bench_record.py --device cuda --repeats 5
