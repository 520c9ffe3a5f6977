# Issue 15, fifth round, call O: the committed kernels (2d72ea6 + the states kernel's early exit past a packed
# sequence's end): the GPU kernel tests, the table beside the authors' xma in the same process (no fla on the path),
# and where the time of one 400M forward+backward goes, per kernel (torch.profiler).
#   WHEELS=.dev-k/whl XMA=.dev-k/xma_src bash benchmarks/gpu_calls/issue15_cuda_o.sh
source benchmarks/gpu_calls/setup.sh torch triton transformers
source benchmarks/gpu_calls/kernels.sh
phase "kernel tests"
kernel_tests
phase "bench, CUDA kernels, xma beside"
bench_vs_xma 260
phase "per-kernel time, 400M fwd+bwd"
profile_400m
phase done
