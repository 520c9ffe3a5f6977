# Issue 15, fourth round, call H: GPU tests of the backward with the carry dX·Wᵀ in two tfloat32 products (W as
# the forward's float16 values), branch-free A2 and H = fma(1 - f, Z, f H) in both kernels; the model's GPU tests
# (the compiled CUDA-graph decoder); an A/B of the kernel sources, one process each, alternated: CUR (.dev-k/cur)
# against GOOD (.dev-k/good: ad39ad8, tested in call F); then the one-layer swap in the 400M Hybrid GDN with CUR
# (fla's GDN kernels, Hopper guard lifted for timing only; fla is installed for that phase alone).
#   WHEELS=.dev-k/whl bash benchmarks/gpu_calls/issue15_cuda_h.sh
source benchmarks/gpu_calls/setup.sh torch triton transformers
source benchmarks/gpu_calls/kernels.sh
use .dev-k/cur
phase "kernel tests, CUR"
if ! timeout 150 python3 -m pytest -q -m gpu -rs -x tests/test_m2rnn_cuda.py \
    "tests/test_m2rnn_triton.py::test_more_than_2_pow_32_state_elements[cuda]" 2>&1 | tee $OUT/pytest_kernels.log | tail -12; then
  echo "!!! CUR failed its tests"
fi
phase "model tests"
timeout 150 python3 -m pytest -q -m gpu -rs tests/test_model_gpu.py tests/test_fast_decode.py 2>&1 \
  | tee $OUT/pytest_model.log | tail -4
AB='import sys, json; sys.path.insert(0, "benchmarks"); import bench_m2rnn as b; from m2rnn.kernels import M2RNNTritonConfig
op = b.ours(M2RNNTritonConfig(cuda_kernels=True))
print(sys.argv[1], json.dumps({n: (round(b.time_forward(*s, op=op), 3), round(b.time_forward_backward(*s, op=op), 3) if "prefill" not in n else None) for n, s in b.SHAPES.items()}))'
for variant in .dev-k/cur .dev-k/good .dev-k/cur .dev-k/good; do
  phase "A/B $variant"
  use $variant
  timeout 90 python3 -c "$AB" $variant 2>&1 | tail -1 | tee -a $OUT/ab.log
done
use .dev-k/cur
phase "one-layer swap, 400M Hybrid GDN, 4K, CUR kernels"
one_layer_swap 230
phase done
