"""Benchmark of the Triton M2RNN recurrence at the paper's shapes (needs CUDA); prints a markdown table.

    python benchmarks/bench_m2rnn.py [--vs-xma PATH] [--variants | --variants-only] [--sweep] [--json out.json]

Times are medians of `triton.testing.do_bench` (bf16 inputs, recurrence op only, no projections). Each figure is
printed beside its floor, the issue-15 target and, with ``--vs-xma PATH``, the authors' kernel timed in the same
process on the same inputs: PATH is a checkout or unpacked wheel of github.com/open-lm-engine/accelerated-model-
architectures (the folder holding ``xma/``); it is put on ``sys.path`` for this run only and never vendored here.
`--variants` times the launch-config variants (`M2RNNTritonConfig`), `--sweep` the row block. fla's Gated
DeltaNet at the same model's GDN shape is timed too when fla is importable.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch
import triton
from triton.testing import do_bench

from m2rnn.kernels import M2RNNTritonConfig, m2rnn_recurrence
from m2rnn.kernels.m2rnn import backward, forward
from m2rnn.kernels.m2rnn.autograd import m2rnn_recurrence_triton
from m2rnn.kernels.m2rnn.decode import _m2rnn_decode_kernel, m2rnn_decode_step_triton
from m2rnn.kernels.m2rnn.triton_common import _math_flags

DEVICE = "cuda"
SM_CLOCK_HZ = 1.98e9  # H100/H200 SXM boost clock
SFU_TANH_PER_CLOCK_PER_SM = 16
FP32_LANES_PER_SM = 128
CONFIG = M2RNNTritonConfig()

SHAPES = {  # name: (batch, seqlen, heads)
    "400M": (8, 4096, 84),
    "7B": (4, 4096, 132),
    "400M batch-1 prefill": (1, 4096, 84),
    "400M 16K context": (2, 16384, 84),  # the 400M shape's tokens per batch at 16K context
}
TARGETS_MS = {("400M", "fwd"): 2.0, ("400M", "fwd+bwd"): 8.0, ("7B", "fwd"): 2.0, ("7B", "fwd+bwd"): 7.0,
              ("400M batch-1 prefill", "fwd"): 1.2, ("400M 16K context", "fwd"): None,
              ("400M 16K context", "fwd+bwd"): None}  # 16K: per token within 1.3x of 4K
GDN_SHAPES = {"400M": (8, 4096, 2), "7B": (4, 4096, 3)}  # batch, seqlen, heads of 256 (key) x 512 (value)


def median_ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def make_inputs(batch, seqlen, heads, key_dim=64, value_dim=16, dtype=torch.bfloat16, requires_grad=False):
    """The paper layout: one q/k head shared by all state heads, W = I + noise, gates in (0.5, 1)."""
    q = torch.randn(batch, seqlen, 1, key_dim, device=DEVICE, dtype=dtype) * key_dim**-0.5
    k = torch.randn(batch, seqlen, 1, key_dim, device=DEVICE, dtype=dtype) * 0.5
    v = torch.randn(batch, seqlen, heads, value_dim, device=DEVICE, dtype=dtype) * 0.5
    w = (torch.eye(value_dim, device=DEVICE) + 0.1 * torch.randn(heads, value_dim, value_dim, device=DEVICE)).to(dtype)
    f = torch.sigmoid(torch.randn(batch, seqlen, heads, device=DEVICE) + 2).to(dtype)
    return [x.requires_grad_(requires_grad) for x in (q, k, v, w, f)]


def ours(config: M2RNNTritonConfig | None = None):
    """Our kernels with `config` (default: the `--config` one; `cuda_kernels=True` for the CUDA ones)."""
    config = config or CONFIG

    def fn(q, k, v, w, f, gradient_clipping=None):
        return m2rnn_recurrence_triton(q, k, v, w, f, gradient_clipping=gradient_clipping, config=config)
    return fn


def xma_op(path: str):
    """The authors' xma m2rnn (Triton backend) from a checkout or unpacked wheel at `path`, or the import error."""
    sys.path.insert(0, path)
    try:
        from xma import KernelBackend
        from xma.layers.m2rnn import m2rnn
    except Exception as error:  # pragma: no cover - depends on the path given
        return None, f"xma not importable from {path}: {type(error).__name__}: {error}"
    finally:
        sys.path.remove(path)

    def fn(q, k, v, w, f, gradient_clipping=None):
        return m2rnn(q, k, v, w, f, None, gradient_clipping, kernel_backend=KernelBackend.triton)
    return fn, "xma m2rnn, KernelBackend.triton"


