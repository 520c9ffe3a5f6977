"""Conversion of GDN-hybrid checkpoints into the M2RNN family: exact logits per family, swaps, CLI, refusals.

Each test builds a tiny random checkpoint in a tmp dir and compares our converted model with a reference:
- qwen3_5 (text, composite VLM, `model.` prefix), qwen3_5_moe, qwen3_next, olmo_hybrid: the source model itself,
  run by transformers on its torch GDN path (fla's kernels would fail on CPU, see `reference.torch_gdn_path`);
- fla: fla's models cannot run here, so the checkpoints are hand-written in fla's on-disk format by inverse-mapping
  a transformers reference: a pure-GDN Qwen3.5 (block norms shifted by +1, since Qwen computes x̂(1+w)), and a
  Qwen3.5 hybrid with full RoPE whose gated attention is replaced by transformers' `LlamaAttention` (plain
  attention, the math of fla's `Attention`).
fp32 throughout; logits must agree to a relative error of 1e-4 (max |Δ| / max |reference|), for a full forward
and for a cached prefill followed by token-by-token decoding.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import m2rnn  # noqa: F401  (registers the Auto classes)
from m2rnn import M2RNNForCausalLM
from m2rnn.apps.conversion import ConversionError, convert_checkpoint, import_checkpoint, swap_layers
from m2rnn.apps.conversion.reference import torch_gdn_path
from m2rnn.apps.output import OutputError

VOCAB = 96
GDN = dict(
    linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=16, linear_num_key_heads=2,
    linear_num_value_heads=4,
)
BASE = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    layer_types=["linear_attention"] * 3 + ["full_attention"], rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1,
    **GDN,
)
QWEN_ROPE = {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25, "mrope_section": [1, 1, 0],
             "mrope_interleaved": True}
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16)


def seeded(factory, *args, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    model = factory(*args, **kwargs).eval()
    with torch.no_grad():  # move every norm off its init so that a wrong (1 + w) convention shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def random_ids(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@torch.no_grad()
def assert_same_logits(ours: M2RNNForCausalLM, reference_logits: torch.Tensor, ids: torch.Tensor) -> None:
    """Full forward and cached prefill + token-by-token decode both match the reference's full forward."""
    assert relative_error(ours(ids, use_cache=False).logits, reference_logits) <= 1e-4
    prefill = ids.shape[1] - 4
    out = ours(ids[:, :prefill], use_cache=True)
    steps, cache = [out.logits], out.past_key_values
    for t in range(prefill, ids.shape[1]):
        out = ours(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
        steps.append(out.logits)
        cache = out.past_key_values
    assert relative_error(torch.cat(steps, 1), reference_logits) <= 1e-4


@torch.no_grad()
def reference_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch_gdn_path():
        return model(input_ids=ids, use_cache=False).logits


def convert_and_load(src: Path, tmp_path: Path, **kwargs) -> M2RNNForCausalLM:
    out = tmp_path / "converted"
    convert_checkpoint(src, out, progress=False, **kwargs)
    return AutoModelForCausalLM.from_pretrained(out).eval()


def folder_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


# ---------------------------------------------------------------------------------------------------------------
# Source checkpoints
# ---------------------------------------------------------------------------------------------------------------
def qwen3_5_text(tie: bool = True, layer_types=None, rope=QWEN_ROPE, num_key_value_heads: int = 2, head_dim: int = 16):
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    kwargs = dict(BASE, num_key_value_heads=num_key_value_heads)
    if layer_types is not None:
        kwargs.update(layer_types=layer_types, num_hidden_layers=len(layer_types))
    config = Qwen3_5TextConfig(
        **kwargs, head_dim=head_dim, intermediate_size=48, rope_parameters=rope, tie_word_embeddings=tie
    )
    return seeded(Qwen3_5ForCausalLM, config)


@pytest.fixture(scope="module")
def qwen3_5_dir(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """Tied text-only Qwen3.5 (transformers 5.23 saves it with the `model.` prefix), sharded, with tokenizer files."""
    model = qwen3_5_text(tie=True)
    folder = tmp_path_factory.mktemp("qwen3_5")
    model.save_pretrained(folder, max_shard_size="40KB")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    return folder, model


def test_qwen3_5_text_sharded_tied(qwen3_5_dir, tmp_path):
    src, model = qwen3_5_dir
    assert (src / "model.safetensors.index.json").exists()
    before = folder_digest(src)
    ids = random_ids()
    ours = convert_and_load(src, tmp_path, max_shard_size=30_000)
    assert ours.config.tie_word_embeddings and ours.lm_head.weight is ours.model.embed_tokens.weight
    assert ours.config.norm_zero_centered and ours.config.attention_qk_norm == "per_head"
    assert_same_logits(ours, reference_logits(model, ids), ids)
    out = tmp_path / "converted"
    assert (out / "model.safetensors.index.json").exists() and (out / "tokenizer_config.json").exists()
    assert (out / "generation_config.json").exists()
    assert folder_digest(src) == before  # the source is only read


def test_qwen3_5_vlm_composite_untied(tmp_path):
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    text = qwen3_5_text(tie=False).config.to_dict()
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16)
    config = Qwen3_5Config(text_config=text, vision_config=vision, image_token_id=90, video_token_id=91,
                           vision_start_token_id=92, vision_end_token_id=93)
    vlm = seeded(Qwen3_5ForConditionalGeneration, config)
    vlm.save_pretrained(tmp_path / "vlm")
    ids = random_ids()
    ours = import_checkpoint(tmp_path / "vlm")
    assert not ours.config.tie_word_embeddings
    assert_same_logits(ours, reference_logits(vlm, ids), ids)


def test_qwen3_5_text_with_language_model_prefix_no_gqa(tmp_path):
    """A `qwen3_5_text` checkpoint whose keys carry the VLM's `model.language_model.` prefix; no GQA."""
    model = qwen3_5_text(tie=False, num_key_value_heads=4)
    (tmp_path / "src").mkdir()
    state = {k.replace("model.", "model.language_model.", 1): v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, tmp_path / "src" / "model.safetensors")
    model.config.save_pretrained(tmp_path / "src")
    ids = random_ids()
    assert_same_logits(import_checkpoint(tmp_path / "src"), reference_logits(model, ids), ids)


def test_qwen3_5_moe(tmp_path):
    from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

    config = Qwen3_5MoeTextConfig(**BASE, head_dim=16, rope_parameters=QWEN_ROPE, **MOE)
    model = seeded(Qwen3_5MoeForCausalLM, config)
    model.save_pretrained(tmp_path / "src")
    keys = load_file(next((tmp_path / "src").glob("*.safetensors"))).keys()
    assert any(".experts.3.down_proj" in k for k in keys)  # per-expert tensors on disk
    ids = random_ids()
    ours = convert_and_load(tmp_path / "src", tmp_path)
    assert all(ours.config.is_moe_layer(i) for i in range(4)) and ours.config.shared_expert_gated
    assert_same_logits(ours, reference_logits(model, ids), ids)


def test_qwen3_next_moe_dense_mix(tmp_path):
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    config = Qwen3NextConfig(
        **BASE, head_dim=16, intermediate_size=48, decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25}, **MOE,
    )
    model = seeded(Qwen3NextForCausalLM, config)
    model.save_pretrained(tmp_path / "src")
    ids = random_ids()
    ours = convert_and_load(tmp_path / "src", tmp_path)
    assert ours.config.mlp_only_layers == [1]
    assert_same_logits(ours, reference_logits(model, ids), ids)


