"""Shape checks and head grouping shared by every backend of the M2RNN recurrence."""

from __future__ import annotations

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
