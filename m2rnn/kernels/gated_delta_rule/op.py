"""The Gated DeltaNet recurrence op, the core of the GDN mixer (docs/gdn-checkpoint-formats.md §1, step 7).

Per value head, with state ``S ∈ R^{DK×DV}`` and q, k L2-normalised and q scaled::

    S ← exp(g) · S
    u = β · (v − Sᵀk)
    S ← S + k uᵀ
    o = Sᵀq

Backends (one dispatch function, `gated_delta_rule`, which validates the inputs):

- ``"torch"`` (`reference.py`): the token loop for one token, the chunked form of the same maths otherwise;
  float32 compute (float64 for float64 inputs), differentiable by autograd.
- ``"fla"``: flash-linear-attention's Triton kernels, only on CUDA and only when ``fla`` imports. fla is imported
  lazily, so nothing on CPU ever touches it (its kernels fail on CPU without a GPU driver).
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from ..utils import check_cu_seqlens, expand_heads
from .reference import Tensors, _prepare, _recurrent_token, gated_delta_rule_torch

BACKENDS = ("torch", "fla")


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
    check_values: bool = True,
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
        check_cu_seqlens(cu_seqlens, seqlen, q.device, op, check_values)
        num_states = cu_seqlens.numel() - 1
    if state is not None and tuple(state.shape) != (num_states, value_heads, key_dim, value_dim):
        expected = (num_states, value_heads, key_dim, value_dim)
        raise ValueError(f"{op}: {state_name} must be (N, Hv, DK, DV)={expected}, got {tuple(state.shape)}")


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
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"gated_delta_rule: unknown backend={backend!r}, expected one of {BACKENDS} or None")
    if backend == "fla":
        if not fla_available(q.device):
            raise RuntimeError(f"gated_delta_rule: backend='fla' needs fla installed and CUDA inputs; inputs are on {q.device}")
        if needs_grad and not _fla_backward_works():
            raise RuntimeError(
                "gated_delta_rule: fla refuses the GDN backward on Hopper with Triton < 3.7.1 unless tilelang is "
                "installed (fla issue #640); use backend='torch' or upgrade Triton"
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
    check_values: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated DeltaNet recurrence over a sequence (prefill and training).

    Args:
        q, k: ``(B, S, Hk, DK)``. v: ``(B, S, Hv, DV)`` with Hk dividing Hv; value head h reads key head
            ``h // (Hv / Hk)`` (repeat_interleave).
        g: ``(B, S, Hv)`` log decay (≤ 0, float32). beta: ``(B, S, Hv)``.
        initial_state: ``(N, Hv, DK, DV)``, N = B (or the number of sequences with cu_seqlens); zeros when None.
        cu_seqlens: 1-D int32 boundaries of packed sequences (0, ..., S, never decreasing; values checked as in
            `m2rnn.kernels.utils.check_cu_seqlens`); B must be 1; states are per sequence.
        use_qk_l2norm: L2-normalise q and k per head (in fp32) before the recurrence.
        scale: multiplies q after normalisation; default ``DK ** -0.5``.
        backend: ``"torch"``, ``"fla"`` or None (fla on CUDA when it imports and fits, else torch).
        check_values: read `cu_seqlens` to check its values (a host sync on CUDA); False when already checked.

    Returns:
        ``o`` ``(B, S, Hv, DV)`` in v's dtype and the final state ``(N, Hv, DK, DV)`` in float32 (float64 for
        float64 inputs on the torch backends).
    """
    _check_inputs(q, k, v, g, beta, initial_state, cu_seqlens, op="gated_delta_rule", state_name="initial_state",
                  check_values=check_values)
    backend = _select_backend(backend, q, k, v, g, beta, initial_state)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if backend == "fla":
        return _fla(q, k, v, g, beta, initial_state, cu_seqlens, use_qk_l2norm, scale)

    return gated_delta_rule_torch(q, k, v, g, beta, initial_state, cu_seqlens=cu_seqlens,
                                  use_qk_l2norm=use_qk_l2norm, scale=scale, chunked=q.shape[1] > 1)


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
