"""Backward kernels of the Triton M2RNN recurrence.

Per program and per chunk, last chunk first, the chunk's states are recomputed from its checkpoint into a
chunk-sized scratch buffer and the chunk is walked backwards. Two ways, chosen by
`M2RNNTritonConfig.split_backward`:

- step by step (default): `_m2rnn_bwd_kernel` computes every gradient inside the reverse walk;
- split: `_m2rnn_bwd_kernel` with SPLIT keeps only the carried gradient dH on the sequential walk and writes
  H_{t-1} and G_t of every step; `_m2rnn_bwd_params_kernel` then computes dq, dk, dv, df and dW in parallel over
  (time × rows) tiles, with tensor-core dots for Z_t and dW.

Every gradient is written as a per-head (and per row block) partial and reduced afterwards by a plain ``sum`` in
torch, so grouped heads (Nq = Nk = 1 in the paper models) never contend on atomics.

``gradient_clipping=c`` clamps the carry ∂L/∂H_t arriving from step t+1 (and the incoming ∂L/∂H_T) to [-c, c]
before the readout term q_t dy_tᵀ is added, exactly as the reference (`reference.py`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import (
    _Layout, _autotune_configs, _load_step_inputs, _multiprocessor_count, _recurrence_step, _sequence_bounds,
    _sum_groups, _tanh,
)

@triton.autotune(configs=_autotune_configs(), key=["BLOCK_K", "BLOCK_V", "work_bucket", "CLIP", "SPLIT"])
@triton.jit
def _m2rnn_bwd_kernel(
    q_ptr, k_ptr, v_ptr, w_ptr, f_ptr, checkpoint_ptr, dy_ptr, dht_ptr,
    dq_ptr, dk_ptr, dv_ptr, df_ptr, dw_ptr, dh0_ptr, scratch_ptr, h_seq_ptr, g_seq_ptr,
    cu_seqlens_ptr, chunk_offsets_ptr,
    seqlen, chunks_per_seq, total_tokens, work_bucket, clip,
    N: tl.constexpr, NQ: tl.constexpr, NK: tl.constexpr, NV: tl.constexpr, NF: tl.constexpr, NW: tl.constexpr,
    K: tl.constexpr, V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, CHUNK: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr, CLIP: tl.constexpr, SPLIT: tl.constexpr,
    LOOP_UNROLL: tl.constexpr, TANH_MODE: tl.constexpr, DOT_PRECISION: tl.constexpr, STATE_DOT_DTYPE: tl.constexpr,
):
    """Backward of one (sequence, head, row block), chunk by chunk from the last.

    Grid: (B·N, ⌈K/BLOCK_K⌉). Outputs are partials, reduced by the caller:
      dq_ptr, dk_ptr: (T, N, K) per state head (rows are disjoint across row blocks);
      dv_ptr: (⌈K/BLOCK_K⌉, T, N, V), df_ptr: (⌈K/BLOCK_K⌉, T, N), dw_ptr: (⌈K/BLOCK_K⌉, B, N, V, V);
      dh0_ptr: (B, N, K, V) float32.
    With SPLIT the walk keeps only the carried gradient and writes H_{t-1} and G_t = clip(dH_t) + q_t dy_tᵀ of
    every step to h_seq_ptr / g_seq_ptr (T, N, K, V); `_m2rnn_bwd_params_kernel` turns them into dq, dk, dv, df
    and dW afterwards, and the gradient pointers are not touched here.
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
            if CLIP:
                dh = tl.minimum(tl.maximum(dh, -clip), clip)
            dh_total = dh + q_t[:, None] * dy_t[None, :]
            dx = (1.0 - f_t) * dh_total * (1.0 - z * z)
            dh = f_t * dh_total + tl.dot(dx, w_t, input_precision=DOT_PRECISION)

            if SPLIT:
                seq_tile = (tok * N + n) * (K * V) + state_tile
                tl.store(h_seq_ptr + seq_tile, h_prev.to(h_seq_ptr.dtype.element_ty), mask=tile_mask)
                tl.store(g_seq_ptr + seq_tile, dh_total.to(g_seq_ptr.dtype.element_ty), mask=tile_mask)
            else:
                tl.store(dq_ptr + tok * (N * K) + dqk_base, tl.sum(h_cur * dy_t[None, :], axis=1), mask=row_mask)
                df_t = tl.sum(tl.sum(dh_total * (h_prev - z), axis=1), axis=0)
                tl.store(df_ptr + (partial_token + tok) * N + n, df_t)
                tl.store(dk_ptr + tok * (N * K) + dqk_base, tl.sum(dx * v_t[None, :], axis=1), mask=row_mask)
                tl.store(dv_ptr + ((partial_token + tok) * N + n) * V + cols, tl.sum(dx * k_t[:, None], axis=0),
                         mask=col_mask)
                dw_acc += tl.dot(tl.trans(h_prev), dx, input_precision=DOT_PRECISION)

            tok = start + i_next
            h_prev, q_t, k_t, v_t, f_t, dy_t = h_prev_next, q_next, k_next, v_next, f_next, dy_next
        tl.debug_barrier()

    if STORE_DH0:
        tl.store(dh0_ptr + head_state + state_tile, dh, mask=tile_mask)
    if not SPLIT:
        dw_block = (pid_k.to(tl.int64) * tl.num_programs(0) + pid_bn) * (V * V)
        tl.store(dw_ptr + dw_block + cols[:, None] * V + cols[None, :], dw_acc, mask=w_mask)



