# Issue 15, sixth round, call R. base = the committed kernels (0067982: A1 in its own kernel before the walk);
# o1 = A1 beside the walk in one launch: the blocks the GPU still holds beside the walk's run A1's items from a queue,
# last chunk first, and a walk warp runs its own item where no one has taken it; o2 = o1 with at most one A1 block
# per multiprocessor. Kernel GPU tests on o1 first (the new one: bit-equal gradients whoever runs A1); then one
# process per source set, two passes; then the fastest set's table beside xma (same process) and its per-kernel time.
#   WHEELS=.dev-k/whl XMA=.dev-k/xma_src bash benchmarks/gpu_calls/issue15_cuda_r.sh
source benchmarks/gpu_calls/setup.sh torch triton transformers
source benchmarks/gpu_calls/kernels.sh
compare_sets .dev-k/s25 o1 base o1 o2
phase done
