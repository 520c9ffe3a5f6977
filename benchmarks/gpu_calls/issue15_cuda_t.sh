# Issue 15, sixth round, call T. base = the committed kernels (0067982); o5 = call S's o3 with the A1-first path as
# base's (no queue, flags or waits: call S's o3 lost 0.2 ms at 7B there). Kernel GPU tests on o5; one process per
# source set, two passes; the fastest set's table beside xma (same process) and its per-kernel time; then the
# one-layer swap of the 400M Hybrid GDN on it (fla's GDN, Hopper guard lifted for timing only).
#   WHEELS=.dev-k/whl XMA=.dev-k/xma_src bash benchmarks/gpu_calls/issue15_cuda_t.sh
source benchmarks/gpu_calls/setup.sh torch triton transformers
source benchmarks/gpu_calls/kernels.sh
compare_sets .dev-k/s25 o5 base o5
phase "one-layer swap, $BEST"
one_layer_swap 230
phase done
