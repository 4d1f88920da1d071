"""Test-wide settings."""

import torch

# The suite's models are tiny: one intra-op thread is faster than several on a shared
# 2-core machine, and makes CPU results independent of the machine's core count.
torch.set_num_threads(1)
