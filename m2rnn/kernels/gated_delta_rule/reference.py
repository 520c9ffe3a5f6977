"""Torch reference of the Gated DeltaNet recurrence (any device, differentiable by autograd).

Per value head, with state ``S ∈ R^{DK×DV}`` and q, k L2-normalised and q scaled::

    S ← exp(g) · S
    u = β · (v − Sᵀk)
    S ← S + k uᵀ
    o = Sᵀq

`gated_delta_rule_torch` runs the token loop above (`chunked=False`: the readable reference and the 1-token decode
path) or the same maths in chunks of 64 tokens (`chunked=True`, see `_chunked`: fast enough for prefill and
training on CPU). Both compute in float32 (float64 when v is float64) and return the final state in that dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..utils import expand_heads

CHUNK_SIZE = 64
Tensors = tuple[torch.Tensor, torch.Tensor]


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x · rsqrt(Σx² + eps)`` over the last dim, as every GDN kernel does it."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def _state_dtype(v: torch.Tensor) -> torch.dtype:
    return torch.promote_types(v.dtype, torch.float32)


def _prepare(q, k, v, g, beta, use_qk_l2norm: bool, scale: float | None, dtype: torch.dtype):
    """Cast to the compute dtype, normalise and scale q/k, and expand them to the value heads."""
    q, k, v, g, beta = (x.to(dtype) for x in (q, k, v, g, beta))
    if use_qk_l2norm:
        q, k = l2_normalize(q), l2_normalize(k)
    q = q * (q.shape[-1] ** -0.5 if scale is None else scale)
    value_heads = v.shape[2]
    return expand_heads(q, value_heads, 2), expand_heads(k, value_heads, 2), v, g, beta


def _recurrent_token(state, q_t, k_t, v_t, g_t, beta_t) -> Tensors:
    """One step on prepared tensors: state (B,H,DK,DV), q_t/k_t (B,H,DK), v_t (B,H,DV), g_t/beta_t (B,H)."""
    state = state * g_t.exp()[..., None, None]
    u = beta_t[..., None] * (v_t - torch.einsum("bhkv,bhk->bhv", state, k_t))
    state = state + k_t[..., :, None] * u[..., None, :]
    return torch.einsum("bhkv,bhk->bhv", state, q_t), state


def _recurrent(q, k, v, g, beta, state) -> Tensors:
    """Token loop on prepared inputs ``(B, S, H, ·)``; returns o ``(B, S, H, DV)`` and the final state."""
    outputs = []
    for t in range(q.shape[1]):
        o_t, state = _recurrent_token(state, q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t])
        outputs.append(o_t)
    return torch.stack(outputs, dim=1), state


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient.

    The chunk layout below permutes the gates, so their gradient comes back permuted. Under torch.compile (torch
    2.13, CPU) the compiled backward of the caller's `softplus` then disagrees with its meta kernel about the output
    strides and a later view fails; a contiguous gradient (one (B, S, H) copy) avoids it.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _chunked(q, k, v, g, beta, state, chunk_size: int = CHUNK_SIZE) -> Tensors:
    """Chunked (WY / UT-transform) form of the recurrence on prepared inputs ``(B, S, H, ·)``.

    Within a chunk starting from state S₀, let γ_t = Σ_{s≤t} g_s (in-chunk cumulative log decay). Unrolling
    gives ``S_t = e^{γ_t} S₀ + Σ_{s≤t} e^{γ_t−γ_s} k_s u_sᵀ``, so the delta-rule corrections u solve the unit
    lower-triangular system ``(I + A) U = diag(β)(V − diag(e^γ) K S₀)`` with
    ``A_ts = β_t e^{γ_t−γ_s} k_tᵀk_s`` (s < t). Writing ``U = Ũ − W S₀`` with ``Ũ = (I+A)⁻¹ diag(β) V`` and
    ``W = (I+A)⁻¹ diag(β e^γ) K`` moves every chunk-local quantity (one triangular solve per chunk) out of the
    sequential loop. The loop over chunks then only does
    ``U = Ũ − W S₀``, ``O = diag(e^γ) Q S₀ + (QKᵀ ⊙ D) U`` with ``D_ts = e^{γ_t−γ_s}`` (s ≤ t), and
    ``S ← e^{γ_C} S₀ + (diag(e^{γ_C−γ}) K)ᵀ U``. Every exponent is ≤ 0, so nothing overflows. The sequence is
    padded to a multiple of the chunk with β = 0 and g = 0, which leaves the state untouched.
    """
    batch, seqlen, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    if torch.is_grad_enabled():
        g, beta = _ContiguousGrad.apply(g), _ContiguousGrad.apply(beta)
    pad = -seqlen % chunk_size
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (F.pad(x, (0, 0, 0, pad)) for x in (g, beta))
    num_chunks = (seqlen + pad) // chunk_size

    def to_chunks(x: torch.Tensor) -> torch.Tensor:  # (B, S, H, ...) -> (B, H, n, C, ...)
        x = x.reshape(batch, num_chunks, chunk_size, heads, *x.shape[3:])
        return x.permute(0, 3, 1, 2, *range(4, x.dim()))

    q, k, v, g, beta = map(to_chunks, (q, k, v, g, beta))
    gamma = g.cumsum(-1)  # (B, H, n, C)
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    decay = (gamma[..., :, None] - gamma[..., None, :]).masked_fill(~causal, float("-inf")).exp()

    interaction = (beta[..., None] * (k @ k.transpose(-1, -2)) * decay).tril(-1)
    rhs = torch.cat([beta[..., None] * v, (beta * gamma.exp())[..., None] * k], dim=-1)
    solved = torch.linalg.solve_triangular(interaction, rhs, upper=False, unitriangular=True)
    u_local, w = solved.split([value_dim, key_dim], dim=-1)

    attention = (q @ k.transpose(-1, -2)) * decay
    q_decayed = q * gamma.exp()[..., None]
    k_to_end = (k * (gamma[..., -1:] - gamma).exp()[..., None]).transpose(-1, -2)
    chunk_decay = gamma[..., -1].exp()[..., None, None]  # (B, H, n, 1, 1)

    outputs = []
    for i in range(num_chunks):
        u = u_local[:, :, i] - w[:, :, i] @ state
        outputs.append(q_decayed[:, :, i] @ state + attention[:, :, i] @ u)
        state = chunk_decay[:, :, i] * state + k_to_end[:, :, i] @ u
    o = torch.stack(outputs, dim=2)  # (B, H, n, C, DV)
    o = o.permute(0, 2, 3, 1, 4).reshape(batch, num_chunks * chunk_size, heads, value_dim)
    return o[:, :seqlen], state


def _run_torch(runner, q, k, v, g, beta, state, cu_seqlens) -> Tensors:
    """Apply `runner` to the whole batch, or to each packed sequence with its own state."""
    if cu_seqlens is None:
        if q.shape[1] == 0:
            return v.new_zeros(v.shape), state
        return runner(q, k, v, g, beta, state)
    bounds = cu_seqlens.tolist()
    outputs, finals = [], []
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        o_i, s_i = _run_torch(runner, *(x[:, start:end] for x in (q, k, v, g, beta)), state[i : i + 1], None)
        outputs.append(o_i)
        finals.append(s_i)
    return torch.cat(outputs, dim=1), torch.cat(finals, dim=0)




def gated_delta_rule_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm: bool = True,
    scale: float | None = None,
    chunked: bool = True,
) -> Tensors:
    """The torch backend of `m2rnn.kernels.gated_delta_rule` on checked inputs; shapes and semantics as there."""
    dtype = _state_dtype(v)
    prepared = _prepare(q, k, v, g, beta, use_qk_l2norm, scale, dtype)
    num_states = q.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is None:
        state = v.new_zeros(num_states, v.shape[2], q.shape[-1], v.shape[-1], dtype=dtype)
    else:
        state = initial_state.to(dtype)
    o, final_state = _run_torch(_chunked if chunked else _recurrent, *prepared, state, cu_seqlens)
    return o.to(v.dtype), final_state
