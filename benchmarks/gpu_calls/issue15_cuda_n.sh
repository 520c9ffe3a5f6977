# Issue 15, fifth round, call N: A1 taken out of the walk. V3 = call M's committed kernels (9af1c34); V6 = V3 with A1
# in its own kernel (m2rnn_backward_states: every chunk at once, one warp per chunk, row block and head, states before
# each sub-chunk to a scratch of 8x the checkpoints) and the walk keeping A2 + B only. The GPU kernel tests run on V6
# first; then one process per source set, two passes, with the 400M memory figures; then the model's GPU tests and
# the one-layer swap (fla's GDN, Hopper guard lifted for timing only) on the faster set.
#   WHEELS=.dev-k/whl bash benchmarks/gpu_calls/issue15_cuda_n.sh
source benchmarks/gpu_calls/setup.sh torch triton transformers
KDIR=m2rnn/kernels/m2rnn
use() { cp "$1"/cuda_*.cu "$1"/cuda_common.cuh "$1"/cuda_kernels.py $KDIR/; }
phase "kernel tests, V6"
use .dev-k/s24/v6
timeout 150 python3 -m pytest -q -m gpu -rs tests/test_m2rnn_cuda.py \
    "tests/test_m2rnn_triton.py::test_more_than_2_pow_32_state_elements[cuda]" 2>&1 | tee $OUT/pytest_kernels.log | tail -4
AB='import sys, json; sys.path.insert(0, "benchmarks"); import bench_m2rnn as b; from m2rnn.kernels import M2RNNTritonConfig
op = b.ours(M2RNNTritonConfig(cuda_kernels=True))
r = {n: (round(b.time_forward(*s, op=op), 3), round(b.time_forward_backward(*s, op=op), 3) if "prefill" not in n else None) for n, s in b.SHAPES.items()}
r["memory 400M (kept, peak in backward) GB"] = [round(x, 3) for x in b.memory_kept_for_backward(*b.SHAPES["400M"], op=op)]
print("RESULT", sys.argv[1], json.dumps(r))'
for pass in 1 2; do
  for variant in v3 v6; do
    phase "pass $pass $variant"
    use .dev-k/s24/$variant
    timeout 60 python3 -c "$AB" $variant 2>&1 | grep RESULT | tee -a $OUT/ab.log
  done
done
BEST=$(python3 - $OUT/ab.log <<'PY'
import json, sys, collections
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    _, name, data = line.split(" ", 2)
    d = json.loads(data)
    runs[name].append(d["400M"][1] + d["7B"][1] + d["400M 16K context"][1] / 2)
score = {k: min(v) for k, v in runs.items()}
print(min(score, key=score.get))
PY
)
phase "model GPU tests, $BEST"
use .dev-k/s24/$BEST
timeout 120 python3 -m pytest -q -m gpu -rs tests/test_model_gpu.py tests/test_fast_decode.py 2>&1 | tee $OUT/pytest_model.log | tail -3
phase "one-layer swap, 400M Hybrid GDN, 4K, $BEST"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_fla .dev-d4/whl/*.whl 2>&1 | tail -2
PYTHONPATH=/tmp/site_fla:$PWD timeout 200 python3 benchmarks/bench_model.py --fla-unguarded --only train --quick \
  --warmup 2 --train-repeats 5 --models hybrid-gdn,hybrid-gdn-m2rnn-1l,hybrid-gdn,hybrid-gdn-m2rnn-1l \
  --output-dir $OUT/model 2>&1 | tee $OUT/model.log | grep -E "tok/s|^\|" | tail -12
phase done
