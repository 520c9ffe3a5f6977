# Issue 15, CUDA backward, first call: GPU tests of the CUDA kernels (forward and backward), then the kernel table
# with both CUDA kernels (xma beside) and with the Triton kernels, in one process each, same machine.
#   WHEELS=.dev-k/whl XMA=.dev-k/xma_src bash benchmarks/gpu_calls/issue15_cuda_b.sh
source benchmarks/gpu_calls/setup.sh torch triton transformers
phase "gpu tests"
timeout 240 python3 -m pytest -q -m gpu -rs -x tests/test_m2rnn_cuda.py 2>&1 | tee $OUT/pytest.log | tail -30
phase "bench, CUDA kernels"
timeout 240 python3 benchmarks/bench_m2rnn.py --config cuda_kernels=True --vs-xma "$XMA" --json $OUT/bench_cuda.json \
  2>&1 | tee $OUT/bench_cuda.log | grep -v "^(" | grep -v autotuned | tail -22
phase "bench, Triton"
timeout 200 python3 benchmarks/bench_m2rnn.py --json $OUT/bench_triton.json 2>&1 | tee $OUT/bench_triton.log \
  | grep -v "^(" | grep -v autotuned | tail -22
phase done
