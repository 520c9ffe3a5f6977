"""Gated DeltaNet recurrence, the core of the GDN mixer (docs/gdn-checkpoint-formats.md §1, step 7).

Per value head, with state ``S ∈ R^{DK×DV}`` and q, k L2-normalised and q scaled::

    S ← exp(g) · S
    u = β · (v − Sᵀk)
    S ← S + k uᵀ
    o = Sᵀq

Backends (one dispatch function, `gated_delta_rule`):

- ``"torch_recurrent"``: the token loop above; the readable reference and the 1-token decode path.
- ``"torch_chunked"``: the same maths in chunks of 64 tokens (see `_chunked`); fast enough for prefill and
  training on CPU, differentiable by autograd.
- ``"fla"``: flash-linear-attention's Triton kernels, only on CUDA and only when ``fla`` imports. fla is imported
  lazily, so nothing on CPU ever touches it (its kernels fail on CPU without a GPU driver).

All torch backends compute in float32 (float64 when v is float64) and return the final state in that dtype.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

from .utils import check_cu_seqlens, expand_heads

BACKENDS = ("torch_chunked", "torch_recurrent", "fla")
CHUNK_SIZE = 64
Tensors = tuple[torch.Tensor, torch.Tensor]


@functools.cache
def _fla_ops():
    """fla's ``(chunk_gated_delta_rule, fused_recurrent_gated_delta_rule)``, or None when fla does not import."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
    except Exception:  # ImportError, or triton failing at import time
        return None
    return chunk_gated_delta_rule, fused_recurrent_gated_delta_rule


@functools.cache
def _fla_backward_works() -> bool:
    """False where fla 0.6 refuses its GDN backward: Hopper with Triton 3.4 to 3.7.0 and no tilelang (fla #640).

    The refusal only comes at backward time, so the check is made before choosing fla for a differentiable call.
    """
    try:
        from fla.utils import IS_NVIDIA_HOPPER, TRITON_ABOVE_3_4_0, TRITON_ABOVE_3_7_1
    except ImportError:  # another fla release: trust it
        return True
    affected = IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1
    return not affected or importlib.util.find_spec("tilelang") is not None


@torch.compiler.assume_constant_result
def _fla_importable() -> bool:
    """Whether fla imports, evaluated eagerly even while torch.compile traces (an import cannot be traced)."""
    return _fla_ops() is not None


