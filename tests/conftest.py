"""Run Triton kernels in the interpreter on machines without CUDA (read when kernels are defined, so set it here)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
