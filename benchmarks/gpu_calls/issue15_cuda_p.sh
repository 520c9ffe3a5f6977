# Issue 15, fifth round, call P: dq and dk summed over a block's heads. V6 = the committed kernels (2d72ea6 + the
# states kernel's early exit); V7 = V6 where a block of the walk takes 4 consecutive heads of one row block (which
# share their q and k heads) and sums their dq, dk per step in shared memory before storing: the per-head partials
# the caller sums shrink 4x; V8 = V7 + the reverse walk unrolled by 2. Kernel GPU tests on V7 first; then one process
# per source set, two passes; then the faster set's table beside xma (same process) and its per-kernel time.
#   WHEELS=.dev-k/whl XMA=.dev-k/xma_src bash benchmarks/gpu_calls/issue15_cuda_p.sh
source benchmarks/gpu_calls/setup.sh torch triton transformers
source benchmarks/gpu_calls/kernels.sh
compare_sets .dev-k/s24 v7 v6 v7 v8
phase done
