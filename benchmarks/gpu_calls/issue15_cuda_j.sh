# Issue 15, fourth round, call J: the kernels as committed (variant E of call I: H = fma(1 - f, Z, f H), branch-free
# A2, output addresses stepped per token), the table beside the authors' xma in the same process (no fla on the
# path: its GDN timing autotunes past the phase), then the one-layer swap in the 400M Hybrid GDN (fla's GDN kernels,
# Hopper guard lifted for timing only; fla installed for that phase alone).
#   WHEELS=.dev-k/whl XMA=.dev-k/xma_src bash benchmarks/gpu_calls/issue15_cuda_j.sh
source benchmarks/gpu_calls/setup.sh torch triton transformers
source benchmarks/gpu_calls/kernels.sh
phase "bench, CUDA kernels, xma beside"
timeout 200 python3 benchmarks/bench_m2rnn.py --config cuda_kernels=True --vs-xma "$XMA" --json $OUT/bench_cuda.json \
  2>&1 | tee $OUT/bench_cuda.log | grep -v "^(" | grep -v autotuned | head -24
phase "one-layer swap, 400M Hybrid GDN, 4K"
one_layer_swap 230
phase done
