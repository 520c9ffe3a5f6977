"""Decode kernel of the Triton M2RNN recurrence: one token, the float32 state updated in place."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import _check_dims, _math_flags, _recurrence_step

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