def time_forward(batch, seqlen, heads, op=None) -> float:
    op = op or ours()
    inputs = make_inputs(batch, seqlen, heads)
    with torch.no_grad():
        return median_ms(lambda: op(*inputs))


def time_forward_backward(batch, seqlen, heads, op=None) -> float:
    op = op or ours()
    inputs = make_inputs(batch, seqlen, heads, requires_grad=True)
    dy = torch.randn(batch, seqlen, heads, inputs[2].shape[-1], device=DEVICE, dtype=torch.bfloat16)

    def step():
        y, _ = op(*inputs, gradient_clipping=1.0)
        torch.autograd.grad(y, inputs, dy)

    return median_ms(step)


def memory_kept_for_backward(batch, seqlen, heads, op=None) -> tuple[float, float]:
    """GB held between forward and backward beyond inputs and outputs, and the peak during backward."""
    op = op or ours()
    inputs = make_inputs(batch, seqlen, heads, requires_grad=True)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    y, ht = op(*inputs, gradient_clipping=1.0)
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - before - y.nbytes - ht.nbytes
    torch.cuda.reset_peak_memory_stats()
    grads = torch.autograd.grad(y, inputs, torch.ones_like(y))
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before - sum(g.nbytes for g in grads)
    return kept / 1e9, peak / 1e9


def time_decode(batch=8, heads=84) -> tuple[float, float]:
    """Wall-clock µs per eager call (host loop, one sync at the end) and µs per replay of a captured call."""
    q, k, v, w, f = make_inputs(batch, 1, heads)
    args = (q[:, 0], k[:, 0], v[:, 0], w, f[:, 0])
    state = torch.randn(batch, heads, q.shape[-1], v.shape[-1], device=DEVICE) * 0.3
    for _ in range(10):
        m2rnn_decode_step_triton(*args, state)
    torch.cuda.synchronize()
    calls = 2000
    start = time.perf_counter()
    for _ in range(calls):
        m2rnn_decode_step_triton(*args, state)
    torch.cuda.synchronize()
    eager_us = (time.perf_counter() - start) / calls * 1e6
    # the same launch without the wrapper: what Triton's own launch path costs
    grid, flags = (batch * heads,), _math_flags(v.dtype)
    y = torch.empty(batch, heads, v.shape[-1], device=DEVICE, dtype=v.dtype)
    launch_args = (*args, state, y, *(s for x in (q[:, 0], k[:, 0], v[:, 0], f[:, 0]) for s in x.stride()[:2]))
    launch_kwargs = dict(N=heads, NQ=1, NK=1, NV=heads, NF=heads, NW=heads, K=q.shape[-1], V=v.shape[-1],
                         BLOCK_K=q.shape[-1], BLOCK_V=16, **flags, num_warps=2)
    for _ in range(10):
        _m2rnn_decode_kernel[grid](*launch_args, **launch_kwargs)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        _m2rnn_decode_kernel[grid](*launch_args, **launch_kwargs)
    torch.cuda.synchronize()
    print(f"decode: {eager_us:.1f} µs per wrapper call, {(time.perf_counter() - start) / calls * 1e6:.1f} µs per bare launch")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        m2rnn_decode_step_triton(*args, state)
    graph_us = median_ms(graph.replay) * 1e3
    return eager_us, graph_us


