"""lm-engine `gpt_base` with `gated_deltanet` and `softmax_attention` sequence-mixer blocks (native checkpoints).

Read from config.json and the safetensors directly. Mapping (docs/checkpoint-formats.md):
- `transformer.wte` → `model.embed_tokens`, `transformer.ln_f` → `model.norm`, `transformer.h.{i}.ln_1`/`ln_2` →
  `input_layernorm`/`post_attention_layernorm` (plain w, eps `layer_norm_epsilon`);
- MLP `c_fc [2I, H]` holds gate and up rows interleaved (even rows gate, odd rows up) → `gate_proj`, `up_proj`;
  `c_proj` → `down_proj`;
- GDN: `qkv_proj` → `in_proj_qkv`; `ab_proj` rows `[a (NV) | b (NV) | gate (value_dim)]` → `in_proj_a`,
  `in_proj_b`, `in_proj_z`; `decay_gate.{A_log,dt_bias}`; `qkv_conv1d` → `conv1d`; `o_norm` → `norm`; `o_proj` →
  `out_proj`. lm-engine applies the gate *before* the output norm (→ `linear_gate_before_norm`), β doubled with
  `allow_neg_eigval`;
- attention: `c_attn` rows grouped per KV head g: `[q of the group's heads | k_g | v_g | gates of the group's
  heads]` → `q_proj` (per head `[q_h | gate_h]` when `attention_gate`), `k_proj`, `v_proj`; `c_proj` → `o_proj`.
  lm-engine puts RoPE on the *last* `rope_dim` dims of each head; the q and k rows of every head are permuted so
  that those dims come first (exact: q·k is unchanged by a shared permutation), giving our RoPE on the first dims.
Refused: µP multipliers (`m_emb`, `m_residual`, `m_width`), `attention_multiplier`, RoPE scaling, learned
position embeddings, biases, sliding windows, MoE MLP blocks, non-RMSNorm norms, blocks whose shapes differ
between layers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from m2rnn.configuration_m2rnn import M2RNNConfig
from .common import ImportPlan, TensorSpec, copy, derived, require
from .io import CheckpointReader, ConversionError

MODEL_TYPES = ("gpt_base",)
GDN_KEYS = ("k_head_dim", "v_head_dim", "num_k_heads", "num_v_heads", "allow_neg_eigval", "kernel_size")
ATTENTION_KEYS = ("num_attention_heads", "num_key_value_heads", "head_dim", "attention_gate")


def _shared(blocks: list[dict[str, Any]], keys: tuple[str, ...], kind: str) -> dict[str, Any]:
    """The settings every block of one kind shares (refusing blocks that differ)."""
    settings = [{k: b.get(k) for k in keys} for b in blocks]
    for i, s in enumerate(settings):
        if s != settings[0]:
            raise ConversionError(f"source config `sequence_mixer_blocks`: {kind} blocks differ ({settings[0]} vs {s})")
    return settings[0] if settings else {}


def convert_config(raw: dict[str, Any]) -> tuple[M2RNNConfig, int]:
    """Our config and lm-engine's `rope_dim` (0 for NoPE)."""
    for key in ("m_emb", "m_residual", "m_width"):
        require(raw.get(key) in (None, 1, 1.0), key, raw.get(key), "µP multipliers are not supported")
    require(raw.get("normalization_function", "rmsnorm") == "rmsnorm", "normalization_function",
            raw.get("normalization_function"), "only rmsnorm is supported")
    position = raw.get("position_embedding_type", "nope")
    require(position in ("rope", "nope"), "position_embedding_type", position, "must be 'rope' or 'nope'")
    require(not raw.get("rope_scaling"), "rope_scaling", raw.get("rope_scaling"), "RoPE scaling is not supported")
    layers, hidden = raw["num_layers"], raw["hidden_size"]
    mixers, mlps = raw["sequence_mixer_blocks"], raw["mlp_blocks"]
    require(len(mixers) == layers and len(mlps) == layers, "sequence_mixer_blocks", len(mixers), f"needs {layers} entries")
    kinds = {"gated_deltanet": "gated_deltanet", "softmax_attention": "full_attention"}
    for i, block in enumerate(mixers):
        kind = block.get("sequence_mixer_type")
        require(kind in kinds, f"sequence_mixer_blocks[{i}].sequence_mixer_type", kind, f"must be one of {sorted(kinds)}")
        require(block.get("attention_multiplier") is None, f"sequence_mixer_blocks[{i}].attention_multiplier",
                block.get("attention_multiplier"), "only the default head_dim**-0.5 scale is supported")
        for key in ("add_bias", "sliding_window", "exclusive_self_attention"):
            require(not block.get(key), f"sequence_mixer_blocks[{i}].{key}", block.get(key), "is not supported")
        if kind == "gated_deltanet":
            require(block.get("use_gate", True), f"sequence_mixer_blocks[{i}].use_gate", False, "GDN needs its gate")
    for i, block in enumerate(mlps):
        require(block.get("mlp_type", "MLP") == "MLP", f"mlp_blocks[{i}].mlp_type", block.get("mlp_type"),
                "only dense MLP blocks are supported (MoE blocks are not yet)")
        require(block.get("activation_function") in ("swiglu",), f"mlp_blocks[{i}].activation_function",
                block.get("activation_function"), "only swiglu is supported")
        require(not block.get("add_bias"), f"mlp_blocks[{i}].add_bias", block.get("add_bias"), "is not supported")
    gdn = _shared([b for b in mixers if b["sequence_mixer_type"] == "gated_deltanet"], GDN_KEYS, "gated_deltanet")
    attention = _shared([b for b in mixers if b["sequence_mixer_type"] == "softmax_attention"], ATTENTION_KEYS, "attention")
    intermediate = _shared(mlps, ("intermediate_size",), "MLP")["intermediate_size"]
    heads = attention.get("num_attention_heads") or 1
    head_dim = attention.get("head_dim") or hidden // heads
    rope_dim = raw.get("rope_dim") or head_dim if position == "rope" and attention else 0
    rope = None
    if rope_dim:
        factor = rope_dim / head_dim
        require(int(head_dim * factor) == rope_dim, "rope_dim", rope_dim, f"not representable for head_dim={head_dim}")
        rope = {"rope_theta": float(raw.get("rope_theta", 10000.0)), "partial_rotary_factor": factor}
    config = M2RNNConfig(
        vocab_size=raw["vocab_size"],
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        mixer_types=[kinds[b["sequence_mixer_type"]] for b in mixers],
        hidden_act="silu",
        rms_norm_eps=raw.get("layer_norm_epsilon", 1e-5),
        max_position_embeddings=raw.get("max_position_embeddings", 4096),
        tie_word_embeddings=raw.get("tie_word_embeddings", True),
        linear_num_key_heads=gdn.get("num_k_heads") or 1,
        linear_num_value_heads=gdn.get("num_v_heads") or 1,
        linear_key_head_dim=gdn.get("k_head_dim") or 1,
        linear_value_head_dim=gdn.get("v_head_dim") or 1,
        linear_conv_kernel_dim=gdn.get("kernel_size") or 4,
        linear_allow_neg_eigval=bool(gdn.get("allow_neg_eigval")),
        linear_gate_before_norm=True,
        num_attention_heads=heads,
        num_key_value_heads=attention.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rope_parameters=rope,
        attention_output_gate=bool(attention.get("attention_gate")),
        pad_token_id=raw.get("pad_token_id"),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=raw.get("eos_token_id"),
    )
    return config, rope_dim


