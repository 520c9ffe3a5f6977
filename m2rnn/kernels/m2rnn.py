"""The dispatch point of the M2RNN recurrence: `m2rnn_recurrence` picks a backend and calls it."""

from __future__ import annotations

import os

import torch

from .m2rnn_torch import m2rnn_recurrence_torch

try:  # triton is optional: the CPU wheel of torch does not bring it
    from .m2rnn_triton import m2rnn_recurrence_triton
except ImportError:  # pragma: no cover - depends on the environment
    m2rnn_recurrence_triton = None

BACKENDS = ("torch", "triton")


def _triton_runs_on(device: torch.device) -> bool:
    if m2rnn_recurrence_triton is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on `device` in this environment."""
    device = torch.device(device)
    return ["torch"] + (["triton"] if _triton_runs_on(device) else [])


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
    if backend is None:
        backend = "triton" if q.device.type == "cuda" and m2rnn_recurrence_triton is not None else "torch"
    if backend == "torch":
        fn = m2rnn_recurrence_torch
    elif backend == "triton":
        if not _triton_runs_on(q.device):
            raise RuntimeError(
                "m2rnn_recurrence: backend='triton' needs triton and a CUDA device (or TRITON_INTERPRET=1 on CPU); "
                f"inputs are on {q.device}, triton {'is' if m2rnn_recurrence_triton else 'is not'} importable"
            )
        fn = m2rnn_recurrence_triton
    else:
        raise ValueError(f"m2rnn_recurrence: unknown backend={backend!r}, expected one of {BACKENDS} or None")
    return fn(q, k, v, weight, forget, initial_state, cu_seqlens=cu_seqlens, gradient_clipping=gradient_clipping)
