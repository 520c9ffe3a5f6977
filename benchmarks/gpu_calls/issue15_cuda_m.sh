# Issue 15, fifth round, call M: the backward's instruction cuts, each on its own. BASE = a3ec420; V1 = one struct
# per step of a visit's inputs (one base address per step) and the outputs' addresses stepped back by one token;
# V2 = V1 + the carry's three products in one accumulator; V3 = V2 + v read once per step (A1, A2, B);
# V4 = V3 + df summed over lanes once per visit through shared memory; V5 = V3 + the reverse walk unrolled by 2
# (185 registers: two blocks per SM). The GPU kernel tests run on V4 first, then one process per source set, two
# passes.
#   WHEELS=.dev-k/whl bash benchmarks/gpu_calls/issue15_cuda_m.sh
source benchmarks/gpu_calls/setup.sh torch triton transformers
source benchmarks/gpu_calls/kernels.sh
phase "kernel tests, V4"
use .dev-k/s24/v4
kernel_tests
ab_passes .dev-k/s24 base v1 v2 v3 v4 v5
phase done
