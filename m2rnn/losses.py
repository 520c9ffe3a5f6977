"""Fused linear cross-entropy for training: the causal-LM loss without materialising the logits.

At 4K context and a 100K vocabulary the logits of one batch (and their float32 upcast in the plain loss) are the
largest tensors of a training step. liger-kernel's fused linear cross-entropy computes the loss and its gradients
chunk by chunk from the final hidden states and the `lm_head` weight, so full logits never exist.

The plain loss stays the default. Turn the fused one on with any of:

- `Trainer(args=TrainingArguments(..., use_liger_kernel=True))`: building an `M2RNNForCausalLM` on a machine with
  CUDA and liger-kernel (or in a process that already imported liger-kernel) registers `apply_liger_kernel_to_m2rnn`
  in liger-kernel's model-type table, so Trainer applies it to our model type (`register_with_liger()` does it by
  hand);
- `m2rnn.losses.apply_liger_kernel_to_m2rnn(model)` in your own loop (or `examples/finetune.py --fused-ce`).

It needs liger-kernel (`pip install liger-kernel`) and a CUDA device (on CPU: `TRITON_INTERPRET=1`, for tests).
It replaces the loss only in training forwards that get `labels` (those then return `logits=None`); evaluation and
generation compute logits as before. The loss equals the plain one: same label shift, `ignore_index=-100`, and
`sum / num_items_in_batch` when Trainer (or a custom loop) passes the target count of the whole step.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from typing import Any

import torch
from torch import nn

from .configuration_m2rnn import M2RNNConfig

IGNORE_INDEX = -100
LIGER_MODEL_TABLE = "liger_kernel.transformers.monkey_patch"  # holds liger's `MODEL_TYPE_TO_APPLY_LIGER_FN`


def liger_available() -> bool:
    """Whether liger-kernel is installed (its import is deferred until the fused loss runs)."""
    return importlib.util.find_spec("liger_kernel") is not None


def fused_loss_supported(device: torch.device) -> bool:
    """liger's Triton kernels run on CUDA devices, and on the CPU only in the Triton interpreter."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def apply_liger_kernel_to_m2rnn(
    model: nn.Module | None = None, fused_linear_cross_entropy: bool = True, cross_entropy: bool = False, **_: Any
) -> None:
    """Turn liger-kernel's fused linear cross-entropy on (or off) for `model`, or for every M2RNN model when `model`
    is None. The signature follows liger's `apply_liger_kernel_to_<model_type>` functions, which Trainer's
    `use_liger_kernel=True` calls with the options of `liger_kernel_config`; liger's other kernels (RMSNorm, RoPE,
    SwiGLU) do not apply to this model and their options are accepted and ignored."""
    from .modeling_m2rnn import M2RNNForCausalLM

    if cross_entropy:
        raise ValueError(
            "apply_liger_kernel_to_m2rnn: cross_entropy=True (liger's unfused cross-entropy) is not supported; "
            "use fused_linear_cross_entropy=True"
        )
    if fused_linear_cross_entropy and not liger_available():
        raise ImportError(
            "fused linear cross-entropy needs liger-kernel, which is not installed: pip install liger-kernel"
        )
    if model is None:
        M2RNNForCausalLM.fused_linear_cross_entropy = fused_linear_cross_entropy
        return
    causal_lms = [module for module in model.modules() if isinstance(module, M2RNNForCausalLM)]
    if not causal_lms:
        raise TypeError(f"apply_liger_kernel_to_m2rnn: no M2RNNForCausalLM inside {type(model).__name__}")
    for causal_lm in causal_lms:
        causal_lm.fused_linear_cross_entropy = fused_linear_cross_entropy


def register_with_liger() -> None:
    """Add `m2rnn → apply_liger_kernel_to_m2rnn` to liger-kernel's model-type table (imports liger-kernel), so that
    `Trainer(use_liger_kernel=True)` applies the fused loss to our models."""
    try:
        from liger_kernel.transformers import monkey_patch
    except ImportError as error:
        raise ImportError("register_with_liger: liger-kernel is not installed: pip install liger-kernel") from error
    monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN.setdefault(M2RNNConfig.model_type, apply_liger_kernel_to_m2rnn)


def register_with_liger_where_it_runs() -> None:
    """Called when a causal LM is built. Registers with liger-kernel if its table is already imported, or if
    liger-kernel is installed and CUDA is present (the only place the fused loss runs). A CPU-only process skips
    it, since importing liger-kernel takes seconds; a broken liger-kernel install only warns."""
    if LIGER_MODEL_TABLE not in sys.modules and not (torch.cuda.is_available() and liger_available()):
        return
    try:
        register_with_liger()
    except Exception as error:  # never break building a model over an optional integration
        warnings.warn(
            f"m2rnn: could not register with liger-kernel ({error!r}); Trainer(use_liger_kernel=True) will not "
            "apply the fused loss (call m2rnn.losses.apply_liger_kernel_to_m2rnn(model) instead)",
            stacklevel=2,
        )


def fused_linear_cross_entropy(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = IGNORE_INDEX,
    shift_labels: torch.Tensor | None = None,
    **_: Any,
) -> torch.Tensor:
    """The causal-LM loss of `hidden_states @ weight.T` without the logits, as `transformers`' `ForCausalLMLoss`
    defines it: `labels` shift left by one (or `shift_labels` are used as given), `ignore_index` targets are left
    out, the sum is divided by `num_items_in_batch` when given, else the mean over scored targets is taken."""
    if not fused_loss_supported(hidden_states.device):
        raise RuntimeError(
            "fused linear cross-entropy (liger-kernel) runs on CUDA devices only, but the hidden states are on "
            f"{hidden_states.device}; turn it off with apply_liger_kernel_to_m2rnn(model, "
            "fused_linear_cross_entropy=False) (or drop use_liger_kernel / --fused-ce)"
        )
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError as error:
        raise ImportError(
            "fused linear cross-entropy needs liger-kernel, which is not installed: pip install liger-kernel"
        ) from error

    if shift_labels is None:
        if labels is None:
            raise ValueError("fused_linear_cross_entropy: pass labels or shift_labels")
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    hidden_states = hidden_states.reshape(-1, hidden_states.shape[-1])
    if torch.is_autocast_enabled(hidden_states.device.type):  # the plain lm_head would run in the autocast dtype
        dtype = torch.get_autocast_dtype(hidden_states.device.type)
        hidden_states, weight = hidden_states.to(dtype), weight.to(dtype)
    elif weight.dtype != hidden_states.dtype:
        hidden_states = hidden_states.to(weight.dtype)
    targets = shift_labels.reshape(-1).to(hidden_states.device)
    reduction = "mean" if num_items_in_batch is None else "sum"
    with torch.autocast(hidden_states.device.type, enabled=False):
        loss = liger_fused_linear_cross_entropy(
            hidden_states.contiguous(), weight, targets, ignore_index=ignore_index, reduction=reduction
        )
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


__all__ = [
    "apply_liger_kernel_to_m2rnn",
    "fused_linear_cross_entropy",
    "fused_loss_supported",
    "liger_available",
]
