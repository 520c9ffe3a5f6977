# Issue 15, fourth round, call I: which of the backward's changes pay. One process per kernel source set, two
# passes: GOOD (ad39ad8); B = GOOD + H = fma(1 - f, Z, f H) in the forward and the recomputations; C = B +
# branch-free A2; D = C + the carry in two tfloat32 products (lo in its own accumulator) + output addresses stepped
# per token; E = C + output addresses only; CUR = D with the tfloat32 products chained (call H). The fastest by
# 400M + 7B + 16K/2 forward+backward then runs the kernel GPU tests.
#   WHEELS=.dev-k/whl bash benchmarks/gpu_calls/issue15_cuda_i.sh
source benchmarks/gpu_calls/setup.sh torch triton transformers
KDIR=m2rnn/kernels/m2rnn
use() { cp "$1"/cuda_*.cu "$1"/cuda_common.cuh "$1"/cuda_kernels.py $KDIR/; }
AB='import sys, json; sys.path.insert(0, "benchmarks"); import bench_m2rnn as b; from m2rnn.kernels import M2RNNTritonConfig
op = b.ours(M2RNNTritonConfig(cuda_kernels=True))
print("RESULT", sys.argv[1], json.dumps({n: (round(b.time_forward(*s, op=op), 3), round(b.time_forward_backward(*s, op=op), 3) if "prefill" not in n else None) for n, s in b.SHAPES.items()}))'
for pass in 1 2; do
  for variant in .dev-k/good .dev-k/var/B .dev-k/var/C .dev-k/var/D .dev-k/var/E .dev-k/cur; do
    phase "pass $pass $variant"
    use $variant
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
for k, v in sorted(score.items(), key=lambda x: x[1]): print(f"{k}: {v:.3f}", file=sys.stderr)
print(min(score, key=score.get))
PY
)
phase "kernel tests, best = $BEST"
use $BEST
timeout 150 python3 -m pytest -q -m gpu -rs -x tests/test_m2rnn_cuda.py \
    "tests/test_m2rnn_triton.py::test_more_than_2_pow_32_state_elements[cuda]" 2>&1 | tee $OUT/pytest_kernels.log | tail -4
phase done
