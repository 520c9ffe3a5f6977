# Issue 15, fourth round, call G: GPU tests of the backward that walks sub-chunk x back while recomputing x - 1
# (and of H = fma(1 - f, Z, f H) in both kernels), then an A/B of the kernel sources in one process each,
# alternated: NEW (.dev-k/new), NEW without the fused visits (sed), GOOD (.dev-k/good: ad39ad8, tested in call F).
#   WHEELS=.dev-k/whl bash benchmarks/gpu_calls/issue15_cuda_g.sh
source benchmarks/gpu_calls/setup.sh torch triton transformers
KDIR=m2rnn/kernels/m2rnn
use() { cp "$1"/cuda_*.cu "$1"/cuda_common.cuh "$1"/cuda_kernels.py $KDIR/; }
phase "gpu tests, NEW"
use .dev-k/new
timeout 200 python3 -m pytest -q -m gpu -rs -x tests/test_m2rnn_cuda.py \
  "tests/test_m2rnn_triton.py::test_more_than_2_pow_32_state_elements[cuda]" 2>&1 | tee $OUT/pytest.log | tail -15
mkdir -p /tmp/nofuse && cp .dev-k/new/* /tmp/nofuse/
sed -i 's/} else if (visit.a2 >= 0 \&\& b_steps == SUB) {/} else if (false) {/' /tmp/nofuse/cuda_backward.cu
grep -c "else if (false)" /tmp/nofuse/cuda_backward.cu
AB='import sys, json; sys.path.insert(0, "benchmarks"); import bench_m2rnn as b; from m2rnn.kernels import M2RNNTritonConfig
op = b.ours(M2RNNTritonConfig(cuda_kernels=True))
print(sys.argv[1], json.dumps({n: (round(b.time_forward(*s, op=op), 3), round(b.time_forward_backward(*s, op=op), 3) if "prefill" not in n else None) for n, s in b.SHAPES.items()}))'
for variant in .dev-k/new .dev-k/good /tmp/nofuse .dev-k/new .dev-k/good /tmp/nofuse; do
  phase "A/B $variant"
  use $variant
  timeout 90 python3 -c "$AB" $variant 2>&1 | tail -1 | tee -a $OUT/ab.log
done
use .dev-k/new
phase done