def _rope_first(rows: torch.Tensor, head_dim: int, rope_dim: int) -> torch.Tensor:
    """Per head, move the last `rope_dim` rows (lm-engine's rotary dims) to the front."""
    if not rope_dim:
        return rows
    heads = rows.reshape(-1, head_dim, rows.shape[-1])
    return torch.cat([heads[:, head_dim - rope_dim :], heads[:, : head_dim - rope_dim]], dim=1).reshape(rows.shape)


def split_c_attn(weight: torch.Tensor, config: M2RNNConfig, rope_dim: int) -> dict[str, torch.Tensor]:
    """Grouped `c_attn` → our `q_proj` (with per-head gates), `k_proj`, `v_proj`."""
    kv_heads, head_dim = config.num_key_value_heads, config.head_dim
    group = config.num_attention_heads // kv_heads
    gate = group * head_dim if config.attention_output_gate else 0
    parts = weight.reshape(kv_heads, group * head_dim + 2 * head_dim + gate, -1)
    q, k, v, g = parts.split([group * head_dim, head_dim, head_dim, gate], dim=1)
    flat = weight.shape[-1]
    q = _rope_first(q.reshape(-1, flat), head_dim, rope_dim)
    if gate:  # our q_proj rows per head: [q_h | gate_h]
        q = torch.cat([q.reshape(-1, head_dim, flat), g.reshape(-1, head_dim, flat)], dim=1).reshape(-1, flat)
    return {"q_proj.weight": q, "k_proj.weight": _rope_first(k.reshape(-1, flat), head_dim, rope_dim),
            "v_proj.weight": v.reshape(-1, flat)}


