"""Forward kernel of the Triton M2RNN recurrence.

The state and the gate live in float32 registers; every ``CHUNK`` steps the state is written to a checkpoint
buffer (memory ``B·N·K·V·S/CHUNK`` floats), the only thing kept for backward besides the inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .cuda_kernels import cuda_forward, cuda_forward_covers
from .triton_common import _Layout, _autotune_configs, _load_step_inputs, _recurrence_step, _sequence_bounds

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



def _forward(layout: _Layout, q, k, v, weight, forget, initial_state, store_checkpoints: bool):
    """Launch the forward kernel on token-major inputs; returns y (T, N, V), final state, checkpoints.

    With `config.cuda_kernels` the CUDA kernel runs where it covers the case (same outputs, same checkpoints)."""
    if layout.config.cuda_kernels and cuda_forward_covers(q, layout.key_dim, layout.value_dim, layout.config):
        return cuda_forward(layout, q, k, v, weight, forget, initial_state, store_checkpoints)
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
