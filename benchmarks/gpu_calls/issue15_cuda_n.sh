# Issue 15, fifth round, call N: A1 taken out of the walk. V3 = call M's committed kernels (9af1c34); V6 = V3 with A1
# in its own kernel (m2rnn_backward_states: every chunk at once, one warp per chunk, row block and head, states before
# each sub-chunk to a scratch of 8x the checkpoints) and the walk keeping A2 + B only. The GPU kernel tests run on V6
# first; then one process per source set, two passes, with the 400M memory figures; then the model's GPU tests and
# the one-layer swap (fla's GDN, Hopper guard lifted for timing only) on the faster set.
#   WHEELS=.dev-k/whl bash benchmarks/gpu_calls/issue15_cuda_n.sh
source benchmarks/gpu_calls/setup.sh torch triton transformers
source benchmarks/gpu_calls/kernels.sh
phase "kernel tests, V6"
use .dev-k/s24/v6
kernel_tests
ab_passes .dev-k/s24 --memory v3 v6
BEST=$(fastest)
phase "model GPU tests, $BEST"
use .dev-k/s24/$BEST
timeout 120 python3 -m pytest -q -m gpu -rs tests/test_model_gpu.py tests/test_fast_decode.py 2>&1 | tee $OUT/pytest_model.log | tail -3
phase "one-layer swap, 400M Hybrid GDN, 4K, $BEST"
one_layer_swap 200
phase done
