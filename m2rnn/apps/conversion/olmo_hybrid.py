"""OLMo-hybrid (`olmo_hybrid`, allenai Olmo-Hybrid-7B).

GDN layers: canonical GDN with separate `q/k/v/g/a/b/o_proj`, β = 2·sigmoid(b) when `linear_allow_neg_eigval`
(default True → our `linear_allow_neg_eigval`), gated output norm `o_norm` with eps fixed at 1e-5 (→
`linear_norm_eps=1e-5`), pre-norm blocks. On disk (what `save_pretrained` writes) the conv is three tensors
`{q,k,v}_conv1d` (concatenated into our `conv1d`) and the GDN block norms are `attention_layer_norm` /
`feedforward_layer_norm`; the in-memory names `conv1d` / `input_layernorm` / `post_attention_layernorm` are read
too.

Attention layers: ungated, qk RMSNorm over the whole projection (→ `attention_qk_norm="full"`), full RoPE or NoPE,
and post-norm blocks (→ `attention_block_norm="post"`): `h = x + post_attention_layernorm(attn(x))` (on disk
`feedforward_layer_norm`) becomes our `input_layernorm`, and `post_feedforward_layernorm` our
`post_attention_layernorm`. All norms are plain `x̂·w`. `head_dim = hidden_size / num_attention_heads`.

RoPE pitfall (docs/checkpoint-formats.md): a missing or null `rope_parameters` still means RoPE with
theta 10000; only an explicit null `rope_theta` means NoPE. The transformers config object is read, so we see
exactly what transformers runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from m2rnn.configuration_m2rnn import M2RNNConfig
from m2rnn.meta import expected_tensors

from .common import ImportPlan, TensorSpec, concat, copy, default_rope, require
from .io import CheckpointReader
from .qwen3_5 import load_reference, tied_embeddings

MODEL_TYPES = ("olmo_hybrid",)
GDN_NORM_EPS = 1e-5
__all__ = ["MODEL_TYPES", "build_plan", "load_reference"]


def convert_config(text: Any, tie: bool) -> M2RNNConfig:
    require(text.hidden_act == "silu", "hidden_act", text.hidden_act, "only silu (MLP and conv activation) is supported")
    mixers = {"linear_attention": "gated_deltanet", "full_attention": "full_attention"}
    for i, layer_type in enumerate(text.layer_types):
        require(layer_type in mixers, f"layer_types[{i}]", layer_type, f"must be one of {sorted(mixers)}")
    return M2RNNConfig(
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_hidden_layers,
        mixer_types=[mixers[t] for t in text.layer_types],
        hidden_act="silu",
        rms_norm_eps=text.rms_norm_eps,
        max_position_embeddings=text.max_position_embeddings,
        tie_word_embeddings=tie,
        linear_num_key_heads=text.linear_num_key_heads,
        linear_num_value_heads=text.linear_num_value_heads,
        linear_key_head_dim=text.linear_key_head_dim,
        linear_value_head_dim=text.linear_value_head_dim,
        linear_conv_kernel_dim=text.linear_conv_kernel_dim,
        linear_allow_neg_eigval=bool(text.linear_allow_neg_eigval),
        linear_norm_eps=GDN_NORM_EPS,
        num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
        rope_parameters=default_rope(text.rope_parameters),
        attention_output_gate=False,
        attention_qk_norm="full",
        attention_block_norm="post",
        attention_bias=bool(text.attention_bias),
        pad_token_id=text.pad_token_id,
        bos_token_id=text.bos_token_id,
        eos_token_id=text.eos_token_id,
    )


def _first_present(reader: CheckpointReader, *names: str) -> str:
    """The first of `names` the checkpoint holds (else the first, which the missing-tensor check then names)."""
    return next((name for name in names if name in reader), names[0])


def _gdn_specs(reader: CheckpointReader, src: str, dst: str) -> dict[str, TensorSpec]:
    attn = src + "linear_attn."
    conv = [attn + f"{x}_conv1d.weight" for x in "qkv"]
    return {
        dst + "input_layernorm.weight": copy(_first_present(reader, src + "attention_layer_norm.weight", src + "input_layernorm.weight")),
        dst + "post_attention_layernorm.weight": copy(
            _first_present(reader, src + "feedforward_layer_norm.weight", src + "post_attention_layernorm.weight")
        ),
        dst + "mixer.in_proj_qkv.weight": concat(attn + f"{x}_proj.weight" for x in "qkv"),
        dst + "mixer.in_proj_z.weight": copy(attn + "g_proj.weight"),
        dst + "mixer.in_proj_b.weight": copy(attn + "b_proj.weight"),
        dst + "mixer.in_proj_a.weight": copy(attn + "a_proj.weight"),
        dst + "mixer.conv1d.weight": copy(attn + "conv1d.weight") if attn + "conv1d.weight" in reader else concat(conv),
        dst + "mixer.A_log": copy(attn + "A_log"),
        dst + "mixer.dt_bias": copy(attn + "dt_bias"),
        dst + "mixer.norm.weight": copy(attn + "o_norm.weight"),
        dst + "mixer.out_proj.weight": copy(attn + "o_proj.weight"),
    }


def _attention_specs(reader: CheckpointReader, src: str, dst: str) -> dict[str, TensorSpec]:
    return {
        dst + "input_layernorm.weight": copy(
            _first_present(reader, src + "post_attention_layernorm.weight", src + "feedforward_layer_norm.weight")
        ),
        dst + "post_attention_layernorm.weight": copy(src + "post_feedforward_layernorm.weight"),
    }


def build_plan(folder: str | Path, raw: dict[str, Any], reader: CheckpointReader) -> ImportPlan:
    from transformers import AutoConfig

    text = AutoConfig.from_pretrained(folder)
    config = convert_config(text, tied_embeddings(text, raw, reader, "model."))
    specs: dict[str, TensorSpec] = {}
    for i, mixer in enumerate(config.mixer_types):
        src, dst = f"model.layers.{i}.", f"model.layers.{i}."
        specs.update(_gdn_specs(reader, src, dst) if mixer == "gated_deltanet" else _attention_specs(reader, src, dst))
    for name in expected_tensors(config):  # embeddings, final norm, lm_head, MLPs, attention projections/qk-norms
        if name not in specs:
            specs[name] = copy(name.replace(".mixer.", ".self_attn."))
    return ImportPlan(config, specs, ("lm_head.weight",) if config.tie_word_embeddings else ())
