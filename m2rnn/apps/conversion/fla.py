"""flash-linear-attention `gated_deltanet` (`GatedDeltaNetForCausalLM`), with its hybrid `attn` layers.

Read from config.json and the safetensors directly (fla need not be installed). GDN layers
(`model.layers.i.attn.*`): `in_proj_qkv = cat(q_proj, k_proj, v_proj)`, `conv1d = cat(q_conv1d, k_conv1d,
v_conv1d)`, `in_proj_z = g_proj`, `in_proj_a = a_proj`, `in_proj_b = b_proj`, `norm = o_norm` (plain w, eps
`norm_eps`), `out_proj = o_proj`; β doubled when `allow_neg_eigval`. DK = `head_dim`, DV = `head_dim·expand_v`.
Attention layers (listed in `attn`): plain pre-norm attention, `head_dim = hidden_size / attn.num_heads`, full
RoPE with `attn.rope_theta`, no gate, no qk-norm; `qkv_bias` maps to `attention_bias` with a zero `o_proj` bias.
Blocks: `attn_norm` → `input_layernorm`, `mlp_norm` → `post_attention_layernorm`, plain w; `model.embeddings` →
`model.embed_tokens`. Refused: `use_gate=False`, `use_short_conv=False`, a sigmoid output gate, AttnRes
(`attnres_block_size`), sliding-window or qk-normed attention, attention specs that differ between layers.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from m2rnn.configuration_m2rnn import M2RNNConfig
from .common import ImportPlan, TensorSpec, concat, copy, require
from .io import CheckpointReader, ConversionError

MODEL_TYPES = ("gated_deltanet",)
# fla's GatedDeltaNetConfig defaults, for keys an older config.json leaves out.
DEFAULTS = dict(
    hidden_size=2048, expand_v=2.0, use_gate=True, use_short_conv=True, allow_neg_eigval=False, conv_size=4,
    head_dim=256, num_heads=6, num_v_heads=None, max_position_embeddings=2048, hidden_ratio=4, intermediate_size=None,
    hidden_act="swish", num_hidden_layers=21, norm_eps=1e-6, attn=None, pad_token_id=None, bos_token_id=1,
    eos_token_id=2, tie_word_embeddings=False, vocab_size=32000, attnres_block_size=None,
    output_gate_activation="swish",
)
ATTENTION_DEFAULTS = dict(num_kv_heads=None, qkv_bias=False, qk_norm=False, window_size=None, rope_theta=10000.0)


def _attention_spec(raw_attn: Any, num_layers: int) -> tuple[list[int], dict[str, Any]]:
    """(attention layer indices, the one shared attention spec) from fla's `attn` (dict or list of dicts)."""
    if raw_attn is None:
        return [], {}
    specs = [raw_attn] if isinstance(raw_attn, dict) else list(raw_attn)
    layers: list[int] = []
    shared: dict[str, Any] | None = None
    for spec in specs:
        settings = {**ATTENTION_DEFAULTS, **{k: v for k, v in spec.items() if k != "layers"}}
        settings["num_kv_heads"] = settings["num_kv_heads"] or settings["num_heads"]
        if shared is not None and settings != shared:
            raise ConversionError(f"source config `attn`: specs differ ({shared} vs {settings}); one attention shape is supported")
        shared = settings
        layers += list(spec["layers"])
    for i in layers:
        require(0 <= i < num_layers, "attn.layers", layers, f"indices must be in 0..{num_layers - 1}")
    require(shared["window_size"] is None, "attn.window_size", shared["window_size"], "sliding-window attention is not supported")
    require(not shared["qk_norm"], "attn.qk_norm", shared["qk_norm"], "fla's qk-norm (eps 1e-5 per head) is not supported")
    require(shared["rope_theta"] is not None, "attn.rope_theta", None, "fla attention without RoPE is not supported")
    return layers, shared


