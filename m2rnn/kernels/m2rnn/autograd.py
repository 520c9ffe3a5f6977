"""The Triton M2RNN recurrence as an autograd function, and the forward/backward pair the torch.library op wraps.

Forward keeps the inputs and the float32 checkpoints; backward recomputes each chunk from its checkpoint.
"""

from __future__ import annotations

import torch

from ..utils import check_recurrence_inputs
from .backward import _backward
from .forward import _forward
from .reference import m2rnn_recurrence_torch
from .triton_common import DEFAULT_CONFIG, M2RNNTritonConfig, _check_dims, _Layout, _prepare


def _shapes_and_dtypes(*tensors) -> tuple:
    return tuple(None if x is None else (x.shape, x.dtype) for x in tensors)


def _input_gradients(layout: _Layout, saved, like, checkpoints, dy, d_final_state, clip, needs_dh0: bool):
    """Gradients of (q, k, v, weight, forget, initial_state) from the float32 checkpoints, with the (shape, dtype)
    pairs in `like`; `saved` are the token-major tensors `_prepare` made of the inputs. dh0 is None unless
    `needs_dh0`."""
    q = saved[0]
    if dy is None:
        dy = torch.zeros(layout.tokens, layout.heads, layout.value_dim, dtype=q.dtype, device=q.device)
    dy = dy.reshape(layout.tokens, layout.heads, layout.value_dim).contiguous()
    if d_final_state is not None:
        d_final_state = d_final_state.contiguous()
    grads = _backward(layout, *saved, checkpoints, dy, d_final_state, clip, needs_dh0)
    return tuple(None if g is None else g.reshape(spec[0]).to(spec[1]) for g, spec in zip(grads, like))


class _M2RNNTriton(torch.autograd.Function):
    """Autograd wrapper: forward keeps the inputs and the float32 checkpoints; backward recomputes per chunk."""

    @staticmethod
    def forward(ctx, q, k, v, weight, forget, initial_state, cu_seqlens, heads, gradient_clipping, config):
        layout, inputs = _prepare(q, k, v, weight, forget, initial_state, cu_seqlens, heads, config)
        y, final_state, checkpoints = _forward(layout, *inputs, store_checkpoints=True)
        ctx.save_for_backward(*inputs[:5], checkpoints)
        ctx.layout = layout
        ctx.like = _shapes_and_dtypes(q, k, v, weight, forget, initial_state)
        ctx.gradient_clipping = gradient_clipping
        return y.reshape(*q.shape[:-2], heads, v.shape[-1]), final_state

    @staticmethod
    def backward(ctx, dy, d_final_state):
        *saved, checkpoints = ctx.saved_tensors
        needs_dh0 = ctx.like[5] is not None and ctx.needs_input_grad[5]
        grads = _input_gradients(ctx.layout, saved, ctx.like, checkpoints, dy, d_final_state,
                                 ctx.gradient_clipping, needs_dh0)
        return (*grads, None, None, None, None)


def m2rnn_recurrence_triton_forward(
    q, k, v, weight, forget, initial_state=None, *, cu_seqlens=None, config: M2RNNTritonConfig = DEFAULT_CONFIG
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward that keeps what the backward needs: ``(y, final_state, checkpoints)``, no autograd.

    For registering the op with `torch.library` (m2rnn.kernels.m2rnn), where autograd is wired outside; pair it with
    `m2rnn_recurrence_triton_backward` on the same inputs. Needs at least one token.
    """
    heads = check_recurrence_inputs(q, k, v, weight, forget, initial_state, cu_seqlens)
    _check_dims(q.shape[-1], v.shape[-1])
    layout, inputs = _prepare(q, k, v, weight, forget, initial_state, cu_seqlens, heads, config)
    y, final_state, checkpoints = _forward(layout, *inputs, store_checkpoints=True)
    return y.reshape(*q.shape[:-2], heads, v.shape[-1]), final_state, checkpoints


def m2rnn_recurrence_triton_backward(
    q, k, v, weight, forget, initial_state, checkpoints, dy, d_final_state, *, cu_seqlens=None,
    gradient_clipping=None, config: M2RNNTritonConfig = DEFAULT_CONFIG,
) -> tuple[torch.Tensor, ...]:
    """Gradients of (q, k, v, weight, forget, initial_state) from `m2rnn_recurrence_triton_forward`'s checkpoints;
    the last is None without an initial state. `dy` / `d_final_state` may be None (no gradient flowing there)."""
    heads = check_recurrence_inputs(q, k, v, weight, forget, initial_state, cu_seqlens)
    layout, prepared = _prepare(q, k, v, weight, forget, initial_state, cu_seqlens, heads, config)
    like = _shapes_and_dtypes(q, k, v, weight, forget, initial_state)
    return _input_gradients(layout, prepared[:5], like, checkpoints, dy, d_final_state, gradient_clipping,
                            initial_state is not None)


def m2rnn_recurrence_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    weight: torch.Tensor,
    forget: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    gradient_clipping: float | None = None,
    config: M2RNNTritonConfig = DEFAULT_CONFIG,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton M2RNN recurrence; shapes and semantics as `m2rnn.kernels.m2rnn_recurrence`.

    K ≤ 256 and V ≤ 64. Any input dtype (bf16, fp16, fp32); state and gate are carried in float32 and the final
    state is float32. Memory kept for backward: the inputs plus B·N·K·V·⌈S/C⌉ float32 checkpoints, C =
    ``config.checkpoint_interval`` (64). Inputs are trusted: `m2rnn.kernels.m2rnn_recurrence` validates them.
    """
    heads = check_recurrence_inputs(q, k, v, weight, forget, initial_state, cu_seqlens)
    _check_dims(q.shape[-1], v.shape[-1])
    if q.numel() == 0:  # no token at all: nothing to launch
        return m2rnn_recurrence_torch(
            q, k, v, weight, forget, initial_state, cu_seqlens=cu_seqlens, gradient_clipping=gradient_clipping
        )
    tensors = (q, k, v, weight, forget, initial_state)
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors):
        return _M2RNNTriton.apply(q, k, v, weight, forget, initial_state, cu_seqlens, heads, gradient_clipping,
                                  config)
    layout, inputs = _prepare(q, k, v, weight, forget, initial_state, cu_seqlens, heads, config)
    y, final_state, _ = _forward(layout, *inputs, store_checkpoints=False)
    return y.reshape(*q.shape[:-2], heads, v.shape[-1]), final_state
