#!/bin/bash
# Run from the repository root on a 2-GPU machine; WHEELS: folder of carried wheels (transformers, fla, liger, lm-eval...).
# Issue 16, call A: fla-kernel timings one GPU vs DDP (4K and 1K), and the training-step profile of the torch GDN path.
# (Run on 2026-11-28 before --pad-to-multiple-of existed: exact row lengths then, the option spells that out now.)
source benchmarks/gpu_calls/setup.sh torch triton transformers accelerate fla
common() { echo "--preset hybrid-gdn-m2rnn-1l-400m --random-tokens 400 --max-length $1 --lr 3e-4 --max-steps $2 --no-save --bf16 --fused-ce --pad-to-multiple-of 1"; }
phase "profiles, torch GDN (GPU 1, background)"
( for extra in "" "--no-packing"; do
    CUDA_VISIBLE_DEVICES=1 timeout 120 python3 benchmarks/profile_train_step.py --output-dir $OUT/profile --pad-to-multiple-of 1 $extra 2>&1 | grep -v USDT | tail -30
  done > $OUT/profile_torch.log 2>&1 ) &
phase "single_fla 4K (GPU 0)"
CUDA_VISIBLE_DEVICES=0 timeout 300 python3 $W $(common 4096 12) --batch-size 4 --report $OUT/single_fla_4k.json 2>&1 | grep -v -i warn | tail -6
wait
cat $OUT/profile_torch.log
phase "ddp_fla 4K"
timeout 150 $LAUNCH2 $W $(common 4096 12) --batch-size 2 --report $OUT/ddp_fla_4k.json 2>&1 | grep -v -i warn | tail -6
phase "single_fla 1K (GPU 0) + fla profile (GPU 1)"
CUDA_VISIBLE_DEVICES=1 timeout 120 python3 benchmarks/profile_train_step.py --output-dir $OUT/profile --pad-to-multiple-of 1 --fla-unguarded > $OUT/profile_fla.log 2>&1 &
CUDA_VISIBLE_DEVICES=0 timeout 120 python3 $W $(common 1024 20) --batch-size 2 --report $OUT/single_fla_1k.json 2>&1 | grep -v -i warn | tail -4
wait
grep -v USDT $OUT/profile_fla.log | tail -30
phase "ddp_fla 1K"
timeout 120 $LAUNCH2 $W $(common 1024 20) --batch-size 1 --report $OUT/ddp_fla_1k.json 2>&1 | grep -v -i warn | tail -4
phase "done"
for f in $OUT/*_fla_*.json; do python3 -c "import json,sys; r=json.load(open('$f')); print('$f'.split('/')[-1], round(r.get('tokens_per_second',0)), r.get('peak_memory_gib_per_process'), [round(x,3) for x in r['losses'][:3]])"; done
