# Sourced by the issue16_call_*.sh scripts: install the carried wheels (WHEELS, default .whl), put them and the
# repository on PYTHONPATH, and print the GPUs and the versions of the packages named in $@.
set -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site ${WHEELS:-.whl}/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,clocks.max.sm,driver_version --format=csv,noheader
python3 - "$@" <<'PY'
import importlib, sys
print(", ".join(f"{name} {importlib.import_module(name).__version__}" for name in sys.argv[1:]))
PY
# Shared by the calls: finetune.py with fla's Hopper backward guard lifted (timing only), the two-GPU launcher,
# phase headers with the seconds since the start, and a filter that keeps a command's last lines without warnings.
W="benchmarks/bench_distributed.py --worker"
LAUNCH2="python3 -m accelerate.commands.launch --num_processes 2 --config_file examples/accelerate/ddp.yaml"
t0=$(date +%s)
phase() { echo "=== $1 (t=$(( $(date +%s) - t0 )) s)"; }
quiet() { grep -v -i "warn" | tail -${1:-3}; }
