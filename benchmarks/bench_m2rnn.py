"""Benchmark of the Triton M2RNN recurrence at the paper's shapes (needs CUDA); prints a markdown table.

    python benchmarks/bench_m2rnn.py [--sweep] [--json out.json]

Times are medians of `triton.testing.do_bench` (bf16 inputs, recurrence op only, no projections). Each figure is
printed beside its floor and the DESIGN.md target. `--sweep` also times the row block (BLOCK_K) and checkpoint
interval variants, which is how the launch heuristics were chosen. fla's Gated DeltaNet at the same model's GDN
shape is timed too when fla is importable.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import triton
from triton.testing import do_bench

from m2rnn.kernels import m2rnn_triton
from m2rnn.kernels.m2rnn_triton import m2rnn_decode_step_triton, m2rnn_recurrence_triton

DEVICE = "cuda"
SM_CLOCK_HZ = 1.98e9  # H100 SXM boost clock
SFU_TANH_PER_CLOCK_PER_SM = 16
FP32_LANES_PER_SM = 128

SHAPES = {  # name: (batch, seqlen, heads)
    "400M": (8, 4096, 84),
    "7B": (4, 4096, 132),
    "400M batch-1 prefill": (1, 4096, 84),
}
TARGETS_MS = {("400M", "fwd"): 1.0, ("400M", "fwd+bwd"): 3.2, ("7B", "fwd"): 1.0, ("7B", "fwd+bwd"): 3.0,
              ("400M batch-1 prefill", "fwd"): 1.0}
AUTHORS_MS = {("400M", "fwd"): 4.20, ("400M", "fwd+bwd"): 18.4, ("7B", "fwd"): 3.95, ("7B", "fwd+bwd"): 15.8,
              ("400M batch-1 prefill", "fwd"): 4.19}
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


def time_forward(batch, seqlen, heads) -> float:
    inputs = make_inputs(batch, seqlen, heads)
    with torch.no_grad():
        return median_ms(lambda: m2rnn_recurrence_triton(*inputs))


def time_forward_backward(batch, seqlen, heads) -> float:
    inputs = make_inputs(batch, seqlen, heads, requires_grad=True)
    dy = torch.randn(batch, seqlen, heads, inputs[2].shape[-1], device=DEVICE, dtype=torch.bfloat16)

    def step():
        y, _ = m2rnn_recurrence_triton(*inputs, gradient_clipping=1.0)
        torch.autograd.grad(y, inputs, dy)

    return median_ms(step)


def memory_kept_for_backward(batch, seqlen, heads) -> tuple[float, float]:
    """GB held between forward and backward beyond inputs and outputs, and the peak during backward."""
    inputs = make_inputs(batch, seqlen, heads, requires_grad=True)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    y, ht = m2rnn_recurrence_triton(*inputs, gradient_clipping=1.0)
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
    grid, flags = (batch * heads,), m2rnn_triton._math_flags(v.dtype)
    y = torch.empty(batch, heads, v.shape[-1], device=DEVICE, dtype=v.dtype)
    launch_args = (*args, state, y, *(s for x in (q[:, 0], k[:, 0], v[:, 0], f[:, 0]) for s in x.stride()[:2]))
    launch_kwargs = dict(N=heads, NQ=1, NK=1, NV=heads, NF=heads, NW=heads, K=q.shape[-1], V=v.shape[-1],
                         BLOCK_K=q.shape[-1], BLOCK_V=16, **flags, num_warps=2)
    for _ in range(10):
        m2rnn_triton._m2rnn_decode_kernel[grid](*launch_args, **launch_kwargs)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        m2rnn_triton._m2rnn_decode_kernel[grid](*launch_args, **launch_kwargs)
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


def floors(batch, seqlen, heads, key_dim=64, value_dim=16) -> dict:
    """Lower bounds in ms: tanh on the special-function units, and for backward the FP32 elementwise work."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    elements = batch * seqlen * heads * key_dim * value_dim
    tanh_ms = elements / (sms * SFU_TANH_PER_CLOCK_PER_SM * SM_CLOCK_HZ) * 1e3
    # backward: ~10 FP32 ops per state element per step (carry, dX, df, dq, dk, dv) on 128 lanes per SM
    backward_alu_ms = 10 * elements / (sms * FP32_LANES_PER_SM * SM_CLOCK_HZ) * 1e3
    # one dependent step: mma + add + tanh + gate FMA + a register-layout shuffle, ~150 cycles
    chain_ms = seqlen * 150 / SM_CLOCK_HZ * 1e3
    return {
        "fwd": max(tanh_ms, chain_ms),
        # forward + one recompute of every tanh (the minimum with O(S/C) memory) + the backward arithmetic
        "fwd+bwd": max(2 * tanh_ms + backward_alu_ms, 2 * chain_ms),
        "tanh_ms": tanh_ms,
        "chain_ms": chain_ms,
    }


