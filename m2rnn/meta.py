"""A model's shapes without its memory: `M2RNNForCausalLM` built on the meta device, for the tensor names and shapes a
checkpoint of a config must hold and for parameter counts (seconds even for billions of parameters)."""

from __future__ import annotations

import torch

from .configuration_m2rnn import M2RNNConfig
from .modeling_m2rnn import M2RNNForCausalLM


def meta_model(config: M2RNNConfig) -> M2RNNForCausalLM:
    """`M2RNNForCausalLM(config)` on the meta device: every parameter has its shape and dtype, none has memory."""
    with torch.device("meta"):
        return M2RNNForCausalLM(config)


def expected_tensors(config: M2RNNConfig, keep_tied: bool = False) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors an `M2RNNForCausalLM` with `config` saves; a tied `lm_head.weight` (not saved)
    is left out unless `keep_tied`."""
    shapes = {name: tuple(t.shape) for name, t in meta_model(config).state_dict().items()}
    if config.tie_word_embeddings and not keep_tied:
        shapes.pop("lm_head.weight", None)
    return shapes


def count_parameters(config: M2RNNConfig) -> int:
    """Parameters of `M2RNNForCausalLM(config)` (tied weights counted once)."""
    return meta_model(config).num_parameters()
