#!/bin/bash
# Run from the repository root on a 2-GPU machine; WHEELS: folder of carried wheels (transformers, fla, liger, lm-eval...).
# Issue 16, call B: fla-kernel timings, one GPU vs DDP at 4K and 1K, rows rounded (repeating shapes) vs exact lengths.
source benchmarks/gpu_calls/setup.sh torch triton transformers accelerate fla
common() { echo "--preset hybrid-gdn-m2rnn-1l-400m --random-tokens 400 --max-length $1 --lr 3e-4 --max-steps $2 --no-save --bf16 --fused-ce"; }
phase "single_fla 4K: rows rounded to 1024 (GPU 0) | exact lengths (GPU 1)"
CUDA_VISIBLE_DEVICES=0 timeout 330 python3 $W $(common 4096 24) --batch-size 4 --pad-to-multiple-of 1024 --report $OUT/single_fla_4k_r1024.json > $OUT/single_fla_4k_r1024.log 2>&1 &
CUDA_VISIBLE_DEVICES=1 timeout 330 python3 $W $(common 4096 24) --batch-size 4 --pad-to-multiple-of 1 --report $OUT/single_fla_4k_exact.json 2>&1 | quiet
wait; quiet < $OUT/single_fla_4k_r1024.log
phase "ddp_fla 4K, rows rounded to 1024"
timeout 120 $LAUNCH2 $W $(common 4096 24) --batch-size 2 --pad-to-multiple-of 1024 --report $OUT/ddp_fla_4k_r1024.json 2>&1 | quiet
phase "single_fla 1K: rows rounded to 256 (GPU 0) | exact lengths (GPU 1)"
CUDA_VISIBLE_DEVICES=0 timeout 100 python3 $W $(common 1024 30) --batch-size 2 --report $OUT/single_fla_1k_r256.json > $OUT/single_fla_1k_r256.log 2>&1 &
CUDA_VISIBLE_DEVICES=1 timeout 100 python3 $W $(common 1024 30) --batch-size 2 --pad-to-multiple-of 1 --report $OUT/single_fla_1k_exact.json 2>&1 | quiet
wait; quiet < $OUT/single_fla_1k_r256.log
phase "ddp_fla 1K, rows rounded to 256"
timeout 100 $LAUNCH2 $W $(common 1024 30) --batch-size 1 --report $OUT/ddp_fla_1k_r256.json 2>&1 | quiet
for gdn in fla torch; do
  flag=$([ $gdn = fla ] && echo --fla-unguarded)
  phase "profile 1K packed, GDN $gdn: rows rounded to 256 (GPU 0) | exact lengths (GPU 1)"
  CUDA_VISIBLE_DEVICES=0 timeout 90 python3 benchmarks/profile_train_step.py --output-dir $OUT/profile $flag > $OUT/profile_${gdn}_r256.log 2>&1 &
  CUDA_VISIBLE_DEVICES=1 timeout 90 python3 benchmarks/profile_train_step.py --output-dir $OUT/profile $flag --pad-to-multiple-of 1 > $OUT/profile_${gdn}_r1.log 2>&1
  wait
  for r in r256 r1; do grep -v USDT $OUT/profile_${gdn}_$r.log | grep -v -i warn | head -9; done
done
phase "done"
for f in $OUT/*_fla_*.json; do python3 -c "import json; r=json.load(open('$f')); print('$f'.split('/')[-1], round(r.get('tokens_per_second',0)), [round(x,1) for x in r.get('peak_memory_gib_per_process',[])], [round(x,4) for x in r['losses'][:2]])"; done
