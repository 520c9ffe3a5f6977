"""The dispatch point of the M2RNN recurrence: `m2rnn_recurrence` picks a backend and calls it."""

from __future__ import annotations

import os

import torch

from .m2rnn_torch import m2rnn_decode_step_torch, m2rnn_recurrence_torch

try:  # triton is optional: the CPU wheel of torch does not bring it
    from .m2rnn_triton import m2rnn_decode_step_triton, m2rnn_recurrence_triton
except ImportError:  # pragma: no cover - depends on the environment
    m2rnn_recurrence_triton = m2rnn_decode_step_triton = None

BACKENDS = ("torch", "triton")


def _triton_runs_on(device: torch.device) -> bool:
    if m2rnn_recurrence_triton is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def m2rnn_recurrence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    weight: torch.Tensor,
    forget: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    gradient_clipping: float | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """M2RNN recurrence ``Z = tanh(H W + k vᵀ)``, ``H = f H + (1 - f) Z``, ``y = qᵀ H`` per head and step.

    Args:
        q, k: ``(B, S, Nq|Nk, K)`` (or ``(T, ·, K)`` with `cu_seqlens`).
        v: ``(B, S, Nv, V)``. weight: ``(Nw, V, V)``. forget: ``(B, S, Nf)`` with values in (0, 1].
        initial_state: ``(B, N, K, V)``, one per sequence; zeros when None.
        cu_seqlens: int32 boundaries of packed sequences, starting at 0.
        gradient_clipping: clamp the recurrent carry ∂L/∂H_t to [-c, c] in the backward pass.
        backend: ``"torch"``, ``"triton"`` or None for the best available on the inputs' device.

    Returns:
        ``y`` ``(B, S, N, V)`` in the input dtype and the final state ``(B, N, K, V)`` in float32.
    """
    if _resolve_backend(backend, q.device, "m2rnn_recurrence") == "triton":
        fn = m2rnn_recurrence_triton
    else:
        fn = m2rnn_recurrence_torch
    return fn(q, k, v, weight, forget, initial_state, cu_seqlens=cu_seqlens, gradient_clipping=gradient_clipping)


def m2rnn_decode_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    weight: torch.Tensor,
    forget: torch.Tensor,
    state: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """One decode step of the recurrence, updating `state` (B, N, K, V, float32) in place; returns y (B, N, V).

    q (B, Nq, K), k (B, Nk, K), v (B, Nv, V), forget (B, Nf). No host sync, so it can be captured in a CUDA graph.
    """
    if _resolve_backend(backend, q.device, "m2rnn_decode_step") == "triton":
        return m2rnn_decode_step_triton(q, k, v, weight, forget, state)
    return m2rnn_decode_step_torch(q, k, v, weight, forget, state)


def _resolve_backend(backend: str | None, device: torch.device, op: str) -> str:
    """The backend to run: the one asked for (checked), or triton on CUDA when importable, else torch."""
    if backend is None:
        return "triton" if device.type == "cuda" and m2rnn_recurrence_triton is not None else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend={backend!r}, expected one of {BACKENDS} or None")
    if backend == "triton" and not _triton_runs_on(device):
        raise RuntimeError(
            f"{op}: backend='triton' needs triton and a CUDA device (or TRITON_INTERPRET=1 on CPU); "
            f"inputs are on {device}, the triton kernels {'are' if m2rnn_recurrence_triton else 'are not'} importable"
        )
    return backend
