"""Backward kernels of the Triton M2RNN recurrence.

Per program and per chunk, last chunk first, the chunk's states are recomputed from its checkpoint into a
chunk-sized scratch buffer and the chunk is walked backwards. Two kernels, chosen by
`M2RNNTritonConfig.chain_backward`:

- `_m2rnn_bwd_kernel` (default) computes every gradient inside the reverse walk, step by step;
- `_m2rnn_bwd_chain_kernel` keeps only the carried gradient dH on the sequential walk and writes the state
  gradient G_t per step to scratch; every PASS_STEPS steps a parallel pass turns (H_{t-1}, Z_t, G_t) into dq, dk,
  dv, df and dW with whole-tile reductions and one tensor-core dot over (time × rows). Correct, but measured 4×
  slower on an H200 (the parallel pass costs as many FP32 instructions per element as the old walk, plus a second
  recomputation): opt-in until tuned.

Every gradient is written as a per-head (and per row block) partial and reduced afterwards by a plain ``sum`` in
torch, so grouped heads (Nq = Nk = 1 in the paper models) never contend on atomics.

``gradient_clipping=c`` clamps the carry ∂L/∂H_t arriving from step t+1 (and the incoming ∂L/∂H_T) to [-c, c]
before the readout term q_t dy_tᵀ is added, exactly as the reference (`reference.py`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import _Layout, _autotune_configs, _load_step_inputs, _recurrence_step, _sequence_bounds, _sum_groups

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



@triton.autotune(configs=_autotune_configs(), key=["BLOCK_K", "BLOCK_V", "work_bucket", "CLIP", "PASS_STEPS", "TILE_STEPS"])
@triton.jit
def _m2rnn_bwd_chain_kernel(
    q_ptr, k_ptr, v_ptr, w_ptr, f_ptr, checkpoint_ptr, dy_ptr, dht_ptr,
    dq_ptr, dk_ptr, dv_ptr, df_ptr, dw_ptr, dh0_ptr, scratch_ptr,
    cu_seqlens_ptr, chunk_offsets_ptr,
    seqlen, chunks_per_seq, total_tokens, work_bucket, clip,
    N: tl.constexpr, NQ: tl.constexpr, NK: tl.constexpr, NV: tl.constexpr, NF: tl.constexpr, NW: tl.constexpr,
    K: tl.constexpr, V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, CHUNK: tl.constexpr,
    PASS_STEPS: tl.constexpr, TILE_STEPS: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr, CLIP: tl.constexpr,
    LOOP_UNROLL: tl.constexpr, TANH_MODE: tl.constexpr, DOT_PRECISION: tl.constexpr, STATE_DOT_DTYPE: tl.constexpr,
):
    """Backward of one (sequence, head, row block) that keeps only the carried gradient on the sequential chain.

    Per chunk, last first: (A1) recompute the chunk from its checkpoint, keeping the state at the start of every
    pass of PASS_STEPS steps; then per pass, last first: (A2) recompute the pass's states H_{t-1} and gates Z_t
    into scratch, (B) walk the chain dH ← f·G + ((1-f)·G·(1-Z²)) Wᵀ with G = clip(dH) + q dyᵀ, writing G per step
    to scratch, and (C) compute the parameter gradients of those steps on (TILE_STEPS·BLOCK_K, V) tiles:
    dX = (1-f)·G·(1-Z²), dq = H_t dy, dk = dX v, dv = Σ_rows dX k, df = Σ G·(H_{t-1} - Z), and
    dW += H_{t-1}ᵀ dX as one tensor-core dot over (time × rows). Recomputing twice keeps the per-pass scratch
    (3·PASS_STEPS tiles per program) small enough to stay in L2: a chunk's worth of H and Z would go to DRAM.

    Grid and outputs as `_m2rnn_bwd_kernel`. scratch_ptr holds ⌈CHUNK/PASS_STEPS⌉ + 3·PASS_STEPS tiles per program.
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

    TILE: tl.constexpr = BLOCK_K * BLOCK_V
    block_tile = tl.arange(0, BLOCK_K)[:, None] * BLOCK_V + cols[None, :]
    PASSES: tl.constexpr = (CHUNK + PASS_STEPS - 1) // PASS_STEPS
    boundaries = scratch_ptr + (pid_bn.to(tl.int64) * ((K + BLOCK_K - 1) // BLOCK_K) + pid_k) * ((PASSES + 3 * PASS_STEPS) * TILE)
    states = boundaries + PASSES * TILE
    gates = states + PASS_STEPS * TILE
    grads = gates + PASS_STEPS * TILE
    q_base = q_ptr + (n // (N // NQ)) * K + rows
    k_base = k_ptr + (n // (N // NK)) * K + rows
    v_base = v_ptr + (n // (N // NV)) * V + cols
    f_base = f_ptr + n // (N // NF)
    dy_base = dy_ptr + n * V + cols
    partial_token = pid_k.to(tl.int64) * total_tokens

    # The parallel tile: row p is row p % BLOCK_K of step p // BLOCK_K of the tile.
    p_offs = tl.arange(0, TILE_STEPS * BLOCK_K)
    p_step = p_offs // BLOCK_K
    p_row = pid_k * BLOCK_K + p_offs % BLOCK_K
    p_tile = p_offs[:, None] * BLOCK_V + cols[None, :]
    s_idx = tl.arange(0, TILE_STEPS)

    num_chunks = tl.cdiv(length, CHUNK)
    for chunk_from_end in range(num_chunks):
        chunk = num_chunks - 1 - chunk_from_end
        start = bos + chunk * CHUNK
        chunk_len = tl.minimum(CHUNK, length - chunk * CHUNK)

        # (A1) the state at the start of every pass of the chunk, into scratch.
        h = tl.load(checkpoint_ptr + ((first_chunk + chunk) * N + n) * (K * V) + state_tile, mask=tile_mask, other=0.0)
        _q, k_t, v_t, f_t = _load_step_inputs(q_base, k_base, v_base, f_base, start, row_mask, col_mask, NQ, NK, NV, NF, K, V)
        num_passes = tl.cdiv(chunk_len, PASS_STEPS)
        last_first = (num_passes - 1) * PASS_STEPS
        tl.store(boundaries + block_tile, h)
        for i in tl.range(0, last_first, loop_unroll_factor=LOOP_UNROLL):
            _q, k_next, v_next, f_next = _load_step_inputs(
                q_base, k_base, v_base, f_base, start + i + 1, row_mask, col_mask, NQ, NK, NV, NF, K, V
            )
            h, _z = _recurrence_step(h, w_dot, k_t, v_t, f_t, TANH_MODE, DOT_PRECISION)
            if (i + 1) % PASS_STEPS == 0:
                tl.store(boundaries + ((i + 1) // PASS_STEPS) * TILE + block_tile, h)
            k_t, v_t, f_t = k_next, v_next, f_next
        tl.debug_barrier()

        for pass_from_end in range(num_passes):
            first = (num_passes - 1 - pass_from_end) * PASS_STEPS
            steps = tl.minimum(PASS_STEPS, chunk_len - first)

            # (A2) H_{t-1} and Z_t of the pass's steps, from the pass's start state: a few tiles that stay in cache.
            h = tl.load(boundaries + (first // PASS_STEPS) * TILE + block_tile)
            _q, k_t, v_t, f_t = _load_step_inputs(
                q_base, k_base, v_base, f_base, start + first, row_mask, col_mask, NQ, NK, NV, NF, K, V
            )
            for i in tl.range(0, steps, loop_unroll_factor=LOOP_UNROLL):
                _q, k_next, v_next, f_next = _load_step_inputs(
                    q_base, k_base, v_base, f_base, start + first + tl.minimum(i + 1, steps - 1), row_mask, col_mask,
                    NQ, NK, NV, NF, K, V,
                )
                tl.store(states + i * TILE + block_tile, h)
                h, z = _recurrence_step(h, w_dot, k_t, v_t, f_t, TANH_MODE, DOT_PRECISION)
                tl.store(gates + i * TILE + block_tile, z)
                k_t, v_t, f_t = k_next, v_next, f_next
            tl.debug_barrier()

            # (B) the chain: the next (earlier) step's inputs are loaded before the current step is computed.
            j = steps - 1
            z_t = tl.load(gates + j * TILE + block_tile)
            q_t, _k, _v, f_t = _load_step_inputs(
                q_base, k_base, v_base, f_base, start + first + j, row_mask, col_mask, NQ, NK, NV, NF, K, V
            )
            dy_t = tl.load(dy_base + (start + first + j) * (N * V), mask=col_mask, other=0.0).to(tl.float32)
            for j_from_end in tl.range(0, steps, loop_unroll_factor=LOOP_UNROLL):
                j = steps - 1 - j_from_end
                j_next = tl.maximum(j - 1, 0)
                z_next = tl.load(gates + j_next * TILE + block_tile)
                q_next, _k, _v, f_next = _load_step_inputs(
                    q_base, k_base, v_base, f_base, start + first + j_next, row_mask, col_mask, NQ, NK, NV, NF, K, V
                )
                dy_next = tl.load(dy_base + (start + first + j_next) * (N * V), mask=col_mask, other=0.0).to(tl.float32)
                if CLIP:
                    dh = tl.minimum(tl.maximum(dh, -clip), clip)
                g = dh + q_t[:, None] * dy_t[None, :]
                tl.store(grads + j * TILE + block_tile, g)
                dx = (1.0 - f_t) * g * (1.0 - z_t * z_t)
                dh = f_t * g + tl.dot(dx, w_t, input_precision=DOT_PRECISION)
                z_t, q_t, f_t, dy_t = z_next, q_next, f_next, dy_next
            tl.debug_barrier()

            # (C) the parameter gradients of the pass's steps, TILE_STEPS steps at a time.
            for tile_first in range(0, steps, TILE_STEPS):
                p_ok = tile_first + p_step < steps
                p_tok = start + first + tile_first + tl.minimum(p_step, steps - 1 - tile_first)
                p_mask = p_ok[:, None] & col_mask[None, :]
                tile_offset = tile_first * TILE + p_tile
                h_prev = tl.load(states + tile_offset, mask=p_ok[:, None], other=0.0)
                z = tl.load(gates + tile_offset, mask=p_ok[:, None], other=0.0)
                g = tl.load(grads + tile_offset, mask=p_ok[:, None], other=0.0)
                f_p = tl.load(f_ptr + p_tok * NF + n // (N // NF)).to(tl.float32)
                k_p = tl.load(k_ptr + p_tok * (NK * K) + (n // (N // NK)) * K + p_row, mask=p_ok & (p_row < K), other=0.0)
                v_p = tl.load(v_ptr + p_tok[:, None] * (NV * V) + (n // (N // NV)) * V + cols[None, :], mask=p_mask,
                              other=0.0)
                dy_p = tl.load(dy_ptr + p_tok[:, None] * (N * V) + n * V + cols[None, :], mask=p_mask, other=0.0)
                keep = (1.0 - f_p)[:, None]
                dx = keep * g * (1.0 - z * z)
                h_cur = h_prev + keep * (z - h_prev)
                dqk = p_tok * (N * K) + n * K + p_row
                dqk_mask = p_ok & (p_row < K)
                tl.store(dq_ptr + dqk, tl.sum(h_cur * dy_p.to(tl.float32), axis=1), mask=dqk_mask)
                tl.store(dk_ptr + dqk, tl.sum(dx * v_p.to(tl.float32), axis=1), mask=dqk_mask)
                dv_p = tl.sum(tl.reshape(dx * k_p.to(tl.float32)[:, None], [TILE_STEPS, BLOCK_K, BLOCK_V]), axis=1)
                df_p = tl.sum(tl.reshape(tl.sum(g * (h_prev - z), axis=1), [TILE_STEPS, BLOCK_K]), axis=1)
                s_ok = tile_first + s_idx < steps
                s_tok = partial_token + start + first + tile_first + s_idx
                tl.store(dv_ptr + (s_tok[:, None] * N + n) * V + cols[None, :], dv_p,
                         mask=s_ok[:, None] & col_mask[None, :])
                tl.store(df_ptr + s_tok * N + n, df_p, mask=s_ok)
                dw_acc += tl.dot(tl.trans(h_prev), dx, input_precision=DOT_PRECISION)
            tl.debug_barrier()

    if STORE_DH0:
        tl.store(dh0_ptr + head_state + state_tile, dh, mask=tile_mask)
    dw_block = (pid_k.to(tl.int64) * tl.num_programs(0) + pid_bn) * (V * V)
    tl.store(dw_ptr + dw_block + cols[:, None] * V + cols[None, :], dw_acc, mask=w_mask)


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
    if layout.config.chain_backward:
        tile_steps = max(1, layout.config.backward_pass_rows // layout.block_k)
        pass_steps = min(layout.config.backward_pass_steps or tile_steps, layout.chunk)
        kernel, extra = _m2rnn_bwd_chain_kernel, dict(PASS_STEPS=pass_steps, TILE_STEPS=tile_steps)
        tiles = triton.cdiv(layout.chunk, pass_steps) + 3 * pass_steps
    else:
        kernel, extra, tiles = _m2rnn_bwd_kernel, {}, layout.chunk
    scratch = torch.empty(programs, tiles, layout.block_k, layout.block_v, **f32)
    kernel[layout.grid](
        q, k, v, weight, forget, checkpoints, dy, d_final_state if d_final_state is not None else dw_parts,
        dq_heads, dk_heads, dv_parts, df_parts, dw_parts, dh0, scratch,
        layout.cu_seqlens, layout.chunk_offsets,
        layout.seqlen, layout.chunks_per_seq, layout.tokens, layout.work_bucket, float(clip or 0.0),
        HAS_DHT=d_final_state is not None, STORE_DH0=needs_dh0, CLIP=clip is not None, **layout.constexprs(), **extra,
    )
    counts = layout.head_counts
    dq = _sum_groups(dq_heads, counts["NQ"], 1)
    dk = _sum_groups(dk_heads, counts["NK"], 1)
    dv = _sum_groups(dv_parts.sum(0) if layout.k_blocks > 1 else dv_parts[0], counts["NV"], 1)
    df = _sum_groups(df_parts.sum(0) if layout.k_blocks > 1 else df_parts[0], counts["NF"], 1)
    dw = _sum_groups(dw_parts.sum((0, 1)), counts["NW"], 0)
    return dq, dk, dv, dw, df, (dh0 if needs_dh0 else None)
