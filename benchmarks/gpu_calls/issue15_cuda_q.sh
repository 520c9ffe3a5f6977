# Issue 15, fifth round, call Q. V6 = the committed kernels (2d72ea6 + the states kernel's early exit); V9 = V6 with
# the dq and dk partials head-major, (N, T, K): the caller sums whole (T, K) slabs over the heads instead of a middle
# dimension; V10 = V9 + the reverse walk unrolled by 2 where a warp carries one tile (16K: call P's V8 was 1.8%
# faster there, slower with two tiles). Kernel GPU tests on V10 first; then one process per source set, two passes;
# then the faster set's table beside xma (same process) and its per-kernel time.
#   WHEELS=.dev-k/whl XMA=.dev-k/xma_src bash benchmarks/gpu_calls/issue15_cuda_q.sh
source benchmarks/gpu_calls/setup.sh torch triton transformers
source benchmarks/gpu_calls/kernels.sh
compare_sets .dev-k/s24 v10 v6 v9 v10
phase done