@pytest.mark.parametrize("nope", [False, True], ids=["rope", "nope"])
def test_olmo_hybrid(tmp_path, nope):
    from transformers import OlmoHybridConfig, OlmoHybridForCausalLM

    base = {k: v for k, v in BASE.items()}
    rope = {"rope_type": "default", "rope_theta": None} if nope else None  # None alone still means RoPE (§2(e))
    config = OlmoHybridConfig(**base, intermediate_size=48, linear_allow_neg_eigval=True, rope_parameters=rope)
    model = seeded(OlmoHybridForCausalLM, config)
    model.save_pretrained(tmp_path / "src")
    keys = load_file(tmp_path / "src" / "model.safetensors").keys()
    assert "model.layers.0.linear_attn.q_conv1d.weight" in keys  # OLMo's on-disk names
    ids = random_ids()
    ours = convert_and_load(tmp_path / "src", tmp_path)
    assert (ours.config.rope_parameters is None) == nope
    assert ours.config.attention_block_norm == "post" and ours.config.attention_qk_norm == "full"
    assert_same_logits(ours, reference_logits(model, ids), ids)


def test_nope_survives_save_and_reload(tmp_path):
    """`rope_parameters=None` means NoPE; transformers' config base class would otherwise default it to RoPE."""
    from m2rnn import M2RNNConfig

    config = M2RNNConfig.from_preset("tiny", rope_parameters=None)
    assert config.rope_parameters is None
    config.save_pretrained(tmp_path)
    assert M2RNNConfig.from_pretrained(tmp_path).rope_parameters is None


