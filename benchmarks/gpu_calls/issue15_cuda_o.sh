# Issue 15, fifth round, call O: the committed kernels (2d72ea6 + the states kernel's early exit past a packed
# sequence's end): the GPU kernel tests, the table beside the authors' xma in the same process (no fla on the path),
# and where the time of one 400M forward+backward goes, per kernel (torch.profiler).
#   WHEELS=.dev-k/whl XMA=.dev-k/xma_src bash benchmarks/gpu_calls/issue15_cuda_o.sh
source benchmarks/gpu_calls/setup.sh torch triton transformers
phase "kernel tests"
timeout 150 python3 -m pytest -q -m gpu -rs tests/test_m2rnn_cuda.py \
    "tests/test_m2rnn_triton.py::test_more_than_2_pow_32_state_elements[cuda]" 2>&1 | tee $OUT/pytest_kernels.log | tail -4
phase "bench, CUDA kernels, xma beside"
timeout 260 python3 benchmarks/bench_m2rnn.py --config cuda_kernels=True --vs-xma "$XMA" --json $OUT/bench_cuda.json \
  2>&1 | tee $OUT/bench_cuda.log | grep -v "^(" | grep -v autotuned | head -30
phase "per-kernel time, 400M fwd+bwd"
timeout 90 python3 - <<'PY' 2>&1 | tee $OUT/profile.log | tail -12
import sys, torch
sys.path.insert(0, "benchmarks")
import bench_m2rnn as b
from m2rnn.kernels import M2RNNTritonConfig
op = b.ours(M2RNNTritonConfig(cuda_kernels=True))
inputs = b.make_inputs(*b.SHAPES["400M"], requires_grad=True)
def step():
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
PY
phase done
