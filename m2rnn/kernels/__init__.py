"""Recurrence ops used by the model, one folder per op: `m2rnn`, `gated_delta_rule`, `short_conv`.

Each folder holds the naive torch reference (`reference.py`), its kernels, and one `op.py` that validates the
inputs, picks a backend and (where torch.compile needs it) registers the `torch.library` op. Backends share one
vocabulary — ``"torch"`` everywhere, ``"triton"`` (M2RNN), ``"fla"`` (GDN), ``"cuda"`` (short conv) — and each op's
`BACKENDS` lists its own. The model imports kernels only from here; kernels never import the model.
"""

from .gated_delta_rule import fla_available, gated_delta_rule, gated_delta_rule_step, gated_delta_rule_torch
from .m2rnn import (
    M2RNNTritonConfig,
    m2rnn_decode_step,
    m2rnn_decode_step_torch,
    m2rnn_recurrence,
    m2rnn_recurrence_torch,
)
from .short_conv import causal_conv1d, causal_conv1d_step
from .utils import check_cu_seqlens, expand_heads

__all__ = [
    "M2RNNTritonConfig",
    "causal_conv1d",
    "causal_conv1d_step",
    "check_cu_seqlens",
    "expand_heads",
    "fla_available",
    "gated_delta_rule",
    "gated_delta_rule_step",
    "gated_delta_rule_torch",
    "m2rnn_decode_step",
    "m2rnn_decode_step_torch",
    "m2rnn_recurrence",
    "m2rnn_recurrence_torch",
]