def sweep(results: dict) -> None:
    """Row block and checkpoint interval variants at the 400M and batch-1 shapes."""
    rows = []
    for block_k in (16, 32, 64):
        m2rnn_triton.BLOCK_K_OVERRIDE = block_k
        rows.append(("400M fwd", f"BLOCK_K={block_k}", time_forward(*SHAPES["400M"])))
        rows.append(("B=1 fwd", f"BLOCK_K={block_k}", time_forward(*SHAPES["400M batch-1 prefill"])))
        if block_k > 16:
            rows.append(("400M fwd+bwd", f"BLOCK_K={block_k} C=64", time_forward_backward(*SHAPES["400M"])))
    m2rnn_triton.BLOCK_K_OVERRIDE = None
    print("\n| what | variant | ms |\n|---|---|---|")
    for what, variant, ms in rows:
        print(f"| {what} | {variant} | {ms:.3f} |")
    results["sweep"] = rows


VARIANTS = {  # name: knobs of m2rnn_triton
    "tf32 H@W": dict(HALF_PRECISION_STATE_DOT=False, LOOP_UNROLL=1),
    "fp16 H@W": dict(HALF_PRECISION_STATE_DOT=True, LOOP_UNROLL=1),
    "fp16 H@W, unroll 2": dict(HALF_PRECISION_STATE_DOT=True, LOOP_UNROLL=2),
    "fp16 H@W, unroll 4": dict(HALF_PRECISION_STATE_DOT=True, LOOP_UNROLL=4),
    "fp16 H@W, BLOCK_K=32": dict(HALF_PRECISION_STATE_DOT=True, LOOP_UNROLL=1, BLOCK_K_OVERRIDE=32),
    "fp16 H@W, C=16": dict(HALF_PRECISION_STATE_DOT=True, LOOP_UNROLL=1, CHECKPOINT_INTERVAL=16),
}


def set_knobs(**knobs) -> dict:
    """Set module knobs of m2rnn_triton; returns the previous values."""
    previous = {name: getattr(m2rnn_triton, name) for name in knobs}
    for name, value in knobs.items():
        setattr(m2rnn_triton, name, value)
    return previous


def apply_knob(item: str, option: str) -> None:
    """Set one knob from "NAME=VALUE" text (ints, True/False), or exit naming the option and the bad name."""
    name, _, value = item.partition("=")
    if not hasattr(m2rnn_triton, name):
        raise SystemExit(f"{option}: m2rnn_triton has no knob named {name!r}")
    set_knobs(**{name: int(value) if value.lstrip("-").isdigit() else value == "True"})


