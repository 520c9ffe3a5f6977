#!/bin/bash
# Run from the repository root on a 2-GPU machine; WHEELS: folder of carried wheels (transformers, fla, liger, lm-eval...).
# Issue 16, call C: lm-eval and m2rnn eval data-parallel vs one GPU; FSDP2 with activation checkpointing (torch GDN).
source benchmarks/gpu_calls/setup.sh torch triton transformers accelerate lm_eval datasets
timeout 285 python3 benchmarks/bench_distributed.py --output-dir $OUT/c --budget 275 --max-length 1024 --docs-per-gpu 1 \
  --phases lm_eval_dp,eval_dp,fsdp2_ac 2>&1 | grep -v -i "warn" | tail -60
