# Issue 15, CUDA kernels, second call: GPU tests (CUDA kernel tests, > 2³² state elements on both backends), the
# kernel table and the row-block sweep with the CUDA kernels, then the one-layer swap cost in the 400M Hybrid GDN
# (default backend, now the CUDA kernels; fla's GDN kernels with their Hopper guard lifted, timing only).
#   WHEELS=.dev-d4/whl bash benchmarks/gpu_calls/issue15_cuda_c.sh   (also needs .dev-k/whl/transformers)
source benchmarks/gpu_calls/setup.sh torch triton transformers
phase "gpu tests"
timeout 300 python3 -m pytest -q -m gpu -rs tests/test_m2rnn_cuda.py \
  "tests/test_m2rnn_triton.py::test_more_than_2_pow_32_state_elements" 2>&1 | tee $OUT/pytest.log | tail -30
phase "bench + sweep, CUDA kernels"
timeout 300 python3 benchmarks/bench_m2rnn.py --config cuda_kernels=True --sweep --json $OUT/bench_cuda.json \
  2>&1 | tee $OUT/bench_cuda.log | grep -v "^(" | grep -v autotuned | tail -40
phase "one-layer swap, 400M Hybrid GDN, 4K"
timeout 420 python3 benchmarks/bench_model.py --fla-unguarded --only train --quick --warmup 2 --train-repeats 5 \
  --models hybrid-gdn,hybrid-gdn-m2rnn-1l,hybrid-gdn,hybrid-gdn-m2rnn-1l --output-dir $OUT/model 2>&1 \
  | tee $OUT/model.log | grep -v -i warn | tail -25
phase done
