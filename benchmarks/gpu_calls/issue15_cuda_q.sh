# Issue 15, fifth round, call Q. V6 = the committed kernels (2d72ea6 + the states kernel's early exit); V9 = V6 with
# the dq and dk partials head-major, (N, T, K): the caller sums whole (T, K) slabs over the heads instead of a middle
# dimension; V10 = V9 + the reverse walk unrolled by 2 where a warp carries one tile (16K: call P's V8 was 1.8%
# faster there, slower with two tiles). Kernel GPU tests on V10 first; then one process per source set, two passes;
# then the faster set's table beside xma (same process) and its per-kernel time.
#   WHEELS=.dev-k/whl XMA=.dev-k/xma_src bash benchmarks/gpu_calls/issue15_cuda_q.sh
source benchmarks/gpu_calls/setup.sh torch triton transformers
KDIR=m2rnn/kernels/m2rnn
use() { cp "$1"/cuda_*.cu "$1"/cuda_common.cuh "$1"/cuda_kernels.py $KDIR/; }
phase "kernel tests, V10"
use .dev-k/s24/v10
timeout 150 python3 -m pytest -q -m gpu -rs tests/test_m2rnn_cuda.py \
    "tests/test_m2rnn_triton.py::test_more_than_2_pow_32_state_elements[cuda]" 2>&1 | tee $OUT/pytest_kernels.log | tail -4
AB='import sys, json; sys.path.insert(0, "benchmarks"); import bench_m2rnn as b; from m2rnn.kernels import M2RNNTritonConfig
op = b.ours(M2RNNTritonConfig(cuda_kernels=True))
print("RESULT", sys.argv[1], json.dumps({n: (round(b.time_forward(*s, op=op), 3), round(b.time_forward_backward(*s, op=op), 3) if "prefill" not in n else None) for n, s in b.SHAPES.items()}))'
for pass in 1 2; do
  for variant in v6 v9 v10; do
    phase "pass $pass $variant"
    use .dev-k/s24/$variant
    timeout 60 python3 -c "$AB" $variant 2>&1 | grep RESULT | tee -a $OUT/ab.log
  done
done
BEST=$(python3 - $OUT/ab.log <<'PY'
import json, sys, collections
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    _, name, data = line.split(" ", 2)
    d = json.loads(data)
    runs[name].append(d["400M"][1] + d["7B"][1] + d["400M 16K context"][1] / 2)
score = {k: min(v) for k, v in runs.items()}
print(min(score, key=score.get))
PY
)
phase "bench, $BEST, xma beside"
use .dev-k/s24/$BEST
timeout 200 python3 benchmarks/bench_m2rnn.py --config cuda_kernels=True --vs-xma "$XMA" --json $OUT/bench_cuda.json \
  2>&1 | tee $OUT/bench_cuda.log | grep -v "^(" | grep -v autotuned | head -24
phase "per-kernel time, 400M fwd+bwd, $BEST"
timeout 60 python3 - <<'PY' 2>&1 | tee $OUT/profile.log | grep -E "m2rnn|reduce|elementwise" | cut -c1-60,100-160
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
