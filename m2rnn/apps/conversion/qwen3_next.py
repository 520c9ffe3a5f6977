"""Qwen3-Next (`qwen3_next`).

Same attention, norms and MoE as Qwen3.5-MoE (see `qwen3_5`, `qwen3_5_moe`), with three differences:
- the GDN input projections are fused and interleaved per key head g: `in_proj_qkvz` rows
  `[q_g (DK) | k_g (DK) | v_g (r·DV) | z_g (r·DV)]` and `in_proj_ba` rows `[b_g (r) | a_g (r)]` (r = NV/NK); they
  are regrouped into our flat `in_proj_qkv = [all q | all k | all v]`, `in_proj_z`, `in_proj_b`, `in_proj_a`
  (the conv weight is already flat);
- a layer is MoE iff `num_experts > 0`, `(i + 1) % decoder_sparse_step == 0` and `i` is not in `mlp_only_layers`;
  the others keep a dense SwiGLU MLP of `intermediate_size` (→ our `mlp_only_layers`);
- `norm_topk_prob` is a config flag.
The `mtp.*` tensors (multi-token prediction) are dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from m2rnn.configuration_m2rnn import M2RNNConfig
from .common import ImportPlan, TensorSpec, derived
from .io import CheckpointReader
from .qwen3_5 import load_reference, load_text_config, qwen_base_config, qwen_ignored, renaming_plan, tied_embeddings
from .qwen3_5_moe import moe_overrides

MODEL_TYPES = ("qwen3_next",)
__all__ = ["MODEL_TYPES", "build_plan", "load_reference", "split_qkvz", "split_ba"]


def split_qkvz(weight: torch.Tensor, config: M2RNNConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Interleaved `in_proj_qkvz` → (flat `in_proj_qkv`, `in_proj_z`)."""
    key_heads, key_dim = config.linear_num_key_heads, config.linear_key_head_dim
    group_value = config.linear_num_value_heads // key_heads * config.linear_value_head_dim
    groups = weight.reshape(key_heads, 2 * key_dim + 2 * group_value, weight.shape[-1])
    q, k, v, z = (x.reshape(-1, weight.shape[-1]) for x in groups.split([key_dim, key_dim, group_value, group_value], 1))
    return torch.cat([q, k, v]), z


def split_ba(weight: torch.Tensor, config: M2RNNConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Interleaved `in_proj_ba` → (`in_proj_b`, `in_proj_a`)."""
    key_heads = config.linear_num_key_heads
    ratio = config.linear_num_value_heads // key_heads
    b, a = weight.reshape(key_heads, 2 * ratio, weight.shape[-1]).split([ratio, ratio], dim=1)
    return b.reshape(-1, weight.shape[-1]), a.reshape(-1, weight.shape[-1])


def regrouped_gdn_specs(config: M2RNNConfig, prefix: str) -> dict[str, TensorSpec]:
    specs = {}
    for i, mixer in enumerate(config.mixer_types):
        if mixer != "gated_deltanet":
            continue
        src, dst = f"{prefix}layers.{i}.linear_attn.", f"model.layers.{i}.mixer."
        qkvz, ba = src + "in_proj_qkvz.weight", src + "in_proj_ba.weight"
        specs[dst + "in_proj_qkv.weight"] = derived([qkvz], lambda w: split_qkvz(w, config)[0])
        specs[dst + "in_proj_z.weight"] = derived([qkvz], lambda w: split_qkvz(w, config)[1])
        specs[dst + "in_proj_b.weight"] = derived([ba], lambda w: split_ba(w, config)[0])
        specs[dst + "in_proj_a.weight"] = derived([ba], lambda w: split_ba(w, config)[1])
    return specs


def build_plan(folder: str | Path, raw: dict[str, Any], reader: CheckpointReader) -> ImportPlan:
    text = load_text_config(folder)
    prefix = "model."
    layers = range(text.num_hidden_layers)
    step = getattr(text, "decoder_sparse_step", 1) or 1
    listed = set(getattr(text, "mlp_only_layers", None) or [])
    moe = [text.num_experts > 0 and (i + 1) % step == 0 and i not in listed for i in layers]
    overrides: dict[str, Any] = dict(intermediate_size=text.intermediate_size)
    if any(moe):
        overrides.update(
            moe_overrides(text, bool(text.norm_topk_prob), mlp_only_layers=[i for i in layers if not moe[i]])
        )
    config = qwen_base_config(text, tied_embeddings(text, raw, reader, prefix), **overrides)
    return ImportPlan(config, renaming_plan(config, reader, prefix, regrouped_gdn_specs(config, prefix)), qwen_ignored(config))
