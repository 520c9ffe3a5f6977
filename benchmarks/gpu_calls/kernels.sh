# Sourced by the issue15_cuda_*.sh calls after setup.sh: kernel source sets (folders holding cuda_*.cu,
# cuda_common.cuh and cuda_kernels.py) swapped into the tree, the GPU kernel tests, an A/B of sets (one process per
# set and pass), the table beside the authors' xma and the per-kernel profile.
# Calls H, J and M to Q ran with these steps written out in each script; they were folded into this file afterwards,
# unchanged.
KDIR=m2rnn/kernels/m2rnn
use() { cp "$1"/cuda_*.cu "$1"/cuda_common.cuh "$1"/cuda_kernels.py $KDIR/; }
kernel_tests() {
  timeout 150 python3 -m pytest -q -m gpu -rs tests/test_m2rnn_cuda.py \
    "tests/test_m2rnn_triton.py::test_more_than_2_pow_32_state_elements[cuda]" 2>&1 | tee $OUT/pytest_kernels.log | tail -4
}
# ab_passes FOLDER [--memory] SET...: PASSES (default 2) passes over the sets under FOLDER, results appended to
# $OUT/ab.log.
ab_passes() {
  local folder=$1 memory=""; shift
  if [ "$1" = "--memory" ]; then memory=--memory; shift; fi
  for pass in $(seq ${PASSES:-2}); do
    for variant in "$@"; do
      phase "pass $pass $variant"
      use $folder/$variant
      timeout 60 python3 benchmarks/gpu_calls/kernel_ab.py $variant $memory 2>&1 | grep RESULT | tee -a $OUT/ab.log
    done
  done
}
fastest() { python3 benchmarks/gpu_calls/kernel_ab.py --best $OUT/ab.log; }
bench_vs_xma() {
  timeout ${1:-200} python3 benchmarks/bench_m2rnn.py --config cuda_kernels=True --vs-xma "$XMA" --json $OUT/bench_cuda.json \
    2>&1 | tee $OUT/bench_cuda.log | grep -v "^(" | grep -v autotuned | head -30
}
profile_400m() { timeout 90 python3 benchmarks/gpu_calls/kernel_profile.py 2>&1 | tee $OUT/profile.log | tail -12; }
# compare_sets FOLDER TEST_SET SET...: the kernel tests on TEST_SET, the A/B of the sets, then the fastest set's
# table beside xma and its per-kernel profile.
compare_sets() {
  local folder=$1 tested=$2; shift 2
  phase "kernel tests, $tested"
  use $folder/$tested
  kernel_tests
  ab_passes $folder "$@"
  BEST=$(fastest)
  phase "bench, $BEST, xma beside"
  use $folder/$BEST
  bench_vs_xma
  phase "per-kernel time, 400M fwd+bwd, $BEST"
  profile_400m
}
# one_layer_swap [TIMEOUT]: training throughput of the 400M Hybrid GDN and of it with one GDN layer swapped for M2RNN,
# each twice, interleaved; fla installed for this phase only, its Hopper backward guard lifted (timing only).
one_layer_swap() {
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_fla .dev-d4/whl/*.whl 2>&1 | tail -2
  PYTHONPATH=/tmp/site_fla:$PWD timeout ${1:-230} python3 benchmarks/bench_model.py --fla-unguarded --only train --quick \
    --warmup 2 --train-repeats 5 --models hybrid-gdn,hybrid-gdn-m2rnn-1l,hybrid-gdn,hybrid-gdn-m2rnn-1l \
    --output-dir $OUT/model 2>&1 | tee $OUT/model.log | grep -E "tok/s|^\|" | tail -12
}
