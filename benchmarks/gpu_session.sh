#!/bin/bash
# One device call, phases chosen on the command line (default: tests bench). Logs and JSON land in $OUT.
#   bash benchmarks/gpu_session.sh s3 tests variants ncu      # what a tuning call runs
# Phases:
#   s3        start the S3 paper-scale runs (M2RNN and GDN, S3_SECONDS each) in the background; `wait` joins them
#   tests     pytest -m gpu: the Triton kernel tests and the model-on-CUDA tests (no interpreter)
#   variants  bench_m2rnn.py --variants: time and check each kernel knob combination
#   ncu       Nsight Compute stall reasons of one forward and backward launch at the 400M shape
#             (NCU_KNOBS="--config half_precision_state_dot=True" profiles a variant)
#   bench     bench_m2rnn.py: the kernel figures table (XMA=path/to/xma-checkout adds the authors' kernel beside)
#   model     bench_model.py: model-level throughput, prefill, decode (issue 8)
#   wait      wait for background phases, then write the S3 report
set -o pipefail
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
OUT=${OUT:-/tmp/m2rnn-gpu}
mkdir -p "$OUT"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then  # fla and transformers >= 5.23, carried as wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:$PYTHONPATH
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
phases=${*:-tests bench}
s3_pids=()
for phase in $phases; do
  echo "=== $phase ($(date +%T))"
  case $phase in
    s3)
      # S3_RUNS: "model:lr:tag" items (default: both models at lr 3e-3)
      for run in ${S3_RUNS:-m2rnn:3e-3: gdn:3e-3:}; do
        IFS=: read -r model lr tag <<< "$run"
        python3 benchmarks/s3_paper_scale.py train --model "$model" --lr "$lr" ${tag:+--tag "$tag"} \
          --seconds "${S3_SECONDS:-150}" --output-dir "$OUT/s3" > "$OUT/s3_$model$tag.log" 2>&1 &
        s3_pids+=($!)
      done ;;
    tests)
      timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -rs ${PYTEST_ARGS:-} \
        tests/test_m2rnn_triton.py tests/test_model_gpu.py ${EXTRA_TESTS:-} 2>&1 | tee "$OUT/pytest.log" | tail -25 ;;
    variants)
      timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/bench_m2rnn.py --variants --json "$OUT/variants.json" \
        2>&1 | tee "$OUT/variants.log" | tail -12 ;;
    ncu)
      M2RNN_TRITON_NUM_WARPS=${NCU_WARPS:-1} timeout 180 ncu --kernel-name regex:_m2rnn_ --launch-skip 2 \
        --launch-count 2 --section SpeedOfLight --section WarpStateStats --section SchedulerStats \
        --section InstructionStats python3 benchmarks/bench_m2rnn.py --profile ${NCU_KNOBS:-} > "$OUT/ncu.log" 2>&1
      grep -E "^  _m2rnn|Duration|Warp Cycles Per Issued|Issued Warp Per Scheduler|No Eligible|Active Warps Per|Eligible Warps|Executed Ipc A" \
        "$OUT/ncu.log" | head -40 ;;
    bench)
      timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/bench_m2rnn.py ${XMA:+--vs-xma "$XMA"} ${BENCH_ARGS:-} \
        --json "$OUT/bench.json" 2>&1 \
        | tee "$OUT/bench.log" | tail -22 ;;
    model)
      timeout "${MODEL_TIMEOUT:-360}" python3 benchmarks/bench_model.py ${MODEL_ARGS:-} --output-dir "$OUT/model" 2>&1 \
        | tee "$OUT/model.log" | tail -30 ;;
    wait)
      for pid in "${s3_pids[@]}"; do wait "$pid"; done
      for log in "$OUT"/s3_*.log; do tail -n 2 "$log"; done
      python3 benchmarks/s3_paper_scale.py report "$OUT/s3" 2>&1 | tail -12 ;;
    *) echo "unknown phase $phase" ;;
  esac
done
# the device returns at most 8 files: pack everything into one archive
(cd "$OUT" && tar czf /tmp/m2rnn-gpu.tgz . && find . -mindepth 1 -delete && mv /tmp/m2rnn-gpu.tgz .)
