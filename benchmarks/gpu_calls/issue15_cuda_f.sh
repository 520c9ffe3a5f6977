# Issue 15, CUDA kernels, fourth round, first call: the GPU tests of the kernels as committed (ad39ad8: shared
# store/weight helpers, block_k whole tiles) and of the model with the CUDA kernels as its default backend
# (eager, torch.compile, CUDA-graph prefill and decode). No fla: the project's own paths.
#   WHEELS=.dev-k/whl bash benchmarks/gpu_calls/issue15_cuda_f.sh
source benchmarks/gpu_calls/setup.sh torch triton transformers
phase "kernel tests"
timeout 200 python3 -m pytest -q -m gpu -rs tests/test_m2rnn_cuda.py \
  "tests/test_m2rnn_triton.py::test_more_than_2_pow_32_state_elements[cuda]" 2>&1 | tee $OUT/pytest_kernels.log | tail -15
phase "model tests, default backend"
timeout 300 python3 -m pytest -q -m gpu -rs tests/test_model_gpu.py tests/test_fast_decode.py 2>&1 \
  | tee $OUT/pytest_model.log | tail -25
phase done
