#!/bin/bash
# Run from the repository root on a 2-GPU machine; WHEELS: folder of carried wheels (transformers, fla, liger, lm-eval...).
# Issue 16, call D (torch GDN path, 1K, one document per GPU and micro-batch): FSDP2 with its sharded saves, the
# consolidated folder loaded on the GPU, FSDP2 with activation checkpointing and with padded rows (each against
# fsdp2 and single), niah data-parallel, the one-GPU reference accumulating the same micro-batches, MoE under DDP.
source benchmarks/gpu_calls/setup.sh torch triton transformers accelerate
timeout 575 python3 benchmarks/bench_distributed.py --output-dir /tmp/d --budget 555 --max-length 1024 \
  --docs-per-gpu 1 --single-accumulates --phases fsdp2,consolidate_check,fsdp2_ac,fsdp2_padded,eval_dp,single,moe_ddp \
  2>&1 | grep -v -i "warn" | tail -70
cp /tmp/d/results.json $OUT/d_results.json
(cd /tmp/d && tar czf $OUT/d_logs.tgz *.log *.json)
