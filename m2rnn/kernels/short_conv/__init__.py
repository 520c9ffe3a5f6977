"""The short causal conv op (`op.py`) with its torch reference; the causal-conv1d package as the CUDA backend."""

from .op import BACKENDS, causal_conv1d, causal_conv1d_step
from .reference import causal_conv1d_step_torch, causal_conv1d_torch

__all__ = ["BACKENDS", "causal_conv1d", "causal_conv1d_step", "causal_conv1d_step_torch", "causal_conv1d_torch"]