@triton.autotune(configs=_autotune_configs(), key=["BLOCK_K", "BLOCK_V", "TILE_STEPS"])
@triton.jit
def _m2rnn_bwd_params_kernel(
    q_ptr, k_ptr, v_ptr, w_ptr, f_ptr, dy_ptr, h_seq_ptr, g_seq_ptr,
    dq_ptr, dk_ptr, dv_ptr, df_ptr, dw_ptr,
    total_tokens,
    N: tl.constexpr, NQ: tl.constexpr, NK: tl.constexpr, NV: tl.constexpr, NF: tl.constexpr, NW: tl.constexpr,
    K: tl.constexpr, V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, TILE_STEPS: tl.constexpr,
    TANH_MODE: tl.constexpr, DOT_PRECISION: tl.constexpr, STATE_DOT_DTYPE: tl.constexpr,
):
    """Parameter gradients of the split backward from H_{t-1} and G_t of every step (no sequential dependency).

    Grid: (programs over tokens, N). A program takes tiles of TILE_STEPS tokens × all K rows of one head, strided
    over the tokens, and per tile recomputes Z_t = tanh(H_{t-1} W + k_t v_tᵀ) with one tensor-core dot over
    (time × rows), then dX = (1-f)·G·(1-Z²), dq = H_t dy, dk = dX v, dv = Σ_rows dX k, df = Σ G·(H_{t-1} - Z),
    and accumulates dW += H_{t-1}ᵀ dX (a second dot over time × rows). Outputs: dq_ptr, dk_ptr (T, N, K);
    dv_ptr (T, N, V); df_ptr (T, N); dw_ptr (programs over tokens, N, V, V) partials summed by the caller.
    """
    pid_t = tl.program_id(0)
    n = tl.program_id(1)
    p = tl.arange(0, TILE_STEPS * BLOCK_K)
    p_step = p // BLOCK_K
    p_row = p % BLOCK_K
    cols = tl.arange(0, BLOCK_V)
    row_ok = p_row < K
    col_mask = cols < V
    w_mask = col_mask[:, None] & col_mask[None, :]
    w = tl.load(w_ptr + (n // (N // NW)) * V * V + cols[:, None] * V + cols[None, :], mask=w_mask, other=0.0)
    w_dot = w.to(tl.float32).to(STATE_DOT_DTYPE)
    s_idx = tl.arange(0, TILE_STEPS)
    dw_acc = tl.zeros([BLOCK_V, BLOCK_V], dtype=tl.float32)

    for tile in range(pid_t, tl.cdiv(total_tokens, TILE_STEPS), tl.num_programs(0)):
        tok = (tile * TILE_STEPS + p_step).to(tl.int64)
        ok = (tok < total_tokens) & row_ok
        ok_2d = ok[:, None] & col_mask[None, :]
        tok_2d = (tok < total_tokens)[:, None] & col_mask[None, :]
        seq_tile = ((tok * N + n) * K + p_row)[:, None] * V + cols[None, :]
        h_prev = tl.load(h_seq_ptr + seq_tile, mask=ok_2d, other=0.0).to(tl.float32)
        g = tl.load(g_seq_ptr + seq_tile, mask=ok_2d, other=0.0).to(tl.float32)
        k_p = tl.load(k_ptr + tok * (NK * K) + (n // (N // NK)) * K + p_row, mask=ok, other=0.0).to(tl.float32)
        v_p = tl.load(v_ptr + tok[:, None] * (NV * V) + (n // (N // NV)) * V + cols[None, :], mask=tok_2d,
                      other=0.0).to(tl.float32)
        dy_p = tl.load(dy_ptr + tok[:, None] * (N * V) + n * V + cols[None, :], mask=tok_2d, other=0.0).to(tl.float32)
        f_p = tl.load(f_ptr + tok * NF + n // (N // NF), mask=tok < total_tokens, other=0.0).to(tl.float32)

        z = _tanh(tl.dot(h_prev.to(STATE_DOT_DTYPE), w_dot, input_precision=DOT_PRECISION) + k_p[:, None] * v_p,
                  TANH_MODE)
        keep = (1.0 - f_p)[:, None]
        dx = keep * g * (1.0 - z * z)
        h_cur = h_prev + keep * (z - h_prev)
        dqk = (tok * N + n) * K + p_row
        tl.store(dq_ptr + dqk, tl.sum(h_cur * dy_p, axis=1), mask=ok)
        tl.store(dk_ptr + dqk, tl.sum(dx * v_p, axis=1), mask=ok)
        s_tok = (tile * TILE_STEPS + s_idx).to(tl.int64)
        s_ok = s_tok < total_tokens
        dv_s = tl.sum(tl.reshape(dx * k_p[:, None], [TILE_STEPS, BLOCK_K, BLOCK_V]), axis=1)
        tl.store(dv_ptr + (s_tok[:, None] * N + n) * V + cols[None, :], dv_s, mask=s_ok[:, None] & col_mask[None, :])
        df_s = tl.sum(tl.reshape(tl.sum(g * (h_prev - z), axis=1), [TILE_STEPS, BLOCK_K]), axis=1)
        tl.store(df_ptr + s_tok * N + n, df_s, mask=s_ok)
        dw_acc += tl.dot(tl.trans(h_prev), dx, input_precision=DOT_PRECISION)

    tl.store(dw_ptr + (pid_t * N + n) * (V * V) + cols[:, None] * V + cols[None, :], dw_acc, mask=w_mask)

def _backward(layout: _Layout, q, k, v, weight, forget, checkpoints, dy, d_final_state, clip, needs_dh0: bool):
    device, heads, key_dim, value_dim = q.device, layout.heads, layout.key_dim, layout.value_dim
    f32 = dict(dtype=torch.float32, device=device)
    split = layout.config.split_backward
    partials = 1 if split else layout.k_blocks
    dq_heads = torch.empty(layout.tokens, heads, key_dim, **f32)
    dk_heads = torch.empty(layout.tokens, heads, key_dim, **f32)
    dv_parts = torch.empty(partials, layout.tokens, heads, value_dim, **f32)
    df_parts = torch.empty(partials, layout.tokens, heads, **f32)
    if split:
        # H_{t-1} and G_t of every step: float32 for float32 inputs, else bfloat16 (G is unbounded: no float16).
        seq_dtype = torch.float32 if q.dtype == torch.float32 else torch.bfloat16
        h_seq = torch.empty(layout.tokens, heads, key_dim, value_dim, dtype=seq_dtype, device=device)
        g_seq = torch.empty_like(h_seq)
        block_k = max(16, triton.next_power_of_2(key_dim))
        tile_steps = max(1, layout.config.backward_pass_rows // block_k)
        tiles = triton.cdiv(layout.tokens, tile_steps)
        token_programs = max(1, min(tiles, triton.cdiv(32 * _multiprocessor_count(device.index), heads)))
        dw_parts = torch.empty(token_programs, heads, value_dim, value_dim, **f32)
    else:
        h_seq = g_seq = dq_heads
        dw_parts = torch.empty(layout.k_blocks, layout.batch, heads, value_dim, value_dim, **f32)
    dh0 = torch.empty(layout.batch, heads, key_dim, value_dim, **f32) if needs_dh0 else dw_parts
    scratch = torch.empty(layout.grid[0] * layout.grid[1], layout.chunk, layout.block_k, layout.block_v, **f32)
    _m2rnn_bwd_kernel[layout.grid](
        q, k, v, weight, forget, checkpoints, dy, d_final_state if d_final_state is not None else dw_parts,
        dq_heads, dk_heads, dv_parts, df_parts, dw_parts, dh0, scratch, h_seq, g_seq,
        layout.cu_seqlens, layout.chunk_offsets,
        layout.seqlen, layout.chunks_per_seq, layout.tokens, layout.work_bucket, float(clip or 0.0),
        HAS_DHT=d_final_state is not None, STORE_DH0=needs_dh0, CLIP=clip is not None, SPLIT=split,
        **layout.constexprs(),
    )
    if split:
        del scratch
        constexprs = {**layout.head_counts, **layout.math_flags}
        _m2rnn_bwd_params_kernel[(token_programs, heads)](
            q, k, v, weight, forget, dy, h_seq, g_seq, dq_heads, dk_heads, dv_parts, df_parts, dw_parts,
            layout.tokens, K=key_dim, V=value_dim, BLOCK_K=block_k, BLOCK_V=layout.block_v, TILE_STEPS=tile_steps,
            **constexprs,
        )
    counts = layout.head_counts
    dq = _sum_groups(dq_heads, counts["NQ"], 1)
    dk = _sum_groups(dk_heads, counts["NK"], 1)
    dv = _sum_groups(dv_parts.sum(0) if partials > 1 else dv_parts[0], counts["NV"], 1)
    df = _sum_groups(df_parts.sum(0) if partials > 1 else df_parts[0], counts["NF"], 1)
    dw = _sum_groups(dw_parts.sum((0, 1)) if not split else dw_parts.sum(0), counts["NW"], 0)
    return dq, dk, dv, dw, df, (dh0 if needs_dh0 else None)