def _gdn_specs(config: M2RNNConfig, src: str, dst: str) -> dict[str, TensorSpec]:
    heads, value_total = config.linear_num_value_heads, config.linear_num_value_heads * config.linear_value_head_dim
    ab = src + "ab_proj.weight"
    return {
        dst + "in_proj_qkv.weight": copy(src + "qkv_proj.weight"),
        dst + "in_proj_a.weight": derived([ab], lambda w: w[:heads]),
        dst + "in_proj_b.weight": derived([ab], lambda w: w[heads : 2 * heads]),
        dst + "in_proj_z.weight": derived([ab], lambda w: w[2 * heads : 2 * heads + value_total]),
        dst + "conv1d.weight": copy(src + "qkv_conv1d.weight"),
        dst + "A_log": copy(src + "decay_gate.A_log"),
        dst + "dt_bias": copy(src + "decay_gate.dt_bias"),
        dst + "norm.weight": copy(src + "o_norm.weight"),
        dst + "out_proj.weight": copy(src + "o_proj.weight"),
    }


def build_plan(folder: str | Path, raw: dict[str, Any], reader: CheckpointReader) -> ImportPlan:
    config, rope_dim = convert_config(raw)
    specs: dict[str, TensorSpec] = {
        "model.embed_tokens.weight": copy("transformer.wte.weight"),
        "model.norm.weight": copy("transformer.ln_f.weight"),
    }
    if not config.tie_word_embeddings:
        specs["lm_head.weight"] = copy("lm_head.weight")
    for i, mixer in enumerate(config.mixer_types):
        src, dst = f"transformer.h.{i}.", f"model.layers.{i}."
        specs[dst + "input_layernorm.weight"] = copy(src + "ln_1.weight")
        specs[dst + "post_attention_layernorm.weight"] = copy(src + "ln_2.weight")
        c_fc = src + "mlp_block.c_fc.weight"
        specs[dst + "mlp.gate_proj.weight"] = derived([c_fc], lambda w: w[0::2])
        specs[dst + "mlp.up_proj.weight"] = derived([c_fc], lambda w: w[1::2])
        specs[dst + "mlp.down_proj.weight"] = copy(src + "mlp_block.c_proj.weight")
        mixer_src = src + "sequence_mixer."
        if mixer == "gated_deltanet":
            specs.update(_gdn_specs(config, mixer_src, dst + "mixer."))
            continue
        c_attn = mixer_src + "c_attn.weight"
        for name in ("q_proj.weight", "k_proj.weight", "v_proj.weight"):
            specs[dst + "mixer." + name] = derived([c_attn], lambda w, name=name: split_c_attn(w, config, rope_dim)[name])
        specs[dst + "mixer.o_proj.weight"] = copy(mixer_src + "c_proj.weight")
    return ImportPlan(config, specs, ("lm_head.weight",) if config.tie_word_embeddings else ())


def reference_unavailable() -> str:
    """`--verify` needs the source in its own library; lm-engine's is not a transformers model."""
    return "not available for lm-engine checkpoints: lm-engine has no transformers model class to compare with"


def load_reference(folder: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    raise ConversionError(f"--verify is {reference_unavailable()}")
