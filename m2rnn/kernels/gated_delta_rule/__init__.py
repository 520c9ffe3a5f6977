"""The Gated DeltaNet recurrence op (`op.py`) with its torch reference; fla's kernels as the CUDA backend."""

from .op import BACKENDS, fla_available, gated_delta_rule, gated_delta_rule_step
from .reference import gated_delta_rule_torch, l2_normalize

__all__ = ["BACKENDS", "fla_available", "gated_delta_rule", "gated_delta_rule_step", "gated_delta_rule_torch", "l2_normalize"]
