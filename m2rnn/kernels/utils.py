"""Input checks and head grouping shared by the ops and their backends."""

from __future__ import annotations

import math
import os

import torch


def expand_heads(x: torch.Tensor, heads: int, dim: int) -> torch.Tensor:
    """Repeat grouped heads to `heads` along `dim` (contiguous groups: head n reads group n // (heads / groups))."""
    groups = x.shape[dim]
    return x if groups == heads else x.repeat_interleave(heads // groups, dim=dim)


def check_recurrence_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    weight: torch.Tensor,
    forget: torch.Tensor,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
) -> int:
    """Validate the op contract (DESIGN.md) and return the number of state heads N."""
    packed = cu_seqlens is not None
    token_dims = 1 if packed else 2
    names = {"q": q, "k": k, "v": v}
    for name, x in names.items():
        if x.dim() != token_dims + 2:
            layout = "(T, heads, dim)" if packed else "(B, S, heads, dim)"
            raise ValueError(f"m2rnn_recurrence: {name} must be {layout}, got shape {tuple(x.shape)}")
    if forget.dim() != token_dims + 1:
        raise ValueError(f"m2rnn_recurrence: forget must have {token_dims + 1} dims, got shape {tuple(forget.shape)}")
    if weight.dim() != 3 or weight.shape[1] != weight.shape[2]:
        raise ValueError(f"m2rnn_recurrence: weight must be (Nw, V, V), got shape {tuple(weight.shape)}")
    lead = q.shape[:token_dims]
    for name, x in (("k", k), ("v", v), ("forget", forget)):
        if x.shape[:token_dims] != lead:
            raise ValueError(f"m2rnn_recurrence: {name} has leading shape {tuple(x.shape[:token_dims])}, q has {tuple(lead)}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"m2rnn_recurrence: k head dim {k.shape[-1]} != q head dim {q.shape[-1]}")
    if weight.shape[-1] != v.shape[-1]:
        raise ValueError(f"m2rnn_recurrence: weight is {tuple(weight.shape)} but v head dim is {v.shape[-1]}")
    counts = {"q": q.shape[-2], "k": k.shape[-2], "v": v.shape[-2], "forget": forget.shape[-1], "weight": weight.shape[0]}
    heads = max(counts.values())
    for name, count in counts.items():
        if heads % count:
            raise ValueError(f"m2rnn_recurrence: {name} has {count} heads, which does not divide N={heads}")
    if packed:
        if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.dim() != 1:
            raise ValueError(f"m2rnn_recurrence: cu_seqlens must be a 1-D int32 tensor, got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
        batch = cu_seqlens.numel() - 1
    else:
        batch = q.shape[0]
    if initial_state is not None:
        expected = (batch, heads, q.shape[-1], v.shape[-1])
        if tuple(initial_state.shape) != expected:
            raise ValueError(f"m2rnn_recurrence: initial_state must be {expected}, got {tuple(initial_state.shape)}")
    return heads


def _value_checks_enabled(*tensors: torch.Tensor) -> bool:
    """Whether checks that read tensor values may run: not while torch.compile traces or a CUDA graph is captured
    (they would need a host sync there), and not with ``M2RNN_SKIP_VALUE_CHECKS=1`` (throughput runs that trust
    their inputs). On CPU they cost nothing; on CUDA they cost one host sync per call."""
    if torch.compiler.is_compiling() or os.environ.get("M2RNN_SKIP_VALUE_CHECKS") == "1":
        return False
    on_cuda = any(x.is_cuda for x in tensors)
    return not (on_cuda and torch.cuda.is_current_stream_capturing())


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, device: torch.device, op: str,
                     check_values: bool = True) -> None:
    """Refuse packed-sequence boundaries the kernels would read out of bounds with or silently misread.

    `cu_seqlens` must be a 1-D int32 tensor of at least two values on the inputs' device that starts at 0, never
    decreases and ends at the token count `total`. The values are checked where `_value_checks_enabled` and
    `check_values` (a caller that validated them already, like the model once per forward, passes False).
    """
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"{op}: cu_seqlens must be a 1-D int32 tensor of N+1 sequence boundaries, "
            f"got {cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.device != torch.device(device):
        raise ValueError(f"{op}: cu_seqlens is on {cu_seqlens.device}, the inputs on {device}; move it there")
    if not (check_values and _value_checks_enabled(cu_seqlens)):
        return
    steps = cu_seqlens[1:] - cu_seqlens[:-1]
    bad = (cu_seqlens[0] != 0) | (cu_seqlens[-1] != total) | (steps < 0).any()
    if bad.item():
        values = cu_seqlens.tolist()
        shown = values if len(values) <= 16 else values[:8] + ["..."] + values[-8:]
        raise ValueError(f"{op}: cu_seqlens must start at 0, never decrease and end at T={total}, got {shown}")


def check_gradient_clipping(gradient_clipping: float | None, op: str) -> None:
    """None (no clipping) or a finite number > 0: the bound of the carried gradient."""
    if gradient_clipping is None:
        return
    if isinstance(gradient_clipping, bool) or not isinstance(gradient_clipping, (int, float)):
        raise ValueError(f"{op}: gradient_clipping must be None or a number > 0, got {gradient_clipping!r}")
    if not math.isfinite(gradient_clipping) or gradient_clipping <= 0:
        raise ValueError(
            f"{op}: gradient_clipping must be None (no clipping) or a finite number > 0, got {gradient_clipping!r}"
        )


def check_forget_gates(forget: torch.Tensor, op: str, check_values: bool = True) -> None:
    """Forget gates must lie in [0, 1] (NaN refused too); checked where `_value_checks_enabled`.

    0 is allowed: the model's gate exp(-a·softplus(x)) underflows to exactly 0 in float32 for large inputs, and the
    recurrence is well defined there (H_t = Z_t; nothing divides by f)."""
    if forget.numel() == 0 or not (check_values and _value_checks_enabled(forget)):
        return
    outside = ~((forget >= 0) & (forget <= 1))
    if outside.any().item():
        first = forget[outside].flatten()[0].item()
        count = int(outside.sum().item())
        raise ValueError(f"{op}: forget gates must lie in [0, 1], got {count} outside (e.g. {first!r})")
