"""Run Triton kernels in the interpreter on machines without CUDA (read when kernels are defined, so set it here),
and give every test one CPU thread: tiny models run fastest on one, and pytest-xdist runs one worker per core."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
