"""The depthwise causal conv1d op: the short convolution in front of the recurrent mixers (GDN, M2RNN).

Backends: ``"torch"`` (`reference.py`) and ``"cuda"`` (the Dao-AILab ``causal_conv1d`` package). Two entry
points, each with the torch reference and the Dao-AILab ``causal_conv1d`` CUDA kernels as the
fast path when that package imports and the inputs are on CUDA:

- `causal_conv1d` for a whole sequence (prefill and training), optionally over packed sequences (`cu_seqlens`)
  with the convolution reset at every sequence boundary;
- `causal_conv1d_step` for one decode token against a rolling ``conv_state`` of the last Kc inputs, the layout
  transformers' ``LinearAttentionLayer`` stores (``(B, C, Kc)``, oldest first).

Unlike transformers' torch fallback, the packed path never lets a tap read across a document boundary.
"""

from __future__ import annotations

import functools

import torch

from ..utils import check_cu_seqlens
from .reference import _position_in_sequence, causal_conv1d_step_torch, causal_conv1d_torch

BACKENDS = ("torch", "cuda")
_PACKAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def _package_ops():
    """``(causal_conv1d_fn, causal_conv1d_update)`` from the causal-conv1d package, or None if it does not import."""
    try:
        from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
    except Exception:  # ImportError, or a broken CUDA extension
        return None
    return causal_conv1d_fn, causal_conv1d_update


def _check_activation(activation: str | None) -> None:
    if activation not in (None, "silu"):
        raise ValueError(f"causal_conv1d: activation must be 'silu' or None, got {activation!r}")


def _depthwise_weight(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """Accept ``(C, Kc)`` or nn.Conv1d's ``(C, 1, Kc)`` and return ``(C, Kc)``."""
    if weight.dim() == 3 and weight.shape[1] == 1:
        weight = weight.squeeze(1)
    if weight.dim() != 2 or weight.shape[0] != channels:
        raise ValueError(f"causal_conv1d: weight must be (C={channels}, Kc) or (C, 1, Kc), got shape {tuple(weight.shape)}")
    return weight


def _package_unfit_reason(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    """Why the causal-conv1d kernels cannot take these inputs, or None when they can."""
    if not x.is_cuda:
        return f"inputs are on {x.device}, not CUDA"
    if torch.compiler.is_compiling():  # its kernels are not torch ops: dynamo could not trace them
        return "torch.compile traces the torch implementation instead"
    if _package_ops() is None:
        return "the causal_conv1d package does not import"
    if not 2 <= weight.shape[-1] <= 4:
        return f"kernel width Kc={weight.shape[-1]} is outside the package's 2..4"
    if x.dtype not in _PACKAGE_DTYPES or weight.dtype not in _PACKAGE_DTYPES:
        return f"dtypes x={x.dtype}, weight={weight.dtype} are not float32/float16/bfloat16"
    return None


def _resolve_backend(backend: str | None, unfit_reason: str | None) -> str:
    if backend is None:
        return "cuda" if unfit_reason is None else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"causal_conv1d: unknown backend={backend!r}, expected one of {BACKENDS} or None")
    if backend == "cuda" and unfit_reason is not None:
        raise RuntimeError(f"causal_conv1d: backend='cuda' cannot run: {unfit_reason}")
    return backend


def _conv_package(x: torch.Tensor, weight: torch.Tensor, activation: str | None, cu_seqlens: torch.Tensor | None):
    conv_fn, _ = _package_ops()
    if cu_seqlens is None:
        if x.stride(1) != 1 and x.stride(2) != 1:
            x = x.contiguous()
        return conv_fn(x, weight, None, activation=activation)
    # The package resets at boundaries through `seq_idx`, which it only supports in channel-last layout.
    seq_idx, _ = _position_in_sequence(cu_seqlens, x.shape[-1])
    x_cl = x.transpose(1, 2).contiguous().transpose(1, 2)
    return conv_fn(x_cl, weight, None, seq_idx=seq_idx.to(torch.int32)[None].contiguous(), activation=activation)


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    activation: str | None = "silu",
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
    check_values: bool = True,
) -> torch.Tensor:
    """Depthwise causal conv (left context zero, no bias), then SiLU when ``activation == "silu"``.

    Args:
        x: ``(B, C, T)``.
        weight: ``(C, Kc)`` (or nn.Conv1d's ``(C, 1, Kc)``); tap ``Kc - 1`` multiplies the current token.
        cu_seqlens: 1-D int32 boundaries of packed sequences (0, ..., T, never decreasing; values checked as in
            `m2rnn.kernels.utils.check_cu_seqlens`); B must be 1. The conv restarts at each boundary, so no tap
            reads across sequences.
        backend: ``"torch"``, ``"cuda"`` (the causal-conv1d package) or None for the best that fits.
        check_values: read `cu_seqlens` to check its values (a host sync on CUDA); False when already checked.

    Returns:
        ``(B, C, T)`` in x's dtype. Differentiable on every backend.
    """
    _check_activation(activation)
    if x.dim() != 3:
        raise ValueError(f"causal_conv1d: x must be (B, C, T), got shape {tuple(x.shape)}")
    weight = _depthwise_weight(weight, x.shape[1])
    unfit = _package_unfit_reason(x, weight)
    if cu_seqlens is not None:
        if x.shape[0] != 1:
            raise ValueError(f"causal_conv1d: with cu_seqlens, x must have batch size 1, got shape {tuple(x.shape)}")
        cu_seqlens = cu_seqlens.to(x.device)
        check_cu_seqlens(cu_seqlens, x.shape[-1], x.device, "causal_conv1d", check_values)
        if unfit is None and x.shape[1] % 8:
            unfit = f"packed sequences need C divisible by 8 (channel-last kernel), got C={x.shape[1]}"
    if _resolve_backend(backend, unfit) == "cuda":
        return _conv_package(x, weight, activation, cu_seqlens)
    return causal_conv1d_torch(x, weight, activation, cu_seqlens)


