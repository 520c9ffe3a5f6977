#!/bin/bash
# Run from the repository root on a 2-GPU machine; WHEELS: folder of carried wheels (transformers, fla, liger, lm-eval...).
# Issue 16, call F: call E's scaling runs with two micro-batches per GPU and step (--accumulation 2: the one-GPU run
# accumulates four), throughput counted over every process's tokens; the GPUs' link first.
source benchmarks/gpu_calls/setup.sh torch triton transformers accelerate fla
nvidia-smi topo -m | head -4
for run in "f_torch 185 --docs-per-gpu 2 --steps 6 --phases single,ddp" \
           "f_fla 345 --docs-per-gpu 4 --fla-steps 8 --phases single_fla,ddp_fla"; do
  set -- $run; name=$1; budget=$2; shift 2
  phase "$name"
  timeout $((budget + 10)) python3 benchmarks/bench_distributed.py --output-dir /tmp/$name --budget $budget \
    --max-length 4096 --accumulation 2 --single-accumulates --pad-to-multiple-of 1024 "$@" 2>&1 | grep -v -i "warn" | tail -30
  cp /tmp/$name/results.json $OUT/${name}_results.json
  (cd /tmp/$name && tar czf $OUT/${name}_logs.tgz *.log *.json)
done
