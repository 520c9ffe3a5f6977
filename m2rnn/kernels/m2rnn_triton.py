"""Triton backend of the M2RNN recurrence: forward, chunk-checkpointed backward, and a one-token decode step.

Per head n and step t (DESIGN.md, "The recurrence op"):

    Z_t = tanh(H_{t-1} @ W_n + k_t v_tᵀ)
    H_t = f_t · H_{t-1} + (1 - f_t) · Z_t
    y_t = q_tᵀ H_t

Rows of H (the K axis) never interact, so one program owns a ``(BLOCK_K, V)`` row block of one head's state for
the whole sequence and the K axis can be split across programs when batch × heads is too small to fill the GPU.

Forward: the state and the gate live in float32 registers; every ``CHUNK`` steps the state is written to a
checkpoint buffer (memory ``B·N·K·V·S/CHUNK`` floats), the only thing kept for backward besides the inputs.

Backward, per program and per chunk, last chunk first: (A) recompute the chunk's states from its checkpoint into
a chunk-sized scratch buffer, (B) walk the chunk backwards. Only the carry ∂L/∂H sits on the dependency chain;
every other gradient is written as a per-head (and per row block) partial and reduced afterwards by a plain
``sum`` in torch, so grouped heads (Nq = Nk = 1 in the paper models) never contend on atomics.

``gradient_clipping=c`` clamps the carry ∂L/∂H_t arriving from step t+1 (and the incoming ∂L/∂H_T) to [-c, c]
before the readout term q_t dy_tᵀ is added, exactly as `m2rnn_torch.py`.

Both triton 3.6 (GPU) and 3.9 (CPU interpreter) are supported: plain pointer arithmetic (no block pointers),
loads upcast to float32 at once (the interpreter cannot do bf16 arithmetic), `tanh.approx.f32` behind a
constexpr switch that is off under ``TRITON_INTERPRET=1``, and a single autotune config under the interpreter.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .m2rnn_torch import m2rnn_recurrence_torch
from .utils import check_recurrence_inputs

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

MAX_KEY_DIM = 256
MAX_VALUE_DIM = 64
# Steps between two stored states. Memory kept for backward is B·N·K·V·S/CHECKPOINT_INTERVAL floats.
CHECKPOINT_INTERVAL = 64
# Pins the row block (16, 32 or 64) instead of the heuristic; for benchmarks and tests.
BLOCK_K_OVERRIDE: int | None = None
# Run H @ W with float16 operands (float32 accumulation) for 16-bit inputs; the carried state stays float32.
# |H| ≤ max(1, |H_0|), so float16 keeps the 10-bit mantissa of tf32 without its range, and the tensor cores can
# take H straight from the accumulator registers.
HALF_PRECISION_STATE_DOT = False
# Unroll factor of the sequential loops, so that the compiler can overlap step t's readout and stores with
# step t+1's dependent chain.
LOOP_UNROLL = 1


def _autotune_configs() -> list[triton.Config]:
    """Warps per program to try; ``M2RNN_TRITON_NUM_WARPS=n`` pins one (profilers, reproducible timings)."""
    pinned = os.environ.get("M2RNN_TRITON_NUM_WARPS")
    warps = [int(pinned)] if pinned else [4] if INTERPRET else [1, 2, 4]
    return [triton.Config({}, num_warps=w, num_stages=1) for w in warps]


# --------------------------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _tanh(x, TANH_MODE: tl.constexpr):
    """tanh of a float32 tensor. TANH_MODE 0: exp-based exact form (CPU interpreter, float32 inputs);
    1: the special-function unit's approximation (`tanh.approx.f16x2` was tried: sm_90 splits it into one
    MUFU op per element, so it saves nothing)."""
    if TANH_MODE == 1:
        out = tl.inline_asm_elementwise(
            "tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        # exp overflow gives 1 - 2/inf = 1, underflow gives 1 - 2/1 = -1: saturates cleanly at both ends.
        out = 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)
    return out


@triton.jit
def _recurrence_step(h, w_dot, k, v, f, TANH_MODE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One step on a float32 row block h (BLOCK_K, BLOCK_V); returns the new block and Z.

    H @ W runs in w_dot's dtype with float32 accumulation: float32 (tf32/ieee) by default; 16-bit operands with
    HALF_PRECISION_STATE_DOT, which may let the compiler feed the tensor cores from registers without a trip
    through shared memory on every step. The carry f·H itself always stays float32.
    """
    z = _tanh(tl.dot(h.to(w_dot.dtype), w_dot, input_precision=DOT_PRECISION) + k[:, None] * v[None, :], TANH_MODE)
    return h + (1.0 - f) * (z - h), z