def time_gdn(batch, seqlen, heads) -> tuple[float | None, float | None, str]:
    """fla's chunked Gated DeltaNet (forward, forward+backward), or why it could not run."""
    try:
        import torch.nn.functional as F
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except Exception as error:  # pragma: no cover - depends on the machine
        return None, None, f"fla not importable ({type(error).__name__})"
    q = F.normalize(torch.randn(batch, seqlen, heads, 256, device=DEVICE), dim=-1).bfloat16().requires_grad_()
    k = F.normalize(torch.randn(batch, seqlen, heads, 256, device=DEVICE), dim=-1).bfloat16().requires_grad_()
    v = torch.randn(batch, seqlen, heads, 512, device=DEVICE, dtype=torch.bfloat16).requires_grad_()
    g = F.logsigmoid(torch.randn(batch, seqlen, heads, device=DEVICE) + 3).requires_grad_()
    beta = torch.rand(batch, seqlen, heads, device=DEVICE, dtype=torch.bfloat16).requires_grad_()
    with torch.no_grad():
        forward = median_ms(lambda: chunk_gated_delta_rule(q, k, v, g, beta))
    try:
        dout = torch.randn_like(v)

        def step():
            out, _ = chunk_gated_delta_rule(q, k, v, g, beta)
            torch.autograd.grad(out, (q, k, v, g, beta), dout)

        both = median_ms(step)
        note = "fla chunk_gated_delta_rule"
    except Exception as error:  # fla 0.6's gated backward wants triton >= 3.7.1 on Hopper
        both, note = None, f"fla backward failed: {type(error).__name__}: {str(error)[:120]}"
    return forward, both, note


def floors(batch, seqlen, heads, key_dim=64, value_dim=16, dram_tb_s=None) -> dict:
    """Lower bounds in ms, counted per pass (E = B·S·N·K·V state elements; per element and step):

    - forward: E tanh on the special-function units (16/clk/SM), or S dependent steps × ~150 cycles;
    - backward recompute (A1 + A2): 2·E tanh (the chunk, then each pass again from its start state);
    - backward chain (B): ~7 FP32 ops (clip 2, G 1, dX 3, dH 1) on 128 lanes/SM, S steps × ~100 cycles;
    - backward parallel pass (C): ~14 FP32 ops (dX 3, H_t 2, dq 2, dk 2, dv 2, df 3); dW on tensor cores (free);
    - DRAM: inputs, dy and the gradients once (bf16/fp32 per token, E-independent), checkpoints 4·E/C bytes.
    """
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    elements = batch * seqlen * heads * key_dim * value_dim
    tanh_ms = elements / (sms * SFU_TANH_PER_CLOCK_PER_SM * SM_CLOCK_HZ) * 1e3
    alu_ms = elements / (sms * FP32_LANES_PER_SM * SM_CLOCK_HZ) * 1e3  # per FP32 op per element
    chain_ms = seqlen * 150 / SM_CLOCK_HZ * 1e3
    passes = {
        "fwd": max(tanh_ms, chain_ms),
        "bwd recompute (A1+A2)": max(2 * tanh_ms, 2 * chain_ms),
        "bwd chain (B)": max(7 * alu_ms, seqlen * 100 / SM_CLOCK_HZ * 1e3),
        "bwd parallel (C)": 14 * alu_ms,
    }
    passes["fwd+bwd"] = passes["fwd"] + passes["bwd recompute (A1+A2)"] + passes["bwd chain (B)"] + passes["bwd parallel (C)"]
    passes.update(tanh_ms=tanh_ms, chain_ms=chain_ms)
    return passes