# ---------------------------------------------------------------------------------------------------------------
# fla: hand-written checkpoints from transformers references
# ---------------------------------------------------------------------------------------------------------------
def write_fla_checkpoint(folder: Path, reference: torch.nn.Module, attention_layers: list[int], tie: bool) -> None:
    """fla's on-disk format for a Qwen3.5 reference (whose attention layers hold a `LlamaAttention`)."""
    text = reference.config
    key_dim = text.linear_num_key_heads * text.linear_key_head_dim
    state = {k.replace("model.", "", 1): v for k, v in reference.state_dict().items() if k.startswith("model.")}
    out = {"model.embeddings.weight": state["embed_tokens.weight"], "model.norm.weight": state["norm.weight"] + 1}
    if not tie:
        out["lm_head.weight"] = reference.lm_head.weight
    for i in range(text.num_hidden_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        out[dst + "attn_norm.weight"] = state[src + "input_layernorm.weight"] + 1
        out[dst + "mlp_norm.weight"] = state[src + "post_attention_layernorm.weight"] + 1
        for p in ("gate_proj", "up_proj", "down_proj"):
            out[dst + f"mlp.{p}.weight"] = state[src + f"mlp.{p}.weight"]
        if i in attention_layers:
            for p in "qkvo":
                out[dst + f"attn.{p}_proj.weight"] = state[src + f"self_attn.{p}_proj.weight"]
            continue
        gdn = src + "linear_attn."
        for name, rows in (("in_proj_qkv.weight", "proj.weight"), ("conv1d.weight", "conv1d.weight")):
            q, k, v = state[gdn + name].split([key_dim, key_dim, state[gdn + name].shape[0] - 2 * key_dim])
            out.update({dst + f"attn.q_{rows}": q, dst + f"attn.k_{rows}": k, dst + f"attn.v_{rows}": v})
        for ours, fla in (("in_proj_z", "g_proj"), ("in_proj_a", "a_proj"), ("in_proj_b", "b_proj"), ("out_proj", "o_proj")):
            out[dst + f"attn.{fla}.weight"] = state[gdn + f"{ours}.weight"]
        out[dst + "attn.o_norm.weight"] = state[gdn + "norm.weight"]
        out[dst + "attn.A_log"], out[dst + "attn.dt_bias"] = state[gdn + "A_log"], state[gdn + "dt_bias"]
    folder.mkdir()
    save_file({k: v.detach().contiguous() for k, v in out.items()}, folder / "model.safetensors")
    attn = {"layers": attention_layers, "num_heads": text.num_attention_heads, "num_kv_heads": text.num_key_value_heads,
            "qkv_bias": False, "window_size": None, "rope_theta": 1e4} if attention_layers else None
    config = dict(
        model_type="gated_deltanet", architectures=["GatedDeltaNetForCausalLM"], hidden_size=text.hidden_size,
        num_hidden_layers=text.num_hidden_layers, num_heads=text.linear_num_key_heads,
        num_v_heads=text.linear_num_value_heads, head_dim=text.linear_key_head_dim,
        expand_v=text.linear_value_head_dim / text.linear_key_head_dim, conv_size=4, intermediate_size=48,
        hidden_act="swish", norm_eps=text.rms_norm_eps, vocab_size=VOCAB, tie_word_embeddings=tie, attn=attn,
        use_gate=True, use_short_conv=True, allow_neg_eigval=False, fuse_norm=True, attn_mode="chunk",
    )
    (folder / "config.json").write_text(json.dumps(config))


def test_fla_pure_gdn_tied(tmp_path):
    """Reference: a pure-GDN Qwen3.5 (no cache: transformers cannot size a cache without attention layers)."""
    reference = qwen3_5_text(tie=True, layer_types=["linear_attention"] * 3)
    write_fla_checkpoint(tmp_path / "fla", reference, [], tie=True)
    ids = random_ids()
    ours = convert_and_load(tmp_path / "fla", tmp_path)
    assert ours.config.mixer_types == ["gated_deltanet"] * 3 and not ours.config.norm_zero_centered
    assert_same_logits(ours, reference_logits(reference, ids), ids)


def test_fla_hybrid_with_attention(tmp_path):
    """Reference: Qwen3.5 with full RoPE whose attention layer is replaced by `LlamaAttention` (fla's math)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention

    rope = dict(QWEN_ROPE, partial_rotary_factor=1.0, mrope_section=[2, 1, 1])
    reference = qwen3_5_text(tie=False, rope=rope, head_dim=8)  # fla attention: head_dim = hidden / heads
    llama = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, attention_bias=False)
    llama._attn_implementation = reference.config._attn_implementation
    torch.manual_seed(3)
    reference.model.layers[3].self_attn = LlamaAttention(llama, layer_idx=3).eval()
    write_fla_checkpoint(tmp_path / "fla", reference, [3], tie=False)
    ids = random_ids()
    ours = convert_and_load(tmp_path / "fla", tmp_path)
    assert ours.config.mixer_types[3] == "full_attention" and ours.config.head_dim == 8
    assert_same_logits(ours, reference_logits(reference, ids), ids)


# ---------------------------------------------------------------------------------------------------------------
# lm-engine: a hand-written checkpoint from a patched transformers reference
# ---------------------------------------------------------------------------------------------------------------
class GateBeforeNorm(torch.nn.Module):
    """lm-engine's GDN output: RMSNorm(o ⊙ SiLU(z)) · w (replaces Qwen3.5's RMSNorm(o) · w ⊙ SiLU(z))."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight, self.eps = torch.nn.Parameter(weight.detach().clone()), eps

    def forward(self, hidden_states: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        x = hidden_states * torch.nn.functional.silu(gate)
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def write_lm_engine_checkpoint(folder: Path, reference: torch.nn.Module, rope_dim: int) -> None:
    """lm-engine's native `gpt_base` format for a Qwen3.5 reference without qk-norm and with gate-first GDN norms."""
    text = reference.config
    heads, kv_heads, head_dim = text.num_attention_heads, text.num_key_value_heads, text.head_dim
    state = reference.state_dict()
    out = {"transformer.wte.weight": state["model.embed_tokens.weight"], "transformer.ln_f.weight": state["model.norm.weight"] + 1,
           "lm_head.weight": state["lm_head.weight"]}

    def rope_last(rows: torch.Tensor) -> torch.Tensor:  # per head: Qwen's first rope_dim dims → lm-engine's last
        per_head = rows.reshape(-1, head_dim, rows.shape[-1])
        return torch.cat([per_head[:, rope_dim:], per_head[:, :rope_dim]], 1)

    for i, layer_type in enumerate(text.layer_types):
        src, dst = f"model.layers.{i}.", f"transformer.h.{i}."
        out[dst + "ln_1.weight"] = state[src + "input_layernorm.weight"] + 1
        out[dst + "ln_2.weight"] = state[src + "post_attention_layernorm.weight"] + 1
        gate, up = state[src + "mlp.gate_proj.weight"], state[src + "mlp.up_proj.weight"]
        out[dst + "mlp_block.c_fc.weight"] = torch.stack([gate, up], 1).reshape(-1, gate.shape[-1])  # interleaved
        out[dst + "mlp_block.c_proj.weight"] = state[src + "mlp.down_proj.weight"]
        mixer = dst + "sequence_mixer."
        if layer_type == "full_attention":
            q, g = state[src + "self_attn.q_proj.weight"].reshape(heads, 2, head_dim, -1).unbind(1)
            k, v = rope_last(state[src + "self_attn.k_proj.weight"]), state[src + "self_attn.v_proj.weight"]
            q = rope_last(q.reshape(heads * head_dim, -1))
            groups = [torch.cat([q.reshape(kv_heads, -1, q.shape[-1])[j], k[j], v.reshape(kv_heads, head_dim, -1)[j],
                                 g.reshape(kv_heads, -1, g.shape[-1])[j]]) for j in range(kv_heads)]
            out[mixer + "c_attn.weight"] = torch.cat(groups)
            out[mixer + "c_proj.weight"] = state[src + "self_attn.o_proj.weight"]
            continue
        gdn = src + "linear_attn."
        out[mixer + "qkv_proj.weight"] = state[gdn + "in_proj_qkv.weight"]
        out[mixer + "ab_proj.weight"] = torch.cat([state[gdn + f"in_proj_{x}.weight"] for x in "abz"])
        out[mixer + "decay_gate.A_log"], out[mixer + "decay_gate.dt_bias"] = state[gdn + "A_log"], state[gdn + "dt_bias"]
        out[mixer + "qkv_conv1d.weight"] = state[gdn + "conv1d.weight"]
        out[mixer + "o_norm.weight"], out[mixer + "o_proj.weight"] = state[gdn + "norm.weight"], state[gdn + "out_proj.weight"]
    folder.mkdir()
    save_file({k: v.detach().contiguous() for k, v in out.items()}, folder / "model.safetensors")
    gdn_block = dict(sequence_mixer_type="gated_deltanet", k_head_dim=text.linear_key_head_dim,
                     v_head_dim=text.linear_value_head_dim, num_k_heads=text.linear_num_key_heads,
                     num_v_heads=text.linear_num_value_heads, use_gate=True, allow_neg_eigval=False, kernel_size=4,
                     attention_multiplier=None)
    attention_block = dict(sequence_mixer_type="softmax_attention", num_attention_heads=heads,
                           num_key_value_heads=kv_heads, head_dim=head_dim, attention_gate=True, add_bias=False)
    config = dict(
        model_type="gpt_base", architectures=["GPTBaseForCausalLM"], vocab_size=VOCAB, hidden_size=text.hidden_size,
        num_layers=text.num_hidden_layers, normalization_function="rmsnorm", layer_norm_epsilon=text.rms_norm_eps,
        position_embedding_type="rope", rope_theta=1e4, rope_dim=rope_dim, tie_word_embeddings=False,
        m_emb=None, m_residual=None, m_width=None,
        sequence_mixer_blocks=[attention_block if t == "full_attention" else gdn_block for t in text.layer_types],
        mlp_blocks=[dict(mlp_type="MLP", intermediate_size=48, activation_function="swiglu", add_bias=False)] * len(text.layer_types),
    )
    (folder / "config.json").write_text(json.dumps(config))


def test_lm_engine_gdn_hybrid(tmp_path):
    """Reference: Qwen3.5 (partial RoPE on 4 of 16 dims) with qk-norms removed and gate-before-norm GDN outputs."""
    reference = qwen3_5_text(tie=False)
    for layer in reference.model.layers:
        if hasattr(layer, "linear_attn"):
            layer.linear_attn.norm = GateBeforeNorm(layer.linear_attn.norm.weight, reference.config.rms_norm_eps)
        else:
            layer.self_attn.q_norm = layer.self_attn.k_norm = torch.nn.Identity()
    write_lm_engine_checkpoint(tmp_path / "lm", reference, rope_dim=4)
    ids = random_ids()
    ours = convert_and_load(tmp_path / "lm", tmp_path)
    assert ours.config.linear_gate_before_norm and ours.config.rope_parameters["partial_rotary_factor"] == 0.25
    assert_same_logits(ours, reference_logits(reference, ids), ids)
    lm_config = json.loads((tmp_path / "lm" / "config.json").read_text())
    with pytest.raises(ConversionError, match="m_residual"):
        convert_checkpoint(_rewrite_config(tmp_path, "mup", lm_config, m_residual=0.5), tmp_path / "o")


def _rewrite_config(tmp_path: Path, name: str, config: dict, **changes) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    save_file({"x": torch.zeros(1)}, folder / "model.safetensors")
    return folder


# ---------------------------------------------------------------------------------------------------------------
# Swapping layers
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["fresh", "transplant"])
def test_swap_in_conversion_touches_only_swapped_layers(qwen3_5_dir, tmp_path, init):
    src, _ = qwen3_5_dir
    convert_checkpoint(src, tmp_path / "plain", progress=False)
    convert_checkpoint(src, tmp_path / "swapped", swap_layers=[0, 2], init=init, progress=False)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    swapped = AutoModelForCausalLM.from_pretrained(tmp_path / "swapped").eval()
    assert swapped.config.mixer_types == ["m2rnn", "gated_deltanet", "m2rnn", "full_attention"]
    before, after = plain.state_dict(), swapped.state_dict()
    for name, tensor in after.items():
        if ".mixer." in name and name.split(".")[2] in ("0", "2"):
            continue
        assert torch.equal(tensor, before[name]), name
    gdn = {k.removeprefix("model.layers.2.mixer."): v for k, v in before.items() if k.startswith("model.layers.2.mixer.")}
    m2 = swapped.model.layers[2].mixer
    assert m2.state_weight.shape == (4, 16, 16)
    if init == "transplant":
        expected = torch.cat([gdn["in_proj_qkv.weight"], gdn["in_proj_a.weight"], gdn["in_proj_z.weight"]])
        assert torch.equal(m2.in_proj.weight, expected) and torch.equal(m2.A_log, gdn["A_log"])
        assert torch.equal(m2.norm.weight, gdn["norm.weight"].repeat(4))
        assert torch.equal(m2.state_weight, torch.eye(16).expand(4, -1, -1))
    else:
        assert torch.equal(m2.state_weight, torch.eye(16).expand(4, -1, -1)) and torch.equal(m2.norm.weight, torch.ones(64))
    ids = random_ids()
    with torch.no_grad():
        assert not torch.allclose(plain(ids).logits, swapped(ids).logits)
    generated = swapped.generate(ids[:1, :5], max_new_tokens=6, do_sample=False)
    assert generated.shape == (1, 11)