def convert_config(raw: dict[str, Any]) -> M2RNNConfig:
    c = {**DEFAULTS, **raw}
    require(c["attnres_block_size"] is None, "attnres_block_size", c["attnres_block_size"], "AttnRes residuals are not supported")
    require(c["use_gate"], "use_gate", c["use_gate"], "GDN without an output gate is not supported")
    require(c["use_short_conv"], "use_short_conv", c["use_short_conv"], "GDN without the short convolution is not supported")
    require(c["output_gate_activation"] in ("swish", "silu"), "output_gate_activation", c["output_gate_activation"],
            "only a swish/silu output gate is supported")
    require(c["hidden_act"] in ("swish", "silu"), "hidden_act", c["hidden_act"], "only swish/silu MLPs are supported")
    hidden, layers = c["hidden_size"], c["num_hidden_layers"]
    intermediate = c["intermediate_size"]
    if intermediate is None:  # fla's GatedMLP rule: 2/3 · hidden · ratio, rounded up to a multiple of 256
        intermediate = 256 * ((int(hidden * c["hidden_ratio"] * 2 / 3) + 255) // 256)
    attention_layers, attention = _attention_spec(c["attn"], layers)
    attention_heads = attention.get("num_heads", 1)
    return M2RNNConfig(
        vocab_size=c["vocab_size"],
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        mixer_types=["full_attention" if i in attention_layers else "gated_deltanet" for i in range(layers)],
        hidden_act="silu",
        rms_norm_eps=c["norm_eps"],
        max_position_embeddings=c["max_position_embeddings"],
        tie_word_embeddings=c["tie_word_embeddings"],
        linear_num_key_heads=c["num_heads"],
        linear_num_value_heads=c["num_v_heads"] or c["num_heads"],
        linear_key_head_dim=c["head_dim"],
        linear_value_head_dim=int(c["head_dim"] * c["expand_v"]),
        linear_conv_kernel_dim=c["conv_size"],
        linear_allow_neg_eigval=bool(c["allow_neg_eigval"]),
        num_attention_heads=attention_heads,
        num_key_value_heads=attention.get("num_kv_heads", 1),
        head_dim=hidden // attention_heads,
        rope_parameters={"rope_theta": float(attention["rope_theta"])} if attention else None,
        attention_bias=bool(attention.get("qkv_bias", False)),
        pad_token_id=c["pad_token_id"],
        bos_token_id=c["bos_token_id"],
        eos_token_id=c["eos_token_id"],
    )


def _gdn_specs(src: str, dst: str) -> dict[str, TensorSpec]:
    return {
        dst + "in_proj_qkv.weight": concat(src + f"{x}_proj.weight" for x in "qkv"),
        dst + "in_proj_z.weight": copy(src + "g_proj.weight"),
        dst + "in_proj_b.weight": copy(src + "b_proj.weight"),
        dst + "in_proj_a.weight": copy(src + "a_proj.weight"),
        dst + "conv1d.weight": concat(src + f"{x}_conv1d.weight" for x in "qkv"),
        dst + "A_log": copy(src + "A_log"),
        dst + "dt_bias": copy(src + "dt_bias"),
        dst + "norm.weight": copy(src + "o_norm.weight"),
        dst + "out_proj.weight": copy(src + "o_proj.weight"),
    }


def _attention_specs(src: str, dst: str, bias: bool, hidden_size: int) -> dict[str, TensorSpec]:
    specs = {dst + f"{x}_proj.weight": copy(src + f"{x}_proj.weight") for x in "qkvo"}
    if bias:  # fla has q/k/v biases only; ours also has an o_proj bias, set to zero
        specs.update({dst + f"{x}_proj.bias": copy(src + f"{x}_proj.bias") for x in "qkv"})
        specs[dst + "o_proj.bias"] = TensorSpec((), lambda get: torch.zeros(hidden_size))
    return specs


def build_plan(folder: str | Path, raw: dict[str, Any], reader: CheckpointReader) -> ImportPlan:
    config = convert_config(raw)
    specs: dict[str, TensorSpec] = {
        "model.embed_tokens.weight": copy("model.embeddings.weight"),
        "model.norm.weight": copy("model.norm.weight"),
    }
    if not config.tie_word_embeddings:
        specs["lm_head.weight"] = copy("lm_head.weight")
    for i, mixer in enumerate(config.mixer_types):
        src, dst = f"model.layers.{i}.", f"model.layers.{i}."
        specs[dst + "input_layernorm.weight"] = copy(src + "attn_norm.weight")
        specs[dst + "post_attention_layernorm.weight"] = copy(src + "mlp_norm.weight")
        specs.update({dst + f"mlp.{p}.weight": copy(src + f"mlp.{p}.weight") for p in ("gate_proj", "up_proj", "down_proj")})
        if mixer == "gated_deltanet":
            specs.update(_gdn_specs(src + "attn.", dst + "mixer."))
        else:
            specs.update(_attention_specs(src + "attn.", dst + "mixer.", config.attention_bias, config.hidden_size))
    return ImportPlan(config, specs, ("lm_head.weight",) if config.tie_word_embeddings else ())


def reference_unavailable() -> str | None:
    """Why fla's own model cannot run here for `--verify` (None when it can)."""
    if importlib.util.find_spec("fla") is None:
        return "needs flash-linear-attention (`pip install flash-linear-attention`) to run the source model"
    if not torch.cuda.is_available():
        return (
            "fla's model needs a GPU (its Triton kernels do not run on CPU; attention layers also need flash-attn); "
            "convert without --verify here (conversion itself needs no GPU) and verify on a GPU machine"
        )
    return None


def load_reference(folder: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """fla's own model (needs fla and a GPU; attention layers need flash-attn), on the GPU."""
    problem = reference_unavailable()
    if problem:
        raise ConversionError(f"--verify: {problem}")
    import fla  # noqa: F401  (registers fla's Auto classes)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval().cuda()