@triton.jit
def _load_step_inputs(q_base, k_base, v_base, f_base, tok, row_mask, col_mask,
                      NQ: tl.constexpr, NK: tl.constexpr, NV: tl.constexpr, NF: tl.constexpr,
                      K: tl.constexpr, V: tl.constexpr):
    """q_t, k_t (BLOCK_K,), v_t (BLOCK_V,) and f_t of token tok (int64), upcast to float32."""
    q_t = tl.load(q_base + tok * (NQ * K), mask=row_mask, other=0.0).to(tl.float32)
    k_t = tl.load(k_base + tok * (NK * K), mask=row_mask, other=0.0).to(tl.float32)
    v_t = tl.load(v_base + tok * (NV * V), mask=col_mask, other=0.0).to(tl.float32)
    f_t = tl.load(f_base + tok * NF).to(tl.float32)
    return q_t, k_t, v_t, f_t


@triton.jit
def _sequence_bounds(cu_seqlens_ptr, chunk_offsets_ptr, b, seqlen, chunks_per_seq, IS_VARLEN: tl.constexpr):
    """First token (int64), length and index of the first checkpoint of sequence b."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens_ptr + b).to(tl.int64)
        eos = tl.load(cu_seqlens_ptr + b + 1).to(tl.int64)
        first_chunk = tl.load(chunk_offsets_ptr + b).to(tl.int64)
    else:
        bos = b.to(tl.int64) * seqlen
        eos = bos + seqlen
        first_chunk = b.to(tl.int64) * chunks_per_seq
    return bos, (eos - bos).to(tl.int32), first_chunk


# --------------------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------------------


@triton.autotune(configs=_autotune_configs(), key=["BLOCK_K", "BLOCK_V", "work_bucket", "STORE_CHECKPOINTS"])
@triton.jit
def _m2rnn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, w_ptr, f_ptr, h0_ptr,
    y_ptr, ht_ptr, checkpoint_ptr,
    cu_seqlens_ptr, chunk_offsets_ptr,
    seqlen, chunks_per_seq, total_tokens, work_bucket,
    N: tl.constexpr, NQ: tl.constexpr, NK: tl.constexpr, NV: tl.constexpr, NF: tl.constexpr, NW: tl.constexpr,
    K: tl.constexpr, V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, CHUNK: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_H0: tl.constexpr, STORE_CHECKPOINTS: tl.constexpr, LOOP_UNROLL: tl.constexpr,
    TANH_MODE: tl.constexpr, DOT_PRECISION: tl.constexpr, STATE_DOT_DTYPE: tl.constexpr,
):
    """Run one (sequence, head, row block) through the whole sequence.

    Grid: (B·N, ⌈K/BLOCK_K⌉). Writes y (per row block when K is split: y_ptr is (⌈K/BLOCK_K⌉, T, N, V) and the
    caller sums the blocks), the final state, and with STORE_CHECKPOINTS the state before every CHUNK-th step.
    Inputs of step t+1 are loaded before step t is computed so their latency stays off the sequential chain.
    Needs at least one token in the whole batch (the caller handles T = 0).
    """
    pid_bn = tl.program_id(0)
    pid_k = tl.program_id(1)
    b = pid_bn // N
    n = pid_bn % N
    bos, length, first_chunk = _sequence_bounds(cu_seqlens_ptr, chunk_offsets_ptr, b, seqlen, chunks_per_seq, IS_VARLEN)

    rows = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tl.arange(0, BLOCK_V)
    row_mask = rows < K
    col_mask = cols < V
    tile_mask = row_mask[:, None] & col_mask[None, :]
    state_tile = rows[:, None] * V + cols[None, :]

    w = tl.load(
        w_ptr + (n // (N // NW)) * V * V + cols[:, None] * V + cols[None, :],
        mask=col_mask[:, None] & col_mask[None, :], other=0.0,
    ).to(tl.float32)
    head_state = (b.to(tl.int64) * N + n) * (K * V)
    if HAS_H0:
        h = tl.load(h0_ptr + head_state + state_tile, mask=tile_mask, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)

    q_base = q_ptr + (n // (N // NQ)) * K + rows
    k_base = k_ptr + (n // (N // NK)) * K + rows
    v_base = v_ptr + (n // (N // NV)) * V + cols
    f_base = f_ptr + n // (N // NF)
    y_base = y_ptr + (pid_k.to(tl.int64) * total_tokens * N + n) * V + cols

    # Step t+1's inputs are loaded during step t; the index is clamped into the sequence so no mask is needed.
    last_tok = tl.maximum(bos + length - 1, 0)
    w_dot = w.to(STATE_DOT_DTYPE)
    q_t, k_t, v_t, f_t = _load_step_inputs(
        q_base, k_base, v_base, f_base, tl.minimum(bos, last_tok), row_mask, col_mask, NQ, NK, NV, NF, K, V
    )
    # Chunks outside, steps inside: the checkpoint store stays out of the step loop's body.
    for chunk in range(tl.cdiv(length, CHUNK)):
        if STORE_CHECKPOINTS:
            tl.store(checkpoint_ptr + ((first_chunk + chunk) * N + n) * (K * V) + state_tile, h, mask=tile_mask)
        chunk_start = bos + chunk * CHUNK
        chunk_end = tl.minimum(chunk_start + CHUNK, bos + length)
        for tok in tl.range(chunk_start, chunk_end, loop_unroll_factor=LOOP_UNROLL):
            q_next, k_next, v_next, f_next = _load_step_inputs(
                q_base, k_base, v_base, f_base, tl.minimum(tok + 1, last_tok), row_mask, col_mask, NQ, NK, NV, NF, K, V
            )
            h, _z = _recurrence_step(h, w_dot, k_t, v_t, f_t, TANH_MODE, DOT_PRECISION)
            y_t = tl.sum(q_t[:, None] * h, axis=0)
            tl.store(y_base + tok * (N * V), y_t.to(y_ptr.dtype.element_ty), mask=col_mask)
            q_t, k_t, v_t, f_t = q_next, k_next, v_next, f_next
    tl.store(ht_ptr + head_state + state_tile, h, mask=tile_mask)


# --------------------------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------------------------


@triton.autotune(configs=_autotune_configs(), key=["BLOCK_K", "BLOCK_V", "work_bucket", "CLIP"])
@triton.jit
def _m2rnn_bwd_kernel(
    q_ptr, k_ptr, v_ptr, w_ptr, f_ptr, checkpoint_ptr, dy_ptr, dht_ptr,
    dq_ptr, dk_ptr, dv_ptr, df_ptr, dw_ptr, dh0_ptr, scratch_ptr,
    cu_seqlens_ptr, chunk_offsets_ptr,
    seqlen, chunks_per_seq, total_tokens, work_bucket, clip,
    N: tl.constexpr, NQ: tl.constexpr, NK: tl.constexpr, NV: tl.constexpr, NF: tl.constexpr, NW: tl.constexpr,
    K: tl.constexpr, V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, CHUNK: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr, CLIP: tl.constexpr,
    LOOP_UNROLL: tl.constexpr, TANH_MODE: tl.constexpr, DOT_PRECISION: tl.constexpr, STATE_DOT_DTYPE: tl.constexpr,
):
    """Backward of one (sequence, head, row block), chunk by chunk from the last.

    Grid: (B·N, ⌈K/BLOCK_K⌉). Outputs are partials, reduced by the caller:
      dq_ptr, dk_ptr: (T, N, K) per state head (rows are disjoint across row blocks);
      dv_ptr: (⌈K/BLOCK_K⌉, T, N, V), df_ptr: (⌈K/BLOCK_K⌉, T, N), dw_ptr: (⌈K/BLOCK_K⌉, B, N, V, V);
      dh0_ptr: (B, N, K, V) float32.
    scratch_ptr holds CHUNK recomputed states per program (rewritten for every chunk). Both walks load the next
    step's inputs before computing the current one; the recomputation repeats the forward's arithmetic exactly.
    """
    pid_bn = tl.program_id(0)
    pid_k = tl.program_id(1)
    b = pid_bn // N
    n = pid_bn % N
    bos, length, first_chunk = _sequence_bounds(cu_seqlens_ptr, chunk_offsets_ptr, b, seqlen, chunks_per_seq, IS_VARLEN)

    rows = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tl.arange(0, BLOCK_V)
    row_mask = rows < K
    col_mask = cols < V
    tile_mask = row_mask[:, None] & col_mask[None, :]
    state_tile = rows[:, None] * V + cols[None, :]
    w_mask = col_mask[:, None] & col_mask[None, :]
    w_head = w_ptr + (n // (N // NW)) * V * V
    w = tl.load(w_head + cols[:, None] * V + cols[None, :], mask=w_mask, other=0.0).to(tl.float32)
    w_t = tl.load(w_head + cols[None, :] * V + cols[:, None], mask=w_mask, other=0.0).to(tl.float32)
    w_dot = w.to(STATE_DOT_DTYPE)

    head_state = (b.to(tl.int64) * N + n) * (K * V)
    if HAS_DHT:
        dh = tl.load(dht_ptr + head_state + state_tile, mask=tile_mask, other=0.0).to(tl.float32)
    else:
        dh = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
    dw_acc = tl.zeros([BLOCK_V, BLOCK_V], dtype=tl.float32)

    block_tile = tl.arange(0, BLOCK_K)[:, None] * BLOCK_V + cols[None, :]
    scratch = scratch_ptr + (pid_bn.to(tl.int64) * ((K + BLOCK_K - 1) // BLOCK_K) + pid_k) * (CHUNK * BLOCK_K * BLOCK_V)
    q_base = q_ptr + (n // (N // NQ)) * K + rows
    k_base = k_ptr + (n // (N // NK)) * K + rows
    v_base = v_ptr + (n // (N // NV)) * V + cols
    f_base = f_ptr + n // (N // NF)
    dy_base = dy_ptr + n * V + cols
    dqk_base = n * K + rows
    partial_token = pid_k.to(tl.int64) * total_tokens

    num_chunks = tl.cdiv(length, CHUNK)
    for chunk_from_end in range(num_chunks):
        chunk = num_chunks - 1 - chunk_from_end
        start = bos + chunk * CHUNK
        chunk_len = tl.minimum(CHUNK, length - chunk * CHUNK)

        # (A) states before each step of the chunk, into scratch.
        h = tl.load(checkpoint_ptr + ((first_chunk + chunk) * N + n) * (K * V) + state_tile, mask=tile_mask, other=0.0)
        tl.store(scratch + block_tile, h)
        _q, k_t, v_t, f_t = _load_step_inputs(q_base, k_base, v_base, f_base, start, row_mask, col_mask, NQ, NK, NV, NF, K, V)
        for i in tl.range(1, chunk_len, loop_unroll_factor=LOOP_UNROLL):
            _q, k_next, v_next, f_next = _load_step_inputs(
                q_base, k_base, v_base, f_base, start + i, row_mask, col_mask, NQ, NK, NV, NF, K, V
            )
            h, _z = _recurrence_step(h, w_dot, k_t, v_t, f_t, TANH_MODE, DOT_PRECISION)
            tl.store(scratch + i * (BLOCK_K * BLOCK_V) + block_tile, h)
            k_t, v_t, f_t = k_next, v_next, f_next
        tl.debug_barrier()

        # (B) walk the chunk backwards.
        tok = start + chunk_len - 1
        h_prev = tl.load(scratch + (chunk_len - 1) * (BLOCK_K * BLOCK_V) + block_tile)
        q_t, k_t, v_t, f_t = _load_step_inputs(q_base, k_base, v_base, f_base, tok, row_mask, col_mask, NQ, NK, NV, NF, K, V)
        dy_t = tl.load(dy_base + tok * (N * V), mask=col_mask, other=0.0).to(tl.float32)
        for i_from_end in tl.range(0, chunk_len, loop_unroll_factor=LOOP_UNROLL):
            i_next = tl.maximum(chunk_len - 2 - i_from_end, 0)
            h_prev_next = tl.load(scratch + i_next * (BLOCK_K * BLOCK_V) + block_tile)
            q_next, k_next, v_next, f_next = _load_step_inputs(
                q_base, k_base, v_base, f_base, start + i_next, row_mask, col_mask, NQ, NK, NV, NF, K, V
            )
            dy_next = tl.load(dy_base + (start + i_next) * (N * V), mask=col_mask, other=0.0).to(tl.float32)

            h_cur, z = _recurrence_step(h_prev, w_dot, k_t, v_t, f_t, TANH_MODE, DOT_PRECISION)
            tl.store(dq_ptr + tok * (N * K) + dqk_base, tl.sum(h_cur * dy_t[None, :], axis=1), mask=row_mask)

            if CLIP:
                dh = tl.minimum(tl.maximum(dh, -clip), clip)
            dh_total = dh + q_t[:, None] * dy_t[None, :]
            dx = (1.0 - f_t) * dh_total * (1.0 - z * z)
            dh = f_t * dh_total + tl.dot(dx, w_t, input_precision=DOT_PRECISION)

            df_t = tl.sum(tl.sum(dh_total * (h_prev - z), axis=1), axis=0)
            tl.store(df_ptr + (partial_token + tok) * N + n, df_t)
            tl.store(dk_ptr + tok * (N * K) + dqk_base, tl.sum(dx * v_t[None, :], axis=1), mask=row_mask)
            tl.store(dv_ptr + ((partial_token + tok) * N + n) * V + cols, tl.sum(dx * k_t[:, None], axis=0), mask=col_mask)
            dw_acc += tl.dot(tl.trans(h_prev), dx, input_precision=DOT_PRECISION)

            tok = start + i_next
            h_prev, q_t, k_t, v_t, f_t, dy_t = h_prev_next, q_next, k_next, v_next, f_next, dy_next
        tl.debug_barrier()

    if STORE_DH0:
        tl.store(dh0_ptr + head_state + state_tile, dh, mask=tile_mask)
    dw_block = (pid_k.to(tl.int64) * tl.num_programs(0) + pid_bn) * (V * V)
    tl.store(dw_ptr + dw_block + cols[:, None] * V + cols[None, :], dw_acc, mask=w_mask)


# --------------------------------------------------------------------------------------------------------------
# Decode (one token, state updated in place)
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _m2rnn_decode_kernel(
    q_ptr, k_ptr, v_ptr, w_ptr, f_ptr, state_ptr, y_ptr,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_fb, stride_fh,
    N: tl.constexpr, NQ: tl.constexpr, NK: tl.constexpr, NV: tl.constexpr, NF: tl.constexpr, NW: tl.constexpr,
    K: tl.constexpr, V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    TANH_MODE: tl.constexpr, DOT_PRECISION: tl.constexpr, STATE_DOT_DTYPE: tl.constexpr,
):
    """One step for one (sequence, head): state (B, N, K, V) float32 read and written in place, y (B, N, V).

    Grid: (B·N,), the whole K×V state in one program so y needs no reduction. Inputs may be strided views
    (the model slices q, k, v out of one projection); only their last dimension must be contiguous.
    """
    pid = tl.program_id(0)
    b = (pid // N).to(tl.int64)
    n = pid % N
    rows = tl.arange(0, BLOCK_K)
    cols = tl.arange(0, BLOCK_V)
    row_mask = rows < K
    col_mask = cols < V
    tile_mask = row_mask[:, None] & col_mask[None, :]

    state = state_ptr + (b * N + n) * (K * V) + rows[:, None] * V + cols[None, :]
    h = tl.load(state, mask=tile_mask, other=0.0)
    w = tl.load(
        w_ptr + (n // (N // NW)) * V * V + cols[:, None] * V + cols[None, :],
        mask=col_mask[:, None] & col_mask[None, :], other=0.0,
    ).to(tl.float32)
    q = tl.load(q_ptr + b * stride_qb + (n // (N // NQ)) * stride_qh + rows, mask=row_mask, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + b * stride_kb + (n // (N // NK)) * stride_kh + rows, mask=row_mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + b * stride_vb + (n // (N // NV)) * stride_vh + cols, mask=col_mask, other=0.0).to(tl.float32)
    f = tl.load(f_ptr + b * stride_fb + (n // (N // NF)) * stride_fh).to(tl.float32)

    h, _z = _recurrence_step(h, w.to(STATE_DOT_DTYPE), k, v, f, TANH_MODE, DOT_PRECISION)
    tl.store(state, h, mask=tile_mask)
    y = tl.sum(q[:, None] * h, axis=0)
    tl.store(y_ptr + (b * N + n) * V + cols, y.to(y_ptr.dtype.element_ty), mask=col_mask)


# --------------------------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _multiprocessor_count(device_index: int | None) -> int:
    if INTERPRET or not torch.cuda.is_available():
        return 132
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _check_dims(key_dim: int, value_dim: int) -> None:
    if key_dim > MAX_KEY_DIM:
        raise ValueError(f"m2rnn triton kernels: key head dim K={key_dim} is above the supported {MAX_KEY_DIM}")
    if value_dim > MAX_VALUE_DIM:
        raise ValueError(f"m2rnn triton kernels: value head dim V={value_dim} is above the supported {MAX_VALUE_DIM}")


def _block_k(batch_heads: int, key_dim: int, device: torch.device) -> int:
    """Row block: 64 rows per program unless batch × heads leaves the GPU short of programs (batch-1 prefill)."""
    if BLOCK_K_OVERRIDE is not None:
        return BLOCK_K_OVERRIDE
    block_k = min(64, max(16, triton.next_power_of_2(key_dim)))
    wanted_programs = 4 * _multiprocessor_count(device.index if device.type == "cuda" else None)
    while block_k > 16 and batch_heads * triton.cdiv(key_dim, block_k) < wanted_programs:
        block_k //= 2
    return block_k


def _math_flags(dtype: torch.dtype) -> dict:
    """float32 inputs get an exact tanh and full-precision dots; 16-bit inputs the fast approximations: tanh.approx,
    tf32 dots (float16 H @ W operands with HALF_PRECISION_STATE_DOT). The interpreter has no inline assembly."""
    half = dtype in (torch.float16, torch.bfloat16)
    return dict(
        TANH_MODE=1 if half and not INTERPRET else 0,
        DOT_PRECISION="tf32" if half else "ieee",
        STATE_DOT_DTYPE=tl.float16 if half and HALF_PRECISION_STATE_DOT else tl.float32,
    )


class _Layout:
    """Token-major view of the inputs shared by the forward and backward launches."""

    def __init__(self, q, k, v, weight, forget, cu_seqlens, heads: int, checkpoint_interval: int):
        self.packed = cu_seqlens is not None
        if self.packed:
            self.tokens = q.shape[0]
            self.batch = cu_seqlens.numel() - 1
            self.seqlen = 0
            self.chunks_per_seq = 0
            lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int32)
            chunks = (lengths + checkpoint_interval - 1) // checkpoint_interval
            self.chunk_offsets = (torch.cumsum(chunks, 0) - chunks).to(torch.int32)
            self.cu_seqlens = cu_seqlens
        else:
            self.batch, self.seqlen = q.shape[:2]
            self.tokens = self.batch * self.seqlen
            self.chunks_per_seq = triton.cdiv(self.seqlen, checkpoint_interval)
            self.chunk_offsets = None
            self.cu_seqlens = None
        self.heads = heads
        self.total_chunks = checkpoints_shape(q, v, heads, cu_seqlens, checkpoint_interval)[0]
        self.key_dim = q.shape[-1]
        self.value_dim = v.shape[-1]
        self.chunk = checkpoint_interval
        self.block_k = _block_k(self.batch * heads, self.key_dim, q.device)
        self.block_v = max(16, triton.next_power_of_2(self.value_dim))
        self.k_blocks = triton.cdiv(self.key_dim, self.block_k)
        self.grid = (self.batch * heads, self.k_blocks)
        self.work_bucket = triton.next_power_of_2(self.batch * heads * self.k_blocks)
        self.math_flags = _math_flags(q.dtype)
        self.head_counts = dict(
            N=heads, NQ=q.shape[-2], NK=k.shape[-2], NV=v.shape[-2], NF=forget.shape[-1], NW=weight.shape[0]
        )

    def tokens_first(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, heads, ...) or (T, heads, ...) -> contiguous (T, heads, ...)."""
        return x.reshape(self.tokens, *x.shape[(1 if self.packed else 2):]).contiguous()

    def constexprs(self) -> dict:
        return dict(
            **self.head_counts, K=self.key_dim, V=self.value_dim, BLOCK_K=self.block_k, BLOCK_V=self.block_v,
            CHUNK=self.chunk, IS_VARLEN=self.packed, LOOP_UNROLL=LOOP_UNROLL, **self.math_flags,
        )