def test_swap_layers_on_model_and_config(qwen3_5_dir):
    src, _ = qwen3_5_dir
    model = import_checkpoint(src)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = swap_layers(model.config, [1], init="fresh", m2rnn_num_v_heads=2, m2rnn_num_forget_heads=2,
                         m2rnn_num_weight_heads=2, m2rnn_num_gate_heads=2)
    assert config.mixer_types[1] == "m2rnn" and model.config.mixer_types[1] == "gated_deltanet"
    assert config.m2rnn_num_heads == 2 and config.m2rnn_key_head_dim == 8  # the rest of the shape: the GDN layer's
    swap_layers(model, [1], init="transplant")
    assert model.config.mixer_types[1] == "m2rnn" and model.model.layers[1].mixer_type == "m2rnn"
    for name, tensor in model.state_dict().items():
        if not name.startswith("model.layers.1.mixer."):
            assert torch.equal(tensor, before[name]), name
    with pytest.raises(ConversionError, match="full_attention"):
        swap_layers(model, [3])
    with pytest.raises(ConversionError, match="share one shape"):
        swap_layers(model.config, [0], m2rnn_key_head_dim=4)
    with pytest.raises(ConversionError, match="init='transplant' needs `m2rnn_key_head_dim`=8"):
        swap_layers(import_checkpoint(src).config, [0], init="transplant", m2rnn_key_head_dim=4)
    with pytest.raises(ConversionError, match="outside"):
        swap_layers(model.config, [9])
    out = model.generate(random_ids()[:, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (2, 7)


# ---------------------------------------------------------------------------------------------------------------
# CLI and refusals
# ---------------------------------------------------------------------------------------------------------------
def test_cli_convert_verify_swap(qwen3_5_dir, tmp_path, capsys):
    from m2rnn.apps.cli import main

    src, _ = qwen3_5_dir
    out = tmp_path / "cli"
    code = main(["convert", str(src), str(out), "--swap-layers", "0,2", "--init", "transplant", "--dtype", "bf16",
                 "--verify", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "max |logit difference|" in printed
    difference = float(printed.split("max |logit difference|")[1].split()[1])
    assert difference < 1e-4
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16 and model.model.layers[0].mixer.A_log.dtype == torch.float32
    assert model.config.mixer_types[:3] == ["m2rnn", "gated_deltanet", "m2rnn"]
    assert main(["convert", str(src), str(out), "--no-progress"]) == 1  # exists
    assert "already exists" in capsys.readouterr().err


def test_refusals(qwen3_5_dir, tmp_path):
    src, _ = qwen3_5_dir

    def folder_with(config: dict, tensors: dict | None = None) -> Path:
        folder = tmp_path / f"src{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
        save_file(tensors or {"x": torch.zeros(1)}, folder / "model.safetensors")
        return folder

    with pytest.raises(ConversionError, match="unknown model_type='llama'"):
        convert_checkpoint(folder_with({"model_type": "llama"}), tmp_path / "o1")
    with pytest.raises(ConversionError, match="hyper-connections"):
        convert_checkpoint(folder_with({"model_type": "qwen4_exp"}), tmp_path / "o2")
    with pytest.raises(ConversionError, match="attnres_block_size"):
        convert_checkpoint(folder_with({"model_type": "gated_deltanet", "attnres_block_size": 2}), tmp_path / "o3")
    with pytest.raises(ConversionError, match="output_gate_activation"):
        convert_checkpoint(folder_with({"model_type": "gated_deltanet", "output_gate_activation": "sigmoid"}), tmp_path / "o4")

    # missing, mismatched and unexpected tensors, on a copy of the Qwen3.5 checkpoint
    state = {}
    for shard in src.glob("*.safetensors"):
        state.update(load_file(shard))
    config = json.loads((src / "config.json").read_text())
    missing = dict(state)
    missing.pop("model.layers.1.linear_attn.A_log")
    with pytest.raises(ConversionError, match="layers.1.linear_attn.A_log"):
        convert_checkpoint(folder_with(config, missing), tmp_path / "o5")
    extra = dict(state, **{"model.layers.1.linear_attn.conv1d.bias": torch.zeros(80)})
    with pytest.raises(ConversionError, match="conv1d.bias"):
        convert_checkpoint(folder_with(config, extra), tmp_path / "o6")
    wrong = dict(state, **{"model.layers.1.linear_attn.out_proj.weight": torch.zeros(32, 60)})
    out = tmp_path / "o7"
    with pytest.raises(ConversionError, match="out_proj"):
        convert_checkpoint(folder_with(config, wrong), out, progress=False)
    assert not out.exists() and not list(tmp_path.glob(".o7*"))  # no partial output left behind

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps(config))
    (pickled / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ConversionError, match="pickled"):
        convert_checkpoint(pickled, tmp_path / "o8")
    with pytest.raises(OutputError, match="lies inside, the input"):
        convert_checkpoint(src, src / "out")
    with pytest.raises(ConversionError, match="only 'gated_deltanet'"):
        convert_checkpoint(src, tmp_path / "o9", swap_layers=[3], progress=False)
    assert not (tmp_path / "o9").exists()


def test_streaming_io_holds_few_tensors(qwen3_5_dir, tmp_path):
    """The reader keeps at most two loaded tensors; the writer's shards respect the size limit and load back."""
    from m2rnn.apps.conversion.convert import plan_import
    from m2rnn.apps.conversion.io import write_sharded_safetensors

    src, _ = qwen3_5_dir
    plan, reader, _ = plan_import(src)
    names = list(plan.tensors)[:12]
    built = {}

    def produce(name: str) -> torch.Tensor:
        built[name] = plan.tensors[name].build(reader.get)
        assert len(reader._cache) <= 2
        return built[name]

    specs = {n: (tuple(plan.tensors[n].build(reader.get).shape), torch.float32) for n in names}
    files = write_sharded_safetensors(tmp_path, specs, produce, max_shard_bytes=20_000)
    assert len(files) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    loaded = {}
    for file in files:
        assert (tmp_path / file).stat().st_size < 20_000 + 4_096 or len(load_file(tmp_path / file)) == 1
        loaded.update(load_file(tmp_path / file))
    assert loaded.keys() == built.keys() and all(torch.equal(loaded[n], built[n]) for n in names)
