#!/bin/bash
# Run from the repository root on a 2-GPU machine; WHEELS: folder of carried wheels (transformers, fla, liger, lm-eval...).
# Issue 16, call C: lm-eval and m2rnn eval data-parallel vs one GPU; FSDP2 with activation checkpointing (torch GDN).
set -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site ${WHEELS:-.whl}/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers, accelerate, lm_eval, datasets; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'lm_eval', lm_eval.__version__, 'datasets', datasets.__version__)"
timeout 285 python3 benchmarks/bench_distributed.py --output-dir $OUT/c --budget 275 --max-length 1024 --docs-per-gpu 1 \
  --phases lm_eval_dp,eval_dp,fsdp2_ac 2>&1 | grep -v -i "warn" | tail -60