def _prepare(q, k, v, weight, forget, initial_state, cu_seqlens, heads: int):
    """The launch layout and the kernels' inputs: token-major q, k, v, forget; contiguous weight and h0."""
    layout = _Layout(q, k, v, weight, forget, cu_seqlens, heads, CHECKPOINT_INTERVAL)
    h0 = initial_state.contiguous() if initial_state is not None else None
    q_, k_, v_, f_ = (layout.tokens_first(x) for x in (q, k, v, forget))
    return layout, (q_, k_, v_, weight.contiguous(), f_, h0)


def _forward(layout: _Layout, q, k, v, weight, forget, initial_state, store_checkpoints: bool):
    """Launch the forward kernel on token-major inputs; returns y (T, N, V), final state, checkpoints."""
    device, heads, value_dim = q.device, layout.heads, layout.value_dim
    y_dtype = q.dtype if layout.k_blocks == 1 else torch.float32
    y = torch.empty(layout.k_blocks, layout.tokens, heads, value_dim, dtype=y_dtype, device=device)
    final_state = torch.empty(layout.batch, heads, layout.key_dim, value_dim, dtype=torch.float32, device=device)
    checkpoints = (
        torch.empty(layout.total_chunks, heads, layout.key_dim, value_dim, dtype=torch.float32, device=device)
        if store_checkpoints else final_state
    )
    _m2rnn_fwd_kernel[layout.grid](
        q, k, v, weight, forget, initial_state if initial_state is not None else final_state,
        y, final_state, checkpoints,
        layout.cu_seqlens, layout.chunk_offsets,
        layout.seqlen, layout.chunks_per_seq, layout.tokens, layout.work_bucket,
        HAS_H0=initial_state is not None, STORE_CHECKPOINTS=store_checkpoints, **layout.constexprs(),
    )
    y = y[0] if layout.k_blocks == 1 else y.sum(0).to(q.dtype)
    return y, final_state, (checkpoints if store_checkpoints else None)


