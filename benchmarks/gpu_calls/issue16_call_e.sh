#!/bin/bash
# Run from the repository root on a 2-GPU machine; WHEELS: folder of carried wheels (transformers, fla, liger, lm-eval...).
# Issue 16, call E: DDP scaling at 4K against one GPU that accumulates the same micro-batches (--single-accumulates):
# first the torch GDN path (correct gradients, 2 documents per GPU and micro-batch), then fla's GDN kernels (guard
# lifted, timing only; 4 documents per GPU and micro-batch, fused cross-entropy). Rows rounded to 1024 tokens.
source benchmarks/gpu_calls/setup.sh torch triton transformers accelerate fla
for run in "e_torch 190 --docs-per-gpu 2 --steps 6 --phases single,ddp" \
           "e_fla 360 --docs-per-gpu 4 --fla-steps 10 --phases single_fla,ddp_fla"; do
  set -- $run; name=$1; budget=$2; shift 2
  phase "$name"
  timeout $((budget + 15)) python3 benchmarks/bench_distributed.py --output-dir /tmp/$name --budget $budget \
    --max-length 4096 --single-accumulates --pad-to-multiple-of 1024 "$@" 2>&1 | grep -v -i "warn" | tail -40
  cp /tmp/$name/results.json $OUT/${name}_results.json
  (cd /tmp/$name && tar czf $OUT/${name}_logs.tgz *.log *.json)
done
