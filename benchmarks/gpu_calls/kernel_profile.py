"""Where one 400M forward+backward of the M2RNN op goes, per kernel: `torch.profiler` over 5 steps after 3 warm-up
steps, the table sorted by CUDA time (device calls of issue 15)."""

import sys

import torch

sys.path.insert(0, "benchmarks")
import bench_m2rnn as b  # noqa: E402
from m2rnn.kernels import M2RNNTritonConfig  # noqa: E402

op = b.ours(M2RNNTritonConfig(cuda_kernels=True))
inputs = b.make_inputs(*b.SHAPES["400M"], requires_grad=True)


def step() -> None:
    y, _ = op(*inputs, gradient_clipping=1.0)
    torch.autograd.grad(y, inputs, torch.ones_like(y))


for _ in range(3):
    step()
torch.cuda.synchronize()
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    for _ in range(5):
        step()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=10))