def _sum_groups(x: torch.Tensor, groups: int, dim: int) -> torch.Tensor:
    """Sum the per-state-head gradient over the heads of each group: dim of size N -> size `groups`."""
    heads = x.shape[dim]
    if groups == heads:
        return x
    return x.unflatten(dim, (groups, heads // groups)).sum(dim + 1)


def _backward(layout: _Layout, q, k, v, weight, forget, checkpoints, dy, d_final_state, clip, needs_dh0: bool):
    device, heads, key_dim, value_dim = q.device, layout.heads, layout.key_dim, layout.value_dim
    f32 = dict(dtype=torch.float32, device=device)
    dq_heads = torch.empty(layout.tokens, heads, key_dim, **f32)
    dk_heads = torch.empty(layout.tokens, heads, key_dim, **f32)
    dv_parts = torch.empty(layout.k_blocks, layout.tokens, heads, value_dim, **f32)
    df_parts = torch.empty(layout.k_blocks, layout.tokens, heads, **f32)
    dw_parts = torch.empty(layout.k_blocks, layout.batch, heads, value_dim, value_dim, **f32)
    dh0 = torch.empty(layout.batch, heads, key_dim, value_dim, **f32) if needs_dh0 else dw_parts
    programs = layout.grid[0] * layout.grid[1]
    scratch = torch.empty(programs, layout.chunk, layout.block_k, layout.block_v, **f32)
    _m2rnn_bwd_kernel[layout.grid](
        q, k, v, weight, forget, checkpoints, dy, d_final_state if d_final_state is not None else dw_parts,
        dq_heads, dk_heads, dv_parts, df_parts, dw_parts, dh0, scratch,
        layout.cu_seqlens, layout.chunk_offsets,
        layout.seqlen, layout.chunks_per_seq, layout.tokens, layout.work_bucket, float(clip or 0.0),
        HAS_DHT=d_final_state is not None, STORE_DH0=needs_dh0, CLIP=clip is not None, **layout.constexprs(),
    )
    counts = layout.head_counts
    dq = _sum_groups(dq_heads, counts["NQ"], 1)
    dk = _sum_groups(dk_heads, counts["NK"], 1)
    dv = _sum_groups(dv_parts.sum(0) if layout.k_blocks > 1 else dv_parts[0], counts["NV"], 1)
    df = _sum_groups(df_parts.sum(0) if layout.k_blocks > 1 else df_parts[0], counts["NF"], 1)
    dw = _sum_groups(dw_parts.sum((0, 1)), counts["NW"], 0)
    return dq, dk, dv, dw, df, (dh0 if needs_dh0 else None)


def _shapes_and_dtypes(*tensors) -> tuple:
    return tuple(None if x is None else (x.shape, x.dtype) for x in tensors)


def _input_gradients(layout: _Layout, saved, like, checkpoints, dy, d_final_state, clip, needs_dh0: bool):
    """Gradients of (q, k, v, weight, forget, initial_state) from the float32 checkpoints, with the (shape, dtype)
    pairs in `like`; `saved` are the token-major tensors `_prepare` made of the inputs. dh0 is None unless
    `needs_dh0`."""
    q = saved[0]
    if dy is None:
        dy = torch.zeros(layout.tokens, layout.heads, layout.value_dim, dtype=q.dtype, device=q.device)
    dy = dy.reshape(layout.tokens, layout.heads, layout.value_dim).contiguous()
    if d_final_state is not None:
        d_final_state = d_final_state.contiguous()
    grads = _backward(layout, *saved, checkpoints, dy, d_final_state, clip, needs_dh0)
    return tuple(None if g is None else g.reshape(spec[0]).to(spec[1]) for g, spec in zip(grads, like))


class _M2RNNTriton(torch.autograd.Function):
    """Autograd wrapper: forward keeps the inputs and the float32 checkpoints; backward recomputes per chunk."""

    @staticmethod
    def forward(ctx, q, k, v, weight, forget, initial_state, cu_seqlens, heads, gradient_clipping):
        layout, inputs = _prepare(q, k, v, weight, forget, initial_state, cu_seqlens, heads)
        y, final_state, checkpoints = _forward(layout, *inputs, store_checkpoints=True)
        ctx.save_for_backward(*inputs[:5], checkpoints)
        ctx.layout = layout
        ctx.like = _shapes_and_dtypes(q, k, v, weight, forget, initial_state)
        ctx.gradient_clipping = gradient_clipping
        return y.reshape(*q.shape[:-2], heads, v.shape[-1]), final_state

    @staticmethod
    def backward(ctx, dy, d_final_state):
        *saved, checkpoints = ctx.saved_tensors
        needs_dh0 = ctx.like[5] is not None and ctx.needs_input_grad[5]
        grads = _input_gradients(ctx.layout, saved, ctx.like, checkpoints, dy, d_final_state,
                                 ctx.gradient_clipping, needs_dh0)
        return (*grads, None, None, None)


def m2rnn_recurrence_triton_forward(
    q, k, v, weight, forget, initial_state=None, *, cu_seqlens=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward that keeps what the backward needs: ``(y, final_state, checkpoints)``, no autograd.

    For registering the op with `torch.library` (m2rnn.kernels.m2rnn), where autograd is wired outside; pair it with
    `m2rnn_recurrence_triton_backward` on the same inputs. Needs at least one token.
    """
    heads = check_recurrence_inputs(q, k, v, weight, forget, initial_state, cu_seqlens)
    _check_dims(q.shape[-1], v.shape[-1])
    layout, inputs = _prepare(q, k, v, weight, forget, initial_state, cu_seqlens, heads)
    y, final_state, checkpoints = _forward(layout, *inputs, store_checkpoints=True)
    return y.reshape(*q.shape[:-2], heads, v.shape[-1]), final_state, checkpoints


def m2rnn_recurrence_triton_backward(
    q, k, v, weight, forget, initial_state, checkpoints, dy, d_final_state, *, cu_seqlens=None,
    gradient_clipping=None,
) -> tuple[torch.Tensor, ...]:
    """Gradients of (q, k, v, weight, forget, initial_state) from `m2rnn_recurrence_triton_forward`'s checkpoints;
    the last is None without an initial state. `dy` / `d_final_state` may be None (no gradient flowing there)."""
    heads = check_recurrence_inputs(q, k, v, weight, forget, initial_state, cu_seqlens)
    layout, prepared = _prepare(q, k, v, weight, forget, initial_state, cu_seqlens, heads)
    like = _shapes_and_dtypes(q, k, v, weight, forget, initial_state)
    return _input_gradients(layout, prepared[:5], like, checkpoints, dy, d_final_state, gradient_clipping,
                            initial_state is not None)


def checkpoints_shape(q: torch.Tensor, v: torch.Tensor, heads: int, cu_seqlens: torch.Tensor | None,
                      chunk: int | None = None) -> tuple:
    """Shape of the float32 checkpoint buffer the forward keeps (also for shape-only fake tensors)."""
    chunk = chunk or CHECKPOINT_INTERVAL
    if cu_seqlens is None:
        total = q.shape[0] * triton.cdiv(q.shape[1], chunk)
    else:  # Σ ⌈len/C⌉ ≤ T/C + number of sequences: an upper bound that needs no host sync
        total = q.shape[0] // chunk + cu_seqlens.shape[0] - 1
    return (total, heads, q.shape[-1], v.shape[-1])


def m2rnn_recurrence_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    weight: torch.Tensor,
    forget: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    gradient_clipping: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton M2RNN recurrence; shapes and semantics as `m2rnn.kernels.m2rnn_recurrence`.

    K ≤ 256 and V ≤ 64. Any input dtype (bf16, fp16, fp32); state and gate are carried in float32 and the final
    state is float32. Memory kept for backward: the inputs plus B·N·K·V·⌈S/64⌉ float32 checkpoints.
    """
    heads = check_recurrence_inputs(q, k, v, weight, forget, initial_state, cu_seqlens)
    _check_dims(q.shape[-1], v.shape[-1])
    if q.numel() == 0:  # no token at all: nothing to launch
        return m2rnn_recurrence_torch(
            q, k, v, weight, forget, initial_state, cu_seqlens=cu_seqlens, gradient_clipping=gradient_clipping
        )
    tensors = (q, k, v, weight, forget, initial_state)
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors):
        return _M2RNNTriton.apply(q, k, v, weight, forget, initial_state, cu_seqlens, heads, gradient_clipping)
    layout, inputs = _prepare(q, k, v, weight, forget, initial_state, cu_seqlens, heads)
    y, final_state, _ = _forward(layout, *inputs, store_checkpoints=False)
    return y.reshape(*q.shape[:-2], heads, v.shape[-1]), final_state


def m2rnn_decode_step_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    weight: torch.Tensor,
    forget: torch.Tensor,
    state: torch.Tensor,
) -> torch.Tensor:
    """One decode step: updates the float32 ``state`` (B, N, K, V) in place and returns y (B, N, V) in v's dtype.

    q (B, Nq, K), k (B, Nk, K), v (B, Nv, V), weight (Nw, V, V), forget (B, Nf). Allocates only y and never
    synchronises with the host, so it can be captured in a CUDA graph. Inputs may be strided views whose last
    dimension is contiguous (others are copied); ``state`` must be contiguous.
    """
    batch, heads, key_dim, value_dim = state.shape
    _check_dims(key_dim, value_dim)
    if state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError(f"m2rnn_decode_step: state must be a contiguous float32 (B, N, K, V) tensor, got {state.dtype}")
    counts = dict(NQ=q.shape[1], NK=k.shape[1], NV=v.shape[1], NF=forget.shape[1], NW=weight.shape[0])
    for name, count in counts.items():
        if heads % count:
            raise ValueError(f"m2rnn_decode_step: {name[1:].lower()} has {count} heads, which does not divide N={heads}")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    weight = weight if weight.is_contiguous() else weight.contiguous()
    y = torch.empty(batch, heads, value_dim, dtype=v.dtype, device=v.device)
    block_k = max(16, triton.next_power_of_2(key_dim))
    block_v = max(16, triton.next_power_of_2(value_dim))
    _m2rnn_decode_kernel[(batch * heads,)](
        q, k, v, weight, forget, state, y,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), forget.stride(0), forget.stride(1),
        N=heads, **counts, K=key_dim, V=value_dim, BLOCK_K=block_k, BLOCK_V=block_v,
        **_math_flags(v.dtype), num_warps=4 if block_k * block_v >= 2048 else 2,
    )
    return y
