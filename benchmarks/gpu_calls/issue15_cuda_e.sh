# Issue 15, CUDA kernels, last call: GPU tests of the current kernels (if they fail, the kernel sources of the last
# tested commit, carried in $GOOD, are put back and the failure is reported), then in one process each: the kernel
# table with the CUDA kernels (xma beside), the same with the Triton kernels, and the one-layer swap cost in the
# 400M Hybrid GDN (fla's GDN kernels with their Hopper guard lifted, timing only).
#   WHEELS=.dev-d4/whl XMA=.dev-k/xma_src GOOD=.dev-k/good bash benchmarks/gpu_calls/issue15_cuda_e.sh
source benchmarks/gpu_calls/setup.sh torch triton transformers
phase "gpu tests"
if ! timeout 200 python3 -m pytest -q -m gpu -rs -x tests/test_m2rnn_cuda.py \
    "tests/test_m2rnn_triton.py::test_more_than_2_pow_32_state_elements[cuda]" 2>&1 | tee $OUT/pytest.log | tail -30; then
  echo "!!! GPU tests failed: timing the last tested kernel sources ($GOOD) instead"
  cp "$GOOD"/*.cu "$GOOD"/*.cuh m2rnn/kernels/m2rnn/
fi
phase "forward only: this forward, then the last tested one (GOOD), one process each"
FWD='import sys; sys.path.insert(0, "benchmarks"); import bench_m2rnn as b; from m2rnn.kernels import M2RNNTritonConfig
op = b.ours(M2RNNTritonConfig(cuda_kernels=True)); print({n: round(b.time_forward(*s, op=op), 3) for n, s in b.SHAPES.items()})'
timeout 60 python3 -c "$FWD" 2>&1 | tail -1
cp m2rnn/kernels/m2rnn/cuda_forward.cu /tmp/cuda_forward_now.cu && cp "$GOOD"/cuda_forward.cu m2rnn/kernels/m2rnn/
timeout 60 python3 -c "$FWD" 2>&1 | tail -1
cp /tmp/cuda_forward_now.cu m2rnn/kernels/m2rnn/cuda_forward.cu
phase "bench, CUDA kernels"
timeout 200 python3 benchmarks/bench_m2rnn.py --config cuda_kernels=True --vs-xma "$XMA" --json $OUT/bench_cuda.json \
  2>&1 | tee $OUT/bench_cuda.log | grep -v "^(" | grep -v autotuned | head -20
phase "bench, Triton kernels"
timeout 150 python3 benchmarks/bench_m2rnn.py --json $OUT/bench_triton.json 2>&1 | tee $OUT/bench_triton.log \
  | grep -v "^(" | grep -v autotuned | head -14
phase "one-layer swap, 400M Hybrid GDN, 4K"
timeout 200 python3 benchmarks/bench_model.py --fla-unguarded --only train --quick --warmup 2 --train-repeats 5 \
  --models hybrid-gdn,hybrid-gdn-m2rnn-1l,hybrid-gdn,hybrid-gdn-m2rnn-1l --output-dir $OUT/model 2>&1 \
  | tee $OUT/model.log | grep -E "tok/s|^\|" | tail -12
phase done
