"""Pure-torch reference of the M2RNN recurrence (runs on any device).

Per head n and step t (DESIGN.md, "The recurrence op"):

    Z_t = tanh(H_{t-1} @ W_n + k_t v_tᵀ)
    H_t = f_t · H_{t-1} + (1 - f_t) · Z_t
    y_t = q_tᵀ H_t

The state and the gate are carried in float32 whatever the input dtype (float64 for float64 inputs, so that
tests can compare other backends against it at double precision). The backward pass is written by hand
so that ``gradient_clipping=c`` clamps only the recurrent carry ∂L/∂H_t arriving from step t+1 (and the incoming
∂L/∂H_T) to [-c, c] before the readout term is added: the semantics the published models were trained with.
The gradient returned for the initial state is the carry leaving step 1, unclipped (as in the authors' kernel).
"""

from __future__ import annotations

import torch

from ..utils import check_recurrence_inputs, expand_heads


def _accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _step(state: torch.Tensor, weight: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, f_t: torch.Tensor):
    """One step on float32 tensors: state (B,N,K,V), weight (N,V,V), k_t (B,N,K), v_t (B,N,V), f_t (B,N)."""
    z = torch.tanh(torch.matmul(state, weight) + k_t.unsqueeze(-1) * v_t.unsqueeze(-2))
    f = f_t[..., None, None]
    return f * state + (1.0 - f) * z, z


def _run(q, k, v, weight, forget, h0, keep_states: bool):
    """The forward loop on head-expanded inputs: (y in q's dtype, final state, every state stacked or None).

    The stacked states (S+1 full states) are what the hand-written backward reads; without gradients they are not
    kept, so inference needs one state's memory, not S+1."""
    batch, seqlen, heads, _ = q.shape
    acc = _accumulation_dtype(q)
    w = weight.to(acc)
    state = h0.to(acc).clone()
    states = [state] if keep_states else None
    ys = []
    for t in range(seqlen):
        state, _ = _step(state, w, k[:, t].to(acc), v[:, t].to(acc), forget[:, t].to(acc))
        if keep_states:
            states.append(state)
        ys.append(torch.einsum("bnk,bnkv->bnv", q[:, t].to(acc), state))
    y = torch.stack(ys, dim=1) if ys else q.new_zeros(batch, 0, heads, v.shape[-1], dtype=acc)
    return y.to(q.dtype), state, torch.stack(states, dim=0) if keep_states else None


class _M2RNNRecurrence(torch.autograd.Function):
    """Recurrence on head-expanded inputs: q,k (B,S,N,K), v (B,S,N,V), weight (N,V,V), forget (B,S,N), h0 (B,N,K,V)."""

    @staticmethod
    def forward(ctx, q, k, v, weight, forget, h0, gradient_clipping):
        y, state, states = _run(q, k, v, weight, forget, h0, keep_states=True)
        ctx.save_for_backward(q, k, v, weight, forget, states)
        ctx.gradient_clipping = gradient_clipping
        ctx.h0_dtype = h0.dtype
        return y, state

    @staticmethod
    def backward(ctx, dy, d_final_state):
        q, k, v, weight, forget, states = ctx.saved_tensors
        clip = ctx.gradient_clipping
        seqlen = q.shape[1]
        acc = states.dtype
        w = weight.to(acc)
        dy = dy.to(acc)
        carry = d_final_state.to(acc)
        dq, dk, dv, df = (torch.empty(x.shape, dtype=acc, device=x.device) for x in (q, k, v, forget))
        dw = torch.zeros_like(w)
        for t in range(seqlen - 1, -1, -1):
            prev, cur = states[t], states[t + 1]
            k_t, v_t, f_t, q_t = (x[:, t].to(acc) for x in (k, v, forget, q))
            _, z = _step(prev, w, k_t, v_t, f_t)
            if clip is not None:
                carry = carry.clamp(-clip, clip)
            d_state = carry + q_t.unsqueeze(-1) * dy[:, t].unsqueeze(-2)
            dq[:, t] = torch.einsum("bnkv,bnv->bnk", cur, dy[:, t])
            df[:, t] = (d_state * (prev - z)).sum(dim=(-1, -2))
            dx = (1.0 - f_t)[..., None, None] * d_state * (1.0 - z * z)
            dk[:, t] = (dx * v_t.unsqueeze(-2)).sum(-1)
            dv[:, t] = (dx * k_t.unsqueeze(-1)).sum(-2)
            dw += torch.einsum("bnkv,bnkw->nvw", prev, dx)
            carry = f_t[..., None, None] * d_state + torch.matmul(dx, w.transpose(-1, -2))
        return (
            dq.to(q.dtype),
            dk.to(k.dtype),
            dv.to(v.dtype),
            dw.to(weight.dtype),
            df.to(forget.dtype),
            carry.to(ctx.h0_dtype),
            None,
        )


def m2rnn_recurrence_torch(
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
    """Reference M2RNN recurrence; shapes and semantics as `m2rnn.kernels.m2rnn_recurrence`."""
    heads = check_recurrence_inputs(q, k, v, weight, forget, initial_state, cu_seqlens)
    if cu_seqlens is not None:
        return _varlen(q, k, v, weight, forget, initial_state, cu_seqlens, gradient_clipping)
    batch, _, _, key_dim = q.shape
    value_dim = v.shape[-1]
    if initial_state is None:
        initial_state = q.new_zeros(batch, heads, key_dim, value_dim, dtype=torch.float32)
    q, k, v, forget, weight = (expand_heads(x, heads, dim) for x, dim in ((q, 2), (k, 2), (v, 2), (forget, 2), (weight, 0)))
    inputs = (q, k, v, weight, forget, initial_state)
    if not (torch.is_grad_enabled() and any(x.requires_grad for x in inputs)):
        y, state, _ = _run(*inputs, keep_states=False)
        return y, state
    return _M2RNNRecurrence.apply(*inputs, gradient_clipping)


def _varlen(q, k, v, weight, forget, initial_state, cu_seqlens, gradient_clipping):
    """Packed sequences: run each [cu_seqlens[i], cu_seqlens[i+1]) slice as its own batch-1 sequence."""
    bounds = cu_seqlens.tolist()
    ys, finals = [], []
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        h0 = None if initial_state is None else initial_state[i : i + 1]
        y, h = m2rnn_recurrence_torch(
            q[None, start:end], k[None, start:end], v[None, start:end], weight, forget[None, start:end], h0,
            gradient_clipping=gradient_clipping,
        )
        ys.append(y[0])
        finals.append(h)
    return torch.cat(ys, dim=0), torch.cat(finals, dim=0)


def m2rnn_decode_step_torch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weight: torch.Tensor, forget: torch.Tensor, state: torch.Tensor
) -> torch.Tensor:
    """One token: q (B,Nq,K), k (B,Nk,K), v (B,Nv,V), forget (B,Nf); `state` (B,N,K,V) float32 is updated in place."""
    heads = state.shape[1]
    q, k, v, forget = (expand_heads(x, heads, 1) for x in (q, k, v, forget))
    acc = state.dtype
    new_state, _ = _step(state, expand_heads(weight, heads, 0).to(acc), k.to(acc), v.to(acc), forget.to(acc))
    state.copy_(new_state)
    return torch.einsum("bnk,bnkv->bnv", q.to(acc), new_state).to(v.dtype)
