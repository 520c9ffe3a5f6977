"""The M2RNN recurrence op (`op.py`) with its torch reference and Triton kernels."""

from .config import DEFAULT_CONFIG, M2RNNTritonConfig
from .op import BACKENDS, m2rnn_decode_step, m2rnn_recurrence
from .reference import m2rnn_decode_step_torch, m2rnn_recurrence_torch

__all__ = [
    "BACKENDS",
    "DEFAULT_CONFIG",
    "M2RNNTritonConfig",
    "m2rnn_decode_step",
    "m2rnn_decode_step_torch",
    "m2rnn_recurrence",
    "m2rnn_recurrence_torch",
]
