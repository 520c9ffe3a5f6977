# Issue 15, fifth round, call M: the backward's instruction cuts, each on its own. BASE = a3ec420; V1 = one struct
# per step of a visit's inputs (one base address per step) and the outputs' addresses stepped back by one token;
# V2 = V1 + the carry's three products in one accumulator; V3 = V2 + v read once per step (A1, A2, B);
# V4 = V3 + df summed over lanes once per visit through shared memory; V5 = V3 + the reverse walk unrolled by 2
# (185 registers: two blocks per SM). The GPU kernel tests run on V4 first, then one process per source set, two
# passes.
#   WHEELS=.dev-k/whl bash benchmarks/gpu_calls/issue15_cuda_m.sh
source benchmarks/gpu_calls/setup.sh torch triton transformers
KDIR=m2rnn/kernels/m2rnn
use() { cp "$1"/cuda_*.cu "$1"/cuda_common.cuh "$1"/cuda_kernels.py $KDIR/; }
phase "kernel tests, V4"
use .dev-k/s24/v4
timeout 150 python3 -m pytest -q -m gpu -rs tests/test_m2rnn_cuda.py \
    "tests/test_m2rnn_triton.py::test_more_than_2_pow_32_state_elements[cuda]" 2>&1 | tee $OUT/pytest_kernels.log | tail -4
AB='import sys, json; sys.path.insert(0, "benchmarks"); import bench_m2rnn as b; from m2rnn.kernels import M2RNNTritonConfig
op = b.ours(M2RNNTritonConfig(cuda_kernels=True))
print("RESULT", sys.argv[1], json.dumps({n: (round(b.time_forward(*s, op=op), 3), round(b.time_forward_backward(*s, op=op), 3) if "prefill" not in n else None) for n, s in b.SHAPES.items()}))'
for pass in 1 2; do
  for variant in base v1 v2 v3 v4 v5; do
    phase "pass $pass $variant"
    use .dev-k/s24/$variant
    timeout 60 python3 -c "$AB" $variant 2>&1 | grep RESULT | tee -a $OUT/ab.log
  done
done
phase done
