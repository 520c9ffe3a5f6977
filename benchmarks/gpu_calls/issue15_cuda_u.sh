# Issue 15, sixth round, call U. o6 = what lands: call T's o5 with the walk's queue code compiled only into the
# variant that has A1 blocks beside it (M2_A1_BESIDE), so the A1-first path (7B, 16K) runs base's walk (its loops are
# base's instruction for instruction, checked offline with inspect_sass.py). Kernel GPU tests on o6; one pass of base
# and o6; o6's table beside xma (same process) and its per-kernel time; then the one-layer swap on o6 with the device
# time left.
# (The one-pass A/B was written out in the script that ran; folded onto ab_passes afterwards, same steps.)
#   WHEELS=.dev-k/whl XMA=.dev-k/xma_src bash benchmarks/gpu_calls/issue15_cuda_u.sh
source benchmarks/gpu_calls/setup.sh torch triton transformers
source benchmarks/gpu_calls/kernels.sh
phase "kernel tests, o6"
use .dev-k/s25/o6
kernel_tests
PASSES=1 ab_passes .dev-k/s25 base o6
phase "bench, o6, xma beside"
bench_vs_xma 150
phase "per-kernel time, 400M fwd+bwd, o6"
profile_400m
phase "one-layer swap, o6"
one_layer_swap 280
phase done