def variant_errors(batch=2, seqlen=1024, heads=84) -> dict:
    """Relative error of bf16 outputs and gradients against the float32-input Triton path (exact tanh, ieee dots)."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q = torch.randn(batch, seqlen, 1, 64, device=DEVICE, generator=g) / 8
    k = torch.randn(batch, seqlen, 1, 64, device=DEVICE, generator=g) / 2
    v = torch.randn(batch, seqlen, heads, 16, device=DEVICE, generator=g) / 2
    w = 0.8 * torch.eye(16, device=DEVICE) + 0.075 * torch.randn(heads, 16, 16, device=DEVICE, generator=g)
    f = torch.sigmoid(torch.randn(batch, seqlen, heads, device=DEVICE, generator=g) + 1.5)
    dy = torch.randn(batch, seqlen, heads, 16, device=DEVICE, generator=g)

    def outputs(dtype):
        inputs = [x.to(dtype).requires_grad_() for x in (q, k, v, w, f)]
        y, _ = m2rnn_recurrence_triton(*inputs, gradient_clipping=1.0)
        return [y, *torch.autograd.grad(y, inputs, dy.to(dtype))]

    want, got = outputs(torch.float32), outputs(torch.bfloat16)
    names = ["y", "dq", "dk", "dv", "dw", "df"]
    return {n: ((a.float() - b).norm() / b.norm()).item() for n, a, b in zip(names, got, want)}


def variants(results: dict) -> None:
    """Time each knob combination (forward, batch-1 forward, forward+backward) and measure its bf16 error."""
    rows = []
    for name, knobs in VARIANTS.items():
        previous = set_knobs(**knobs)
        try:
            errors = variant_errors()
            fwd = time_forward(*SHAPES["400M"])
            prefill = time_forward(*SHAPES["400M batch-1 prefill"])
            both = time_forward_backward(*SHAPES["400M"])
            rows.append((name, fwd, prefill, both, errors))
        except Exception as error:  # a variant that fails to build is reported, the others still run
            rows.append((name, None, None, None, {"error": f"{type(error).__name__}: {str(error)[:200]}"}))
        finally:
            set_knobs(**previous)
        print(rows[-1], flush=True)
    print("\n| variant | 400M fwd ms | B=1 fwd ms | 400M fwd+bwd ms | bf16 rel. error (y, dq, dk, dv, dW, df) |")
    print("|---|---|---|---|---|")
    for name, fwd, prefill, both, errors in rows:
        times = " | ".join(f"{t:.3f}" if t is not None else "failed" for t in (fwd, prefill, both))
        print(f"| {name} | {times} | {', '.join(f'{v:.1e}' if isinstance(v, float) else v for v in errors.values())} |")
    results["variants"] = rows


def profile_once() -> None:
    """One forward and one forward+backward at the 400M shape after a warm-up: a short run for ncu."""
    inputs = make_inputs(*SHAPES["400M"], requires_grad=True)
    for _ in range(2):
        y, _ = m2rnn_recurrence_triton(*inputs, gradient_clipping=1.0)
        torch.autograd.grad(y, inputs, torch.ones_like(y))
    torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time BLOCK_K / checkpoint-interval variants")
    parser.add_argument("--variants", action="store_true", help="time and check the kernel knob combinations")
    parser.add_argument("--profile", action="store_true", help="run one forward+backward (for ncu) and exit")
    parser.add_argument("--knob", action="append", default=[], metavar="NAME=VALUE",
                        help="set a knob of m2rnn.kernels.m2rnn_triton first (ints and True/False)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    for item in args.knob:
        apply_knob(item, "--knob")
    if args.profile:
        return profile_once()
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}")
    results: dict = {"gpu": props.name, "torch": torch.__version__, "triton": triton.__version__}
    if args.sweep:
        sweep(results)
    if args.variants:
        variants(results)

    table = []
    for name, shape in SHAPES.items():
        floor = floors(*shape)
        table.append((name, "fwd", time_forward(*shape), floor["fwd"]))
        if name != "400M batch-1 prefill":
            table.append((name, "fwd+bwd", time_forward_backward(*shape), floor["fwd+bwd"]))
    kept_gb, peak_gb = memory_kept_for_backward(*SHAPES["400M"])
    eager_us, graph_us = time_decode()
    gdn = {name: time_gdn(*shape) for name, shape in GDN_SHAPES.items()}

    print("\n| shape | pass | triton (ms) | floor (ms) | target (ms) | authors' kernel (ms) | fla GDN (ms) |")
    print("|---|---|---|---|---|---|---|")
    for name, what, ms, floor_ms in table:
        gdn_ms = gdn.get(name, (None, None, ""))[0 if what == "fwd" else 1]
        gdn_text = f"{gdn_ms:.3f}" if gdn_ms is not None else "n/a"
        print(f"| {name} | {what} | {ms:.3f} | {floor_ms:.3f} | {TARGETS_MS[(name, what)]} | "
              f"{AUTHORS_MS[(name, what)]} | {gdn_text} |")
    print(f"| decode B=8 N=84 | wall per eager call | {eager_us:.1f} µs | ~2 µs launch | 15 µs | 188 µs | |")
    print(f"| decode B=8 N=84 | CUDA graph replay | {graph_us:.1f} µs | ~2 µs (5.5 MB state r+w) | 15 µs | | |")
    ckpt_gb = 8 * 84 * 64 * 16 * 4096 / m2rnn_triton.CHECKPOINT_INTERVAL * 4 / 1e9
    print(f"| 400M memory | kept for backward | {kept_gb:.3f} GB | {ckpt_gb:.3f} GB checkpoints | 0.25 GB | 5.6 GB | |")
    print(f"| 400M memory | transient peak in backward | {peak_gb:.3f} GB | | | | |")
    print("\nfla notes:", {name: note for name, (_, _, note) in gdn.items()})
    print("floors:", {name: {k: round(v, 3) for k, v in floors(*shape).items()} for name, shape in SHAPES.items()})
    for kernel in (m2rnn_triton._m2rnn_fwd_kernel, m2rnn_triton._m2rnn_bwd_kernel):
        print(kernel.fn.__name__, "autotuned:", {str(key): str(cfg) for key, cfg in kernel.cache.items()})
    results.update(table=table, kept_gb=kept_gb, peak_gb=peak_gb, decode_eager_us=eager_us, decode_graph_us=graph_us,
                   gdn={k: list(v) for k, v in gdn.items()})
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=1)


if __name__ == "__main__":
    main()
