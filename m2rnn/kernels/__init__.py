"""Recurrence ops used by the model. One dispatch function per op; kernels never import the model."""

from .m2rnn import m2rnn_decode_step, m2rnn_recurrence
from .m2rnn_torch import m2rnn_decode_step_torch, m2rnn_recurrence_torch

__all__ = [
    "m2rnn_decode_step",
    "m2rnn_decode_step_torch",
    "m2rnn_recurrence",
    "m2rnn_recurrence_torch",
]
