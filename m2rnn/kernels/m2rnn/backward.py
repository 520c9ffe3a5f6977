"""Backward kernels of the Triton M2RNN recurrence.

Per program and per chunk, last chunk first, the chunk's states are recomputed from its checkpoint into a
chunk-sized scratch buffer and the chunk is walked backwards by `_m2rnn_bwd_kernel`, which computes every gradient
inside the reverse walk, step by step. Keeping them on the walk is a measured choice: a chain-only walk with the
parameter gradients in a parallel pass (in the same program or as a second kernel) was slower, see
benchmarks/RESULTS.md §1.

Every gradient is written as a per-head (and per row block) partial and reduced afterwards by a plain ``sum`` in
torch, so grouped heads (Nq = Nk = 1 in the paper models) never contend on atomics.

``gradient_clipping=c`` clamps the carry ∂L/∂H_t arriving from step t+1 (and the incoming ∂L/∂H_T) to [-c, c]
before the readout term q_t dy_tᵀ is added, exactly as the reference (`reference.py`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .cuda_kernels import cuda_backward, cuda_backward_covers
from .triton_common import _Layout, _autotune_configs, _load_step_inputs, _recurrence_step, _sequence_bounds, reduce_partials

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


def _backward(layout: _Layout, q, k, v, weight, forget, checkpoints, dy, d_final_state, clip, needs_dh0: bool):
    """Gradients of (q, k, v, weight, forget, initial_state); with `config.cuda_kernels` the CUDA kernel runs where
    it covers the case (same checkpoints, same partial layout)."""
    if layout.config.cuda_kernels and cuda_backward_covers(q, layout.key_dim, layout.value_dim, layout.config):
        return cuda_backward(layout, q, k, v, weight, forget, checkpoints, dy, d_final_state, clip, needs_dh0)
    device, heads, key_dim, value_dim = q.device, layout.heads, layout.key_dim, layout.value_dim
    f32 = dict(dtype=torch.float32, device=device)
    dq_heads = torch.empty(layout.tokens, heads, key_dim, **f32)
    dk_heads = torch.empty(layout.tokens, heads, key_dim, **f32)
    dv_parts = torch.empty(layout.k_blocks, layout.tokens, heads, value_dim, **f32)
    df_parts = torch.empty(layout.k_blocks, layout.tokens, heads, **f32)
    dw_parts = torch.empty(layout.k_blocks, layout.batch, heads, value_dim, value_dim, **f32)
    dh0 = torch.empty(layout.batch, heads, key_dim, value_dim, **f32) if needs_dh0 else dw_parts
    scratch = torch.empty(layout.grid[0] * layout.grid[1], layout.chunk, layout.block_k, layout.block_v, **f32)
    _m2rnn_bwd_kernel[layout.grid](
        q, k, v, weight, forget, checkpoints, dy, d_final_state if d_final_state is not None else dw_parts,
        dq_heads, dk_heads, dv_parts, df_parts, dw_parts, dh0, scratch,
        layout.cu_seqlens, layout.chunk_offsets,
        layout.seqlen, layout.chunks_per_seq, layout.tokens, layout.work_bucket, float(clip or 0.0),
        HAS_DHT=d_final_state is not None, STORE_DH0=needs_dh0, CLIP=clip is not None, **layout.constexprs(),
    )
    return reduce_partials(layout, dq_heads, dk_heads, dv_parts, df_parts, dw_parts, dh0 if needs_dh0 else None)
