# Issue 15, sixth round, call S. base = the committed kernels (0067982: A1 in its own kernel before the walk);
# o3 = call R's o1 only where the busiest multiprocessors are full (A1 blocks then land beside fewer walk blocks:
# 400M), A1 alone first elsewhere (7B, 16K: o1 was slower there, call R); o4 = o3 with two A1 items in flight per A1
# warp beside the walk. Kernel GPU tests on o4 first (every path: A1 first, one A1 block beside the walk, more A1
# blocks than the GPU holds); then one process per source set, two passes; then the fastest set's table beside xma
# (same process) and its per-kernel time.
#   WHEELS=.dev-k/whl XMA=.dev-k/xma_src bash benchmarks/gpu_calls/issue15_cuda_s.sh
source benchmarks/gpu_calls/setup.sh torch triton transformers
source benchmarks/gpu_calls/kernels.sh
compare_sets .dev-k/s25 o4 base o3 o4
phase done