def causal_conv1d_step(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    *,
    activation: str | None = "silu",
    backend: str | None = None,
) -> torch.Tensor:
    """One decode token of `causal_conv1d`, updating ``conv_state`` in place.

    Args:
        x: ``(B, C)``, the new token.
        conv_state: ``(B, C, Kc)``, the last Kc inputs, oldest first (transformers' ``LinearAttentionLayer``
            layout). It is shifted left by one and x is written in the last column.
        weight: ``(C, Kc)`` or ``(C, 1, Kc)``.
        backend: ``"torch"``, ``"cuda"`` (``causal_conv1d_update``) or None for the best that fits.

    Returns:
        ``y = activation(Σ_j conv_state[..., j] · weight[:, j])`` after the update, ``(B, C)`` in x's dtype.
        No host sync and no shape-dependent work, so it can be captured in a CUDA graph.
    """
    _check_activation(activation)
    if x.dim() != 2:
        raise ValueError(f"causal_conv1d_step: x must be (B, C), got shape {tuple(x.shape)}")
    weight = _depthwise_weight(weight, x.shape[1])
    expected = (x.shape[0], x.shape[1], weight.shape[-1])
    if tuple(conv_state.shape) != expected:
        raise ValueError(f"causal_conv1d_step: conv_state must be (B, C, Kc)={expected}, got {tuple(conv_state.shape)}")
    unfit = _package_unfit_reason(x, weight)
    if unfit is None and conv_state.dtype != x.dtype:
        unfit = f"the package needs conv_state in x's dtype {x.dtype}, got {conv_state.dtype}"
    if _resolve_backend(backend, unfit) == "cuda":
        # Every released causal_conv1d_update accepts a state Kc wide (older ones require exactly Kc, newer
        # ones any width >= Kc - 1) and gives the same shift-then-dot semantics as `_step_torch`.
        _, update_fn = _package_ops()
        return update_fn(x, conv_state, weight, None, activation)
    return causal_conv1d_step_torch(x, conv_state, weight, activation)
