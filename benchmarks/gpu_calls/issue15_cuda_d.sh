# Issue 15, CUDA kernels, third call: the kernel table with the default launch choice (xma beside), then Nsight
# Compute's pipe utilization and stall reasons of one CUDA forward and backward at the 400M shape.
#   WHEELS=.dev-k/whl XMA=.dev-k/xma_src bash benchmarks/gpu_calls/issue15_cuda_d.sh
source benchmarks/gpu_calls/setup.sh torch triton transformers
phase "bench, CUDA kernels (default backend)"
timeout 240 python3 benchmarks/bench_m2rnn.py --config cuda_kernels=True --vs-xma "$XMA" --json $OUT/bench_cuda.json \
  2>&1 | tee $OUT/bench_cuda.log | grep -v "^(" | grep -v autotuned | tail -22
phase "ncu, CUDA forward and backward at 400M"
timeout 240 ncu --kernel-name regex:m2rnn_ --launch-skip 2 --launch-count 2 --section SchedulerStats \
  --metrics "regex:sm__inst_executed_pipe_.*\.avg\.pct_of_peak_sustained_active,regex:sm__pipe_.*_cycles_active\.avg\.pct_of_peak_sustained_active,regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,gpu__time_duration.sum,smsp__inst_executed.sum" \
  python3 benchmarks/bench_m2rnn.py --profile --config cuda_kernels=True > $OUT/ncu.log 2>&1
grep -E "^  m2rnn|duration|Issued Warp Per Scheduler|No Eligible|Active Warps Per|Eligible Warps|inst_executed.sum" $OUT/ncu.log
grep -E "pipe_|stalled" $OUT/ncu.log | awk '$NF+0 > 0.05' | head -80
phase done
