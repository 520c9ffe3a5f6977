"""Qwen3.5 dense (`qwen3_5` composite VLM checkpoints and `qwen3_5_text`), plus the Qwen helpers that
Qwen3.5-MoE and Qwen3-Next share.

Qwen names already are ours except the mixer (`linear_attn` / `self_attn` → `mixer`) and the prefix: text weights
sit under `model.language_model.` (VLM checkpoints, and what `Qwen3_5ForCausalLM.save_pretrained` writes) or
`model.`. Math: all block, final and qk norms are zero-centred `x̂·(1+w)` (→ `norm_zero_centered`), the GDN output
norm is plain `x̂·w` with `rms_norm_eps`, attention is gated (`q_proj` rows per head `[q_h | gate_h]`) with per-head
qk-norm and RoPE on the first `partial_rotary_factor·head_dim` dims. For text, M-RoPE's three position streams are
equal, so it is plain 1-D partial RoPE (`mrope_section` is dropped).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from m2rnn.configuration_m2rnn import M2RNNConfig
from .common import ImportPlan, TensorSpec, copy, default_rope, moe_expert_specs, require
from .io import CheckpointReader

MODEL_TYPES = ("qwen3_5", "qwen3_5_text")
TEXT_PREFIXES = ("model.language_model.", "model.")
IGNORED_PREFIXES = ("model.visual.", "mtp.", "model.mtp.")


def load_text_config(folder: str | Path) -> Any:
    """The transformers text config of a (possibly composite) checkpoint, with transformers' own defaults applied."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    return config.get_text_config()


def text_prefix(reader: CheckpointReader) -> str:
    """`model.language_model.` or `model.`, whichever holds the embeddings."""
    for prefix in TEXT_PREFIXES:
        if f"{prefix}embed_tokens.weight" in reader:
            return prefix
    return TEXT_PREFIXES[-1]  # the missing-tensor check names `model.embed_tokens.weight`


def tied_embeddings(text: Any, raw: dict[str, Any], reader: CheckpointReader, prefix: str) -> bool:
    """Tied as transformers loads it: the config asks for it and no different `lm_head.weight` is stored."""
    wants_tie = bool(getattr(text, "tie_word_embeddings", False) or raw.get("tie_word_embeddings", False))
    if not wants_tie or "lm_head.weight" not in reader:
        return wants_tie
    return torch.equal(reader.get("lm_head.weight"), reader.get(f"{prefix}embed_tokens.weight"))


def qwen_base_config(text: Any, tie: bool, **overrides: Any) -> M2RNNConfig:
    """Our config for the parts all Qwen GDN hybrids share (dense MLPs unless `overrides` add experts)."""
    require(text.hidden_act == "silu", "hidden_act", text.hidden_act, "only silu (MLP and conv activation) is supported")
    mixers = {"linear_attention": "gated_deltanet", "full_attention": "full_attention"}
    for i, layer_type in enumerate(text.layer_types):
        require(layer_type in mixers, f"layer_types[{i}]", layer_type, f"must be one of {sorted(mixers)}")
    kwargs = dict(
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        intermediate_size=getattr(text, "intermediate_size", None) or 1,
        num_hidden_layers=text.num_hidden_layers,
        mixer_types=[mixers[t] for t in text.layer_types],
        hidden_act="silu",
        rms_norm_eps=text.rms_norm_eps,
        max_position_embeddings=text.max_position_embeddings,
        tie_word_embeddings=tie,
        norm_zero_centered=True,
        linear_num_key_heads=text.linear_num_key_heads,
        linear_num_value_heads=text.linear_num_value_heads,
        linear_key_head_dim=text.linear_key_head_dim,
        linear_value_head_dim=text.linear_value_head_dim,
        linear_conv_kernel_dim=text.linear_conv_kernel_dim,
        num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
        rope_parameters=default_rope(text.rope_parameters),
        attention_output_gate=True,
        attention_qk_norm="per_head",
        attention_bias=bool(getattr(text, "attention_bias", False)),
        pad_token_id=text.pad_token_id,
        bos_token_id=text.bos_token_id,
        eos_token_id=text.eos_token_id,
    )
    kwargs.update(overrides)
    return M2RNNConfig(**kwargs)


def qwen_layer_source(config: M2RNNConfig, prefix: str, i: int) -> str:
    """The source prefix of layer i's mixer."""
    mixer = "linear_attn" if config.mixer_types[i] == "gated_deltanet" else "self_attn"
    return f"{prefix}layers.{i}.{mixer}."


def renaming_plan(
    config: M2RNNConfig, reader: CheckpointReader, prefix: str, overrides: dict[str, TensorSpec] | None = None
) -> dict[str, TensorSpec]:
    """One copy per output tensor, renamed Qwen-style (mixer → linear_attn/self_attn, model. → `prefix`),
    per-expert MoE tensors from either on-disk layout, then `overrides` (e.g. regrouped projections)."""
    from m2rnn.meta import expected_tensors

    specs: dict[str, TensorSpec] = {}
    for name in expected_tensors(config):
        if name == "lm_head.weight":
            specs[name] = copy(name)
            continue
        rest = name.removeprefix("model.")
        parts = rest.split(".")
        if parts[0] == "layers" and parts[2] == "mixer":
            specs[name] = copy(qwen_layer_source(config, prefix, int(parts[1])) + ".".join(parts[3:]))
        elif parts[0] == "layers" and parts[3] == "experts":
            continue  # added below, layer by layer
        else:
            specs[name] = copy(prefix + rest)
    for i in range(config.num_hidden_layers):
        if config.is_moe_layer(i):
            specs.update(
                moe_expert_specs(
                    reader, f"{prefix}layers.{i}.mlp.", f"model.layers.{i}.mlp.", config.num_experts,
                    config.moe_intermediate_size,
                )
            )
    specs.update(overrides or {})
    return specs


def qwen_ignored(config: M2RNNConfig) -> tuple[str, ...]:
    """Source prefixes we drop: vision tower, MTP head, and a stored `lm_head` equal to the tied embeddings."""
    return IGNORED_PREFIXES + (("lm_head.weight",) if config.tie_word_embeddings else ())


def build_plan(folder: str | Path, raw: dict[str, Any], reader: CheckpointReader) -> ImportPlan:
    text = load_text_config(folder)
    prefix = text_prefix(reader)
    config = qwen_base_config(text, tied_embeddings(text, raw, reader, prefix))
    return ImportPlan(config, renaming_plan(config, reader, prefix), qwen_ignored(config))


def load_reference(folder: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The source as transformers runs it (text-only causal LM), on the torch GDN path."""
    from .reference import load_transformers_causal_lm

    return load_transformers_causal_lm(folder, dtype)