def fla_available(device: torch.device | str) -> bool:
    """True when fla's kernels can run on `device` (CUDA and fla importable); never imports fla for CPU."""
    return torch.device(device).type == "cuda" and _fla_importable()


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x · rsqrt(Σx² + eps)`` over the last dim, as every GDN kernel does it."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    *,
    op: str,
    state_name: str,
) -> None:
    """Validate shapes of token-major inputs ``(B, S, ·)``; errors name the argument and its shape."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"{op}: {name} must be 4-D (B, S, heads, dim), got shape {tuple(x.shape)}")
    if k.shape != q.shape:
        raise ValueError(f"{op}: k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    batch, seqlen, key_heads, key_dim = q.shape
    value_heads, value_dim = v.shape[2], v.shape[3]
    if v.shape[:2] != q.shape[:2]:
        raise ValueError(f"{op}: v must share q's (B, S)={tuple(q.shape[:2])}, got shape {tuple(v.shape)}")
    if value_heads % key_heads:
        raise ValueError(f"{op}: v has {value_heads} heads, not a multiple of the {key_heads} heads of q/k")
    for name, x in (("g", g), ("beta", beta)):
        if tuple(x.shape) != (batch, seqlen, value_heads):
            raise ValueError(f"{op}: {name} must be (B, S, Hv)={(batch, seqlen, value_heads)}, got {tuple(x.shape)}")
    num_states = batch
    if cu_seqlens is not None:
        if batch != 1:
            raise ValueError(f"{op}: with cu_seqlens, q must have batch size 1, got shape {tuple(q.shape)}")
        check_cu_seqlens(cu_seqlens, seqlen, q.device, op)
        num_states = cu_seqlens.numel() - 1
    if state is not None and tuple(state.shape) != (num_states, value_heads, key_dim, value_dim):
        expected = (num_states, value_heads, key_dim, value_dim)
        raise ValueError(f"{op}: {state_name} must be (N, Hv, DK, DV)={expected}, got {tuple(state.shape)}")


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


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _fla(q, k, v, g, beta, initial_state, cu_seqlens, use_qk_l2norm: bool, scale: float) -> Tensors:
    """fla 0.6 call: q/k expanded to Hv heads, fused_recurrent when no gradient is needed and the input is a
    single token or float32 (fla's chunk kernel refuses float32 in some releases), chunk otherwise.

    Untested in the CPU sandbox this was written in; argument names follow fla's
    ``fla/ops/gated_delta_rule/{chunk,fused_recurrent}.py``.
    """
    chunk_fn, recurrent_fn = _fla_ops()
    value_heads = v.shape[2]
    q, k = (expand_heads(x.to(v.dtype), value_heads, 2) for x in (q, k))
    use_recurrent = not _needs_grad(q, k, v, g, beta, initial_state) and (q.shape[1] == 1 or v.dtype == torch.float32)
    fn = recurrent_fn if use_recurrent else chunk_fn
    o, final_state = fn(
        q,
        k,
        v,
        g=g.float(),
        beta=beta,
        scale=scale,
        initial_state=None if initial_state is None else initial_state.float(),
        output_final_state=True,
        use_qk_l2norm_in_kernel=use_qk_l2norm,
        cu_seqlens=cu_seqlens,
    )
    return o, final_state.float()


def _select_backend(backend: str | None, q, k, v, g, beta, initial_state) -> str:
    needs_grad = _needs_grad(q, k, v, g, beta, initial_state)
    if backend is None:
        # fla's chunk kernel runs its matmuls in TF32 (~1e-3 off in float32), so float32 training stays in torch.
        fla_fits = v.dtype in (torch.float16, torch.bfloat16) or (v.dtype == torch.float32 and not needs_grad)
        if fla_fits and fla_available(q.device) and not (needs_grad and not _fla_backward_works()):
            return "fla"
        return "torch_recurrent" if q.shape[1] == 1 else "torch_chunked"
    if backend not in BACKENDS:
        raise ValueError(f"gated_delta_rule: unknown backend={backend!r}, expected one of {BACKENDS} or None")
    if backend == "fla":
        if not fla_available(q.device):
            raise RuntimeError(f"gated_delta_rule: backend='fla' needs fla installed and CUDA inputs; inputs are on {q.device}")
        if needs_grad and not _fla_backward_works():
            raise RuntimeError(
                "gated_delta_rule: fla refuses the GDN backward on Hopper with Triton < 3.7.1 unless tilelang is "
                "installed (fla issue #640); use backend='torch_chunked' or upgrade Triton"
            )
    return backend


def gated_delta_rule(
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
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated DeltaNet recurrence over a sequence (prefill and training).

    Args:
        q, k: ``(B, S, Hk, DK)``. v: ``(B, S, Hv, DV)`` with Hk dividing Hv; value head h reads key head
            ``h // (Hv / Hk)`` (repeat_interleave).
        g: ``(B, S, Hv)`` log decay (≤ 0, float32). beta: ``(B, S, Hv)``.
        initial_state: ``(N, Hv, DK, DV)``, N = B (or the number of sequences with cu_seqlens); zeros when None.
        cu_seqlens: int32 boundaries of packed sequences (from 0 to S); B must be 1; states are per sequence.
        use_qk_l2norm: L2-normalise q and k per head (in fp32) before the recurrence.
        scale: multiplies q after normalisation; default ``DK ** -0.5``.
        backend: ``"torch_chunked"``, ``"torch_recurrent"``, ``"fla"`` or None (fla on CUDA when it imports
            and fits, else torch_recurrent for S == 1, else torch_chunked).

    Returns:
        ``o`` ``(B, S, Hv, DV)`` in v's dtype and the final state ``(N, Hv, DK, DV)`` in float32 (float64 for
        float64 inputs on the torch backends).
    """
    _check_inputs(q, k, v, g, beta, initial_state, cu_seqlens, op="gated_delta_rule", state_name="initial_state")
    backend = _select_backend(backend, q, k, v, g, beta, initial_state)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if backend == "fla":
        return _fla(q, k, v, g, beta, initial_state, cu_seqlens, use_qk_l2norm, scale)

    dtype = _state_dtype(v)
    prepared = _prepare(q, k, v, g, beta, use_qk_l2norm, scale, dtype)
    num_states = q.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is None:
        state = v.new_zeros(num_states, v.shape[2], q.shape[-1], v.shape[-1], dtype=dtype)
    else:
        state = initial_state.to(dtype)
    runner = _chunked if backend == "torch_chunked" else _recurrent
    o, final_state = _run_torch(runner, *prepared, state, cu_seqlens)
    return o.to(v.dtype), final_state


def gated_delta_rule_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    *,
    use_qk_l2norm: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """One decode token of `gated_delta_rule` (torch, any device), updating ``state`` in place.

    Args:
        q, k: ``(B, Hk, DK)``. v: ``(B, Hv, DV)``. g, beta: ``(B, Hv)``.
        state: ``(B, Hv, DK, DV)`` float32 (the cache's recurrent state); overwritten with the new state.

    Returns:
        ``o`` ``(B, Hv, DV)`` in v's dtype.
    """
    if q.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"gated_delta_rule_step: q, k must be (B, Hk, DK) and v (B, Hv, DV), got q {tuple(q.shape)}, v {tuple(v.shape)}"
        )
    tokens = [x.unsqueeze(1) for x in (q, k, v, g, beta)]
    _check_inputs(*tokens, state, None, op="gated_delta_rule_step", state_name="state")
    if state.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"gated_delta_rule_step: state must be float32, got {state.dtype}")
    q_t, k_t, v_t, g_t, beta_t = (x[:, 0] for x in _prepare(*tokens, use_qk_l2norm, scale, state.dtype))
    o, new_state = _recurrent_token(state, q_t, k_t, v_t, g_t, beta_t)
    state.copy_(new_state)
    return o.to(v.dtype)
