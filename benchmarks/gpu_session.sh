#!/bin/bash
# One device call: the Triton tests on the GPU (no interpreter), then the benchmark. Logs land in $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/m2rnn-bench}
mkdir -p "$OUT"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then  # fla for the GDN comparison, carried as a wheel
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:$PYTHONPATH
if ! python3 -c "import m2rnn" 2>"$OUT/import.log"; then
  # the model side may want a newer transformers than the machine has: import the kernels without m2rnn/__init__
  mkdir -p /tmp/shim
  printf 'import sys, types\npkg = types.ModuleType("m2rnn")\npkg.__path__ = ["%s/m2rnn"]\nsys.modules["m2rnn"] = pkg\n' "$PWD" \
    > /tmp/shim/sitecustomize.py
  export PYTHONPATH=/tmp/shim:$PYTHONPATH
  echo "m2rnn package import failed (see import.log); kernels imported alone"
fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,driver_version --format=csv
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest tests/test_m2rnn_triton.py -q -s -rs ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/pytest.log"
timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/bench_m2rnn.py ${BENCH_ARGS:---sweep} --json "$OUT/bench.json" 2>&1 \
  | tee "$OUT/bench.log"