def sweep(results: dict) -> None:
    """Row block variants (rows per program, or per warp with the CUDA kernels) at every shape, forward and
    forward+backward: what the launch heuristics (`_block_k`, `cuda_kernels.tiles_per_warp`) choose from."""
    rows = []
    for block_k in (16, 32, 64):
        op = ours(dataclasses.replace(CONFIG, block_k=block_k))
        for name, shape in SHAPES.items():
            rows.append((f"{name} fwd", f"BLOCK_K={block_k}", time_forward(*shape, op=op)))
            if name != "400M batch-1 prefill":
                rows.append((f"{name} fwd+bwd", f"BLOCK_K={block_k}", time_forward_backward(*shape, op=op)))
    print("\n| what | variant | ms |\n|---|---|---|")
    for what, variant, ms in rows:
        print(f"| {what} | {variant} | {ms:.3f} |")
    results["sweep"] = rows


VARIANTS = {  # name: M2RNNTritonConfig fields
    "default": dict(),
    "fp16 H@W operands": dict(half_precision_state_dot=True),
    "checkpoint every 16 steps": dict(checkpoint_interval=16),
}


def parse_config(items: list[str], option: str) -> M2RNNTritonConfig:
    """`M2RNNTritonConfig` from "name=value" items (ints, True/False), or exit naming the option and the field."""
    fields = {field.name for field in dataclasses.fields(M2RNNTritonConfig)}
    values = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in fields:
            raise SystemExit(f"{option}: M2RNNTritonConfig has no field {name!r} (fields: {sorted(fields)})")
        values[name] = int(value) if value.lstrip("-").isdigit() else None if value == "None" else value == "True"
    return M2RNNTritonConfig(**values)


def variant_errors(op, batch=2, seqlen=1024, heads=84) -> dict:
    """Relative error of bf16 outputs and gradients against the float32-input Triton path (exact tanh, ieee dots)."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q = torch.randn(batch, seqlen, 1, 64, device=DEVICE, generator=g) / 8
    k = torch.randn(batch, seqlen, 1, 64, device=DEVICE, generator=g) / 2
    v = torch.randn(batch, seqlen, heads, 16, device=DEVICE, generator=g) / 2
    w = 0.8 * torch.eye(16, device=DEVICE) + 0.075 * torch.randn(heads, 16, 16, device=DEVICE, generator=g)
    f = torch.sigmoid(torch.randn(batch, seqlen, heads, device=DEVICE, generator=g) + 1.5)
    dy = torch.randn(batch, seqlen, heads, 16, device=DEVICE, generator=g)

    def outputs(dtype, fn):
        inputs = [x.to(dtype).requires_grad_() for x in (q, k, v, w, f)]
        y, _ = fn(*inputs, gradient_clipping=1.0)
        return [y, *torch.autograd.grad(y, inputs, dy.to(dtype))]

    want, got = outputs(torch.float32, ours()), outputs(torch.bfloat16, op)
    names = ["y", "dq", "dk", "dv", "dw", "df"]
    return {n: ((a.float() - b).norm() / b.norm()).item() for n, a, b in zip(names, got, want)}


def variants(results: dict, peer=None) -> None:
    """Time each config variant (forward+backward at the 400M, 7B and 16K shapes, the 400M transient peak inside
    backward) and measure its bf16 error; the peer's fwd+bwd at the same shapes beside."""
    rows = []
    shapes = ("400M", "7B", "400M 16K context")
    candidates = [(name, ours(dataclasses.replace(CONFIG, **fields))) for name, fields in VARIANTS.items()]
    for name, op in candidates + ([("xma (peer)", peer)] if peer is not None else []):
        try:
            errors = variant_errors(op) if name != "xma (peer)" else {}
            times = [time_forward_backward(*SHAPES[shape], op=op) for shape in shapes]
            peak = memory_kept_for_backward(*SHAPES["400M"], op=op)[1]
            rows.append((name, times, peak, errors))
        except Exception as error:  # a variant that fails to build is reported, the others still run
            rows.append((name, [None] * len(shapes), None, {"error": f"{type(error).__name__}: {str(error)[:200]}"}))
        print(rows[-1], flush=True)
    print(f"\n| variant | {' | '.join(f'{shape} fwd+bwd ms' for shape in shapes)} | 400M peak in backward GB | "
          "bf16 rel. error (y, dq, dk, dv, dW, df) |")
    print("|---|---|---|---|---|---|")
    for name, times, peak, errors in rows:
        cells = " | ".join(f"{t:.3f}" if t is not None else "failed" for t in times)
        peak_cell = f"{peak:.2f}" if peak is not None else ""
        error_cells = ", ".join(f"{v:.1e}" if isinstance(v, float) else v for v in errors.values())
        print(f"| {name} | {cells} | {peak_cell} | {error_cells} |")
    results["variants"] = rows


