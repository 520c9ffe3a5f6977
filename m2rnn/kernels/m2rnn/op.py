"""The M2RNN recurrence op: `m2rnn_recurrence` / `m2rnn_decode_step` validate the inputs, pick a backend and run it.

Backends: ``"torch"`` (`reference.py`, any device), ``"triton"`` (`forward.py`, `backward.py`, `decode.py`;
CUDA, or the CPU interpreter with ``TRITON_INTERPRET=1``) and ``"cuda"``: the CUDA forward and backward
(`cuda_forward.cu`, `cuda_backward.cu`, compiled at run time by NVRTC) where they cover the case
(`cuda_kernels.py`), the Triton kernels elsewhere; both keep the same checkpoints and gradient partials. Without
a backend named, CUDA inputs run "cuda" where NVRTC is found (torch's CUDA wheels bring it), else "triton";
``M2RNN_BACKEND`` names one for every call that names none.

While `torch.compile` traces, the Triton backend is called through `torch.library` custom ops (`m2rnn::*`,
registered below around the forward/backward pair of `autograd.py`, which share the float32 checkpoints as the
eager autograd path does), so that dynamo sees opaque ops with fake (shape-only) implementations instead of
tracing the launch code; eager calls go straight to the kernels.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from ..utils import check_cu_seqlens, check_forget_gates, check_gradient_clipping, check_recurrence_inputs
from .config import DEFAULT_CONFIG, M2RNNTritonConfig
from .reference import m2rnn_decode_step_torch, m2rnn_recurrence_torch

try:  # triton is optional: the CPU wheel of torch does not bring it
    from .autograd import (
        m2rnn_recurrence_triton,
        m2rnn_recurrence_triton_backward,
        m2rnn_recurrence_triton_forward,
    )
    from .decode import m2rnn_decode_step_triton
    from .cuda_runtime import cuda_kernels_available
    from .triton_common import checkpoints_shape
except ImportError:  # pragma: no cover - depends on the environment
    m2rnn_recurrence_triton = m2rnn_decode_step_triton = None

    def cuda_kernels_available() -> bool:
        return False

BACKENDS = ("torch", "triton", "cuda")


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
    triton_config: M2RNNTritonConfig = DEFAULT_CONFIG,
    check_values: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """M2RNN recurrence ``Z = tanh(H W + k vᵀ)``, ``H = f H + (1 - f) Z``, ``y = qᵀ H`` per head and step.

    Args:
        q, k: ``(B, S, Nq|Nk, K)`` (or ``(T, ·, K)`` with `cu_seqlens`).
        v: ``(B, S, Nv, V)``. weight: ``(Nw, V, V)``. forget: ``(B, S, Nf)`` with values in [0, 1].
        initial_state: ``(B, N, K, V)``, one per sequence; zeros when None.
        cu_seqlens: 1-D int32 boundaries of packed sequences on the inputs' device: 0, ..., T, never decreasing.
        gradient_clipping: clamp the recurrent carry ∂L/∂H_t to [-c, c] in the backward pass; None or c > 0.
        backend: ``"torch"``, ``"triton"``, ``"cuda"`` (the CUDA kernels where they cover the case: 16-bit inputs, K
            and V multiples of 16; the Triton kernels elsewhere) or None: ``M2RNN_BACKEND`` if set, else the
            fastest available on the inputs' device (cuda, then triton, then torch).
        triton_config: launch knobs of the Triton kernels (`M2RNNTritonConfig`); the default suits training.
        check_values: read `cu_seqlens` and `forget` to check their values (a host sync on CUDA). Callers that
            produce valid values themselves (the model: gates from its own activation, boundaries checked once
            per forward) pass False.

    Returns:
        ``y`` ``(B, S, N, V)`` in the input dtype and the final state ``(B, N, K, V)`` in float32.

    The values of `cu_seqlens` and `forget` are checked here, once, except while torch.compile traces, while a
    CUDA graph is captured, or with ``M2RNN_SKIP_VALUE_CHECKS=1`` (on CUDA the check costs a host sync). With
    the Triton backend, S == 1 without gradients runs the decode kernel and, like `m2rnn_decode_step`, skips the
    forget-gate value check (no host sync on a decode path).
    """
    op = "m2rnn_recurrence"
    check_recurrence_inputs(q, k, v, weight, forget, initial_state, cu_seqlens)
    check_gradient_clipping(gradient_clipping, op)
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, q.shape[0], q.device, op, check_values)
    resolved = _resolve_backend(backend, q.device, op)
    if resolved == "cuda":
        triton_config = dataclasses.replace(triton_config, cuda_kernels=True)
    if resolved in ("triton", "cuda"):
        if torch.compiler.is_compiling():
            return _recurrence_op(q, k, v, weight, forget, initial_state, cu_seqlens, gradient_clipping,
                                  triton_config)
        if _is_one_step_without_grad(q, k, v, weight, forget, initial_state, cu_seqlens):
            return _one_step(q, k, v, weight, forget, initial_state)  # decode-like: no host sync for checks
        check_forget_gates(forget, op, check_values)
        return m2rnn_recurrence_triton(q, k, v, weight, forget, initial_state, cu_seqlens=cu_seqlens,
                                       gradient_clipping=gradient_clipping, config=triton_config)
    check_forget_gates(forget, op, check_values)
    return m2rnn_recurrence_torch(q, k, v, weight, forget, initial_state, cu_seqlens=cu_seqlens,
                                  gradient_clipping=gradient_clipping)


def _is_one_step_without_grad(q, k, v, weight, forget, initial_state, cu_seqlens) -> bool:
    """A single token per sequence with nothing to differentiate: the decode kernel's job (one launch, no
    checkpoints, no layout work)."""
    if cu_seqlens is not None or q.shape[1] != 1:
        return False
    tensors = (q, k, v, weight, forget, initial_state)
    return not (torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors))


def _one_step(q, k, v, weight, forget, initial_state):
    """`m2rnn_recurrence` for S == 1 through the decode kernel, on a float32 copy of the state."""
    heads = _num_heads(q, k, v, weight, forget)
    if initial_state is None:
        state = q.new_zeros(q.shape[0], heads, q.shape[-1], v.shape[-1], dtype=torch.float32)
    else:
        state = initial_state.to(torch.float32, copy=True).contiguous()
    y = m2rnn_decode_step_triton(q[:, 0], k[:, 0], v[:, 0], weight, forget[:, 0], state)
    return y.unsqueeze(1).to(q.dtype), state


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
    if _resolve_backend(backend, q.device, "m2rnn_decode_step") in ("triton", "cuda"):  # one decode kernel
        if torch.compiler.is_compiling():
            return torch.ops.m2rnn.decode_step_triton(q, k, v, weight, forget, state)
        return m2rnn_decode_step_triton(q, k, v, weight, forget, state)
    return m2rnn_decode_step_torch(q, k, v, weight, forget, state)


BACKEND_VARIABLE = "M2RNN_BACKEND"


def _resolve_backend(backend: str | None, device: torch.device, op: str) -> str:
    """The backend to run: the one asked for (checked); else the one ``M2RNN_BACKEND`` names (checked); else on
    CUDA the CUDA kernels where NVRTC can build them, the Triton kernels otherwise; torch elsewhere."""
    source = f"backend={backend!r}"
    if backend is None and os.environ.get(BACKEND_VARIABLE):
        backend = os.environ[BACKEND_VARIABLE]
        source = f"{BACKEND_VARIABLE}={backend!r}"
    if backend is None:
        if device.type != "cuda" or m2rnn_recurrence_triton is None:
            return "torch"
        return "cuda" if cuda_kernels_available() else "triton"
    if backend not in BACKENDS:
        raise ValueError(f"{op}: unknown {source}, expected one of {BACKENDS} or None")
    if backend == "triton" and not _triton_runs_on(device):
        raise RuntimeError(
            f"{op}: {source} needs triton and a CUDA device (or TRITON_INTERPRET=1 on CPU); "
            f"inputs are on {device}, the triton kernels {'are' if m2rnn_recurrence_triton else 'are not'} importable"
        )
    if backend == "cuda" and not (device.type == "cuda" and _triton_runs_on(device) and cuda_kernels_available()):
        raise RuntimeError(
            f"{op}: {source} needs a CUDA device, triton and NVRTC (torch's CUDA wheels bring it); "
            f"inputs are on {device}"
        )
    return backend


# ---------------------------------------------------------------------------------------------------------------
# torch.library registration of the Triton backend (what torch.compile sees)
# ---------------------------------------------------------------------------------------------------------------
def _num_heads(q, k, v, weight, forget) -> int:
    return max(q.shape[-2], k.shape[-2], v.shape[-2], forget.shape[-1], weight.shape[0])


def _config_fields(config: M2RNNTritonConfig) -> list[int]:
    """The config as the int list a custom op can take (block_k None as 0, booleans as 0/1)."""
    return [int(value or 0) for value in dataclasses.astuple(config)]


def _config_from(fields: list[int]) -> M2RNNTritonConfig:
    types = [field.type for field in dataclasses.fields(M2RNNTritonConfig)]
    values = [bool(x) if kind == "bool" else (x or None) if "None" in kind else x for x, kind in zip(fields, types)]
    return M2RNNTritonConfig(*values)


def _recurrence_op(q, k, v, weight, forget, initial_state, cu_seqlens, gradient_clipping, config):
    """The Triton recurrence as custom ops: a forward that also returns its float32 checkpoints (saved for the
    backward, not returned to the caller) and a backward that starts from them, as the eager autograd path does."""
    y, final_state, _ = torch.ops.m2rnn.recurrence_triton(
        q, k, v, weight, forget, initial_state, cu_seqlens, gradient_clipping, _config_fields(config)
    )
    return y, final_state


if m2rnn_recurrence_triton is not None:

    @torch.library.custom_op("m2rnn::recurrence_triton", mutates_args=())
    def _recurrence_triton_op(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        weight: torch.Tensor,
        forget: torch.Tensor,
        initial_state: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None,
        gradient_clipping: float | None,
        config: list[int],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return m2rnn_recurrence_triton_forward(
            q, k, v, weight, forget, initial_state, cu_seqlens=cu_seqlens, config=_config_from(config)
        )

    @_recurrence_triton_op.register_fake
    def _(q, k, v, weight, forget, initial_state, cu_seqlens, gradient_clipping, config):
        heads = _num_heads(q, k, v, weight, forget)
        batch = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
        y = q.new_empty(*q.shape[:-2], heads, v.shape[-1])
        final_state = q.new_empty(batch, heads, q.shape[-1], v.shape[-1], dtype=torch.float32)
        checkpoints = q.new_empty(checkpoints_shape(q, v, heads, cu_seqlens, config[0]), dtype=torch.float32)
        return y, final_state, checkpoints

    @torch.library.custom_op("m2rnn::recurrence_triton_backward", mutates_args=())
    def _recurrence_triton_backward_op(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        weight: torch.Tensor,
        forget: torch.Tensor,
        initial_state: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None,
        gradient_clipping: float | None,
        config: list[int],
        checkpoints: torch.Tensor,
        dy: torch.Tensor,
        d_final_state: torch.Tensor,
    ) -> list[torch.Tensor]:
        *grads, dh0 = m2rnn_recurrence_triton_backward(
            q, k, v, weight, forget, initial_state, checkpoints, dy, d_final_state, cu_seqlens=cu_seqlens,
            gradient_clipping=gradient_clipping, config=_config_from(config),
        )
        return grads + [dh0 if dh0 is not None else q.new_empty(0)]

    @_recurrence_triton_backward_op.register_fake
    def _(q, k, v, weight, forget, initial_state, cu_seqlens, gradient_clipping, config, checkpoints, dy,
          d_final_state):
        h0_grad = torch.empty_like(initial_state) if initial_state is not None else q.new_empty(0)
        return [torch.empty_like(x) for x in (q, k, v, weight, forget)] + [h0_grad]

    def _setup_context(ctx, inputs, output):
        q, k, v, weight, forget, initial_state, cu_seqlens, gradient_clipping, config = inputs
        ctx.save_for_backward(q, k, v, weight, forget, initial_state, cu_seqlens, output[2])
        ctx.gradient_clipping = gradient_clipping
        ctx.config = config

    def _backward(ctx, dy, d_final_state, _d_checkpoints):
        q, k, v, weight, forget, initial_state, cu_seqlens, checkpoints = ctx.saved_tensors
        if d_final_state is None:  # the backward kernel reads dy always; a missing final-state gradient is zero
            batch = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
            heads = _num_heads(q, k, v, weight, forget)
            d_final_state = torch.zeros(batch, heads, q.shape[-1], v.shape[-1], dtype=torch.float32, device=q.device)
        if dy is None:
            dy = torch.zeros(*q.shape[:-2], _num_heads(q, k, v, weight, forget), v.shape[-1], dtype=q.dtype,
                             device=q.device)
        dq, dk, dv, dw, df, dh0 = torch.ops.m2rnn.recurrence_triton_backward(
            q, k, v, weight, forget, initial_state, cu_seqlens, ctx.gradient_clipping, ctx.config, checkpoints, dy,
            d_final_state,
        )
        return dq, dk, dv, dw, df, (dh0 if initial_state is not None else None), None, None, None

    _recurrence_triton_op.register_autograd(_backward, setup_context=_setup_context)

    @torch.library.custom_op("m2rnn::decode_step_triton", mutates_args=("state",))
    def _decode_step_triton_op(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weight: torch.Tensor, forget: torch.Tensor, state: torch.Tensor
    ) -> torch.Tensor:
        return m2rnn_decode_step_triton(q, k, v, weight, forget, state)

    @_decode_step_triton_op.register_fake
    def _(q, k, v, weight, forget, state):
        return v.new_empty(state.shape[0], state.shape[1], v.shape[-1])
