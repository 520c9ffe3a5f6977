"""Torch reference of the depthwise causal conv1d (any device, differentiable): whole sequences, packed
sequences with the convolution reset at every boundary, and one decode token against a rolling conv state."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate in at least float32 (bf16/fp16 inputs are upcast, float64 stays)."""
    return torch.promote_types(dtype, torch.float32)


def _position_in_sequence(cu_seqlens: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence index and position within its sequence for each of `length` packed tokens (no host sync)."""
    positions = torch.arange(length, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    seq_idx = torch.searchsorted(cu_seqlens[1:].contiguous(), positions, right=True)
    return seq_idx, positions - cu_seqlens[seq_idx]


def causal_conv1d_torch(x: torch.Tensor, weight: torch.Tensor, activation: str | None, cu_seqlens: torch.Tensor | None):
    """x (B, C, T), weight (C, Kc), checked by `m2rnn.kernels.causal_conv1d`; returns (B, C, T) in x's dtype."""
    channels, width = weight.shape
    length = x.shape[-1]
    dtype = _compute_dtype(x.dtype)
    x_c, w = x.to(dtype), weight.to(dtype)
    if cu_seqlens is None:
        y = F.conv1d(F.pad(x_c, (width - 1, 0)), w.unsqueeze(1), groups=channels)
    else:
        # Tap `lag` reads x[t - lag]; zero it where t is fewer than `lag` tokens into its sequence.
        _, pos = _position_in_sequence(cu_seqlens, length)
        y = x_c * w[:, -1:]
        for lag in range(1, width):
            shifted = F.pad(x_c, (lag, 0))[..., :length]
            y = y + shifted * w[:, width - 1 - lag, None] * (pos >= lag).to(dtype)
    if activation == "silu":
        y = F.silu(y)
    return y.to(x.dtype)



def causal_conv1d_step_torch(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, activation: str | None):
    """One token x (B, C) against conv_state (B, C, Kc), updated in place; returns (B, C) in x's dtype."""
    width = weight.shape[-1]
    # Shift left one column at a time: no temporary, and no overlapping copy (which torch refuses).
    for i in range(width - 1):
        conv_state[..., i].copy_(conv_state[..., i + 1])
    conv_state[..., -1].copy_(x)
    dtype = _compute_dtype(conv_state.dtype)
    y = torch.einsum("bck,ck->bc", conv_state.to(dtype), weight.to(dtype))
    if activation == "silu":
        y = F.silu(y)
    return y.to(x.dtype)