def time_one_step(batch=8, heads=84, op=None) -> float:
    """µs per eager S == 1 call of the sequence op with a state (decode through the sequence entry point)."""
    q, k, v, w, f = make_inputs(batch, 1, heads)
    state = torch.randn(batch, heads, q.shape[-1], v.shape[-1], device=DEVICE) * 0.3
    call = op or (lambda: m2rnn_recurrence(q, k, v, w, f, state, backend="triton"))
    with torch.no_grad():
        for _ in range(10):
            call()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(500):
            call()
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / 500 * 1e6


def profile_once() -> None:
    """One forward and one forward+backward at the 400M shape after a warm-up: a short run for ncu."""
    inputs = make_inputs(*SHAPES["400M"], requires_grad=True)
    for _ in range(2):
        y, _ = ours()(*inputs, gradient_clipping=1.0)
        torch.autograd.grad(y, inputs, torch.ones_like(y))
    torch.cuda.synchronize()


def main() -> None:
    global CONFIG
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vs-xma", metavar="PATH", help="time the authors' xma kernel from this checkout/wheel too")
    parser.add_argument("--sweep", action="store_true", help="also time the row block variants")
    parser.add_argument("--variants", action="store_true", help="time and check the launch-config variants")
    parser.add_argument("--variants-only", action="store_true", help="only the variants (and the peer beside them)")
    parser.add_argument("--profile", action="store_true", help="run one forward+backward (for ncu) and exit")
    parser.add_argument("--config", action="append", default=[], metavar="FIELD=VALUE",
                        help="set a field of M2RNNTritonConfig for every timing (ints, True/False, None)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    CONFIG = parse_config(args.config, "--config")
    if args.profile:
        return profile_once()
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}, "
          f"{CONFIG}")
    results: dict = {"gpu": props.name, "torch": torch.__version__, "triton": triton.__version__,
                     "config": dataclasses.asdict(CONFIG)}
    peer, peer_note = xma_op(args.vs_xma) if args.vs_xma else (None, "not asked (--vs-xma PATH)")
    print("peer:", peer_note, flush=True)
    if args.variants_only:
        variants(results, peer)
        if args.json:
            with open(args.json, "w") as out:
                json.dump(results, out, indent=1)
        return

    table = []
    for name, shape in SHAPES.items():
        floor = floors(*shape)
        for what, timer in (("fwd", time_forward), ("fwd+bwd", time_forward_backward)):
            if name == "400M batch-1 prefill" and what == "fwd+bwd":
                continue
            ms = timer(*shape)
            peer_ms = None
            if peer is not None:
                try:
                    peer_ms = timer(*shape, op=peer)
                except Exception as error:  # the peer's failure is reported, ours still stand
                    peer_note += f"; {name} {what}: {type(error).__name__}: {str(error)[:120]}"
            table.append((name, what, ms, floor[what], peer_ms))
            print(table[-1], flush=True)
    kept_gb, peak_gb = memory_kept_for_backward(*SHAPES["400M"])
    peer_memory = memory_kept_for_backward(*SHAPES["400M"], op=peer) if peer is not None else (None, None)
    eager_us, graph_us = time_decode()
    one_step_us = time_one_step()
    peer_one_step_us = None
    if peer is not None:
        q, k, v, w, f = make_inputs(8, 1, 84)
        state = torch.randn(8, 84, 64, 16, device=DEVICE) * 0.3
        from xma import KernelBackend  # noqa: F401  (importable: xma_op put it in sys.modules)
        from xma.layers.m2rnn import m2rnn as xma_m2rnn
        state_16 = state.to(q.dtype)  # xma's single-step kernel wants the state in the inputs' dtype
        try:
            peer_one_step_us = time_one_step(
                op=lambda: xma_m2rnn(q, k, v, w, f, state_16, kernel_backend=KernelBackend.triton))
        except Exception as error:  # the peer's failure is reported, ours still stand
            peer_note += f"; S=1: {type(error).__name__}: {str(error)[:120]}"
    gdn = {name: time_gdn(*shape) for name, shape in GDN_SHAPES.items()}

    def text(x, unit=""):
        return f"{x:.3f}{unit}" if isinstance(x, float) else "n/a"

    print("\n| shape | pass | ours (ms) | floor (ms) | target (ms) | xma, same process (ms) | fla GDN (ms) |")
    print("|---|---|---|---|---|---|---|")
    for name, what, ms, floor_ms, peer_ms in table:
        gdn_ms = gdn.get(name, (None, None, ""))[0 if what == "fwd" else 1]
        print(f"| {name} | {what} | {ms:.3f} | {floor_ms:.3f} | {TARGETS_MS.get((name, what))} | {text(peer_ms)} | "
              f"{text(gdn_ms)} |")
    by = {(name, what): ms for name, what, ms, _, _ in table}
    ratio = (by[("400M 16K context", "fwd+bwd")] / by[("400M", "fwd+bwd")])
    print(f"| 16K vs 4K, equal tokens | fwd+bwd per token | {ratio:.2f}x | 1.00x | <= 1.3x | | |")
    print(f"| decode B=8 N=84 | wall per eager call | {eager_us:.1f} µs | ~2 µs launch | | | |")
    print(f"| decode B=8 N=84 | CUDA graph replay | {graph_us:.1f} µs | ~2 µs (5.5 MB state r+w) | | | |")
    print(f"| S=1 via m2rnn_recurrence | wall per eager call | {one_step_us:.1f} µs | | | {text(peer_one_step_us, ' µs')} | |")
    ckpt_gb = 8 * 84 * 64 * 16 * 4096 / CONFIG.checkpoint_interval * 4 / 1e9
    print(f"| 400M memory | kept for backward | {kept_gb:.3f} GB | {ckpt_gb:.3f} GB checkpoints | 0.25 GB | "
          f"{text(peer_memory[0], ' GB')} | |")
    print(f"| 400M memory | transient peak in backward | {peak_gb:.3f} GB | | | {text(peer_memory[1], ' GB')} | |")
    print("\npeer:", peer_note)
    print("fla notes:", {name: note for name, (_, _, note) in gdn.items()})
    print("floors:", {name: {k: round(v, 3) for k, v in floors(*shape).items()} for name, shape in SHAPES.items()})
    for kernel in (forward._m2rnn_fwd_kernel, backward._m2rnn_bwd_kernel):
        print(kernel.fn.__name__, "autotuned:", {str(key): str(cfg) for key, cfg in kernel.cache.items()})
    if args.variants:
        variants(results, peer)
    if args.sweep:
        sweep(results)
    results.update(table=table, kept_gb=kept_gb, peak_gb=peak_gb, peer_memory=peer_memory, decode_eager_us=eager_us,
                   decode_graph_us=graph_us, one_step_us=one_step_us, peer_one_step_us=peer_one_step_us,
                   peer=peer_note, gdn={k: list(v) for k, v in gdn.items()})
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=1)


if __name__ == "__main__":
    main()
