"""M2RNNConfig: derived layer types, validation errors that name the key, presets and their exact sizes."""

import pytest
import torch

from m2rnn import M2RNNConfig, M2RNNForCausalLM


def test_layer_types_are_derived_from_mixer_types():
    config = M2RNNConfig(num_hidden_layers=3, mixer_types=["m2rnn", "gated_deltanet", "full_attention"])
    assert config.layer_types == ["linear_attention", "linear_attention", "full_attention"]
    config = M2RNNConfig(num_hidden_layers=2, mixer_types=["m2rnn", "full_attention"], layer_types=["x", "y"])
    assert config.layer_types == ["linear_attention", "full_attention"]


def test_round_trip(tmp_path):
    config = M2RNNConfig.from_preset("tiny")
    config.save_pretrained(tmp_path)
    loaded = M2RNNConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.m2rnn_num_heads == 4


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(num_hidden_layers=2, mixer_types=["m2rnn"]), "`mixer_types`"),
        (dict(num_hidden_layers=1, mixer_types=["mamba"]), r"`mixer_types\[0\]`='mamba'"),
        (dict(num_hidden_layers=1, m2rnn_num_v_heads=84, m2rnn_num_gate_heads=5), "`m2rnn_num_gate_heads`=5"),
        (dict(num_hidden_layers=1, m2rnn_num_q_heads=0), "`m2rnn_num_q_heads`=0"),
        (dict(num_hidden_layers=1, m2rnn_gradient_clipping=-1.0), "`m2rnn_gradient_clipping`=-1.0"),
        (dict(num_hidden_layers=1, m2rnn_A_init_range=(4.0, 1.0)), "`m2rnn_A_init_range`"),
        (dict(num_hidden_layers=1, m2rnn_dt_min=0.0), "`m2rnn_dt_min`"),
        (dict(num_hidden_layers=1, mixer_types=["gated_deltanet"], linear_num_key_heads=3), "`linear_num_value_heads`"),
        (dict(num_hidden_layers=1, mixer_types=["full_attention"], num_key_value_heads=5), "`num_key_value_heads`=5"),
        (dict(num_hidden_layers=1, mixer_types=["full_attention"], rope_parameters={"theta": 1.0}), "`rope_parameters`"),
        (
            dict(num_hidden_layers=1, mixer_types=["full_attention"], rope_parameters={"rope_theta": 1.0, "partial_rotary_factor": 1.5}),
            "partial_rotary_factor",
        ),
        (dict(num_hidden_layers=1, num_experts=4, num_experts_per_tok=5), "`num_experts_per_tok`=5"),
        (dict(num_hidden_layers=2, num_experts=4, num_experts_per_tok=2, mlp_only_layers=[2]), "`mlp_only_layers`"),
        (dict(hidden_size=0), "`hidden_size`=0"),
        # every size and numeric key, refused at construction with the key named
        (dict(num_hidden_layers=1, num_key_value_heads=0), "`num_key_value_heads`=0"),
        (dict(num_hidden_layers=1, num_attention_heads=0), "`num_attention_heads`=0"),
        (dict(num_hidden_layers=1, head_dim=-8), "`head_dim`=-8"),
        (dict(num_hidden_layers=1, intermediate_size=-1), "`intermediate_size`=-1"),
        (dict(num_hidden_layers=1, vocab_size=2.5), "`vocab_size`=2.5"),
        (dict(num_hidden_layers=1, max_position_embeddings=0), "`max_position_embeddings`=0"),
        (dict(num_hidden_layers=1, m2rnn_key_head_dim=-4), "`m2rnn_key_head_dim`=-4"),
        (dict(num_hidden_layers=1, linear_key_head_dim=0), "`linear_key_head_dim`=0"),
        (dict(num_hidden_layers=1, linear_conv_kernel_dim=-1), "`linear_conv_kernel_dim`=-1"),
        (dict(num_hidden_layers=1, hidden_act="swishh"), "`hidden_act`='swishh'"),
        (dict(num_hidden_layers=1, rms_norm_eps=0.0), "`rms_norm_eps`=0.0"),
        (dict(num_hidden_layers=1, rms_norm_eps=float("nan")), "`rms_norm_eps`=nan"),
        (dict(num_hidden_layers=1, m2rnn_norm_eps=-1e-5), "`m2rnn_norm_eps`=-1e-05"),
        (dict(num_hidden_layers=1, linear_norm_eps=float("nan")), "`linear_norm_eps`=nan"),
        (dict(num_hidden_layers=1, rope_parameters={"rope_theta": 0.0}), "`rope_parameters.rope_theta`=0.0"),
        (
            dict(num_hidden_layers=1, mixer_types=["full_attention"], rope_parameters={"rope_theta": -1.0}),
            "`rope_parameters.rope_theta`=-1.0",
        ),
        (dict(num_hidden_layers=1, m2rnn_gradient_clipping=float("nan")), "`m2rnn_gradient_clipping`=nan"),
        (dict(num_hidden_layers=1, m2rnn_gradient_clipping=float("inf")), "`m2rnn_gradient_clipping`=inf"),
        (dict(num_hidden_layers=1, m2rnn_A_init_range=(0.0, float("nan"))), "`m2rnn_A_init_range`"),
        (dict(num_hidden_layers=1, m2rnn_dt_min=float("nan")), "`m2rnn_dt_max`"),
        (dict(num_hidden_layers=1, m2rnn_dt_init_floor=-1.0), "`m2rnn_dt_init_floor`=-1.0"),
        (dict(num_hidden_layers=1, initializer_range=float("nan")), "`initializer_range`=nan"),
        (dict(num_hidden_layers=1, attention_dropout=1.0), "`attention_dropout`=1.0"),
        (dict(num_hidden_layers=1, router_aux_loss_coef=-0.1), "`router_aux_loss_coef`=-0.1"),
        (dict(num_hidden_layers=1, num_experts=-2), "`num_experts`=-2"),
        (dict(num_hidden_layers=1, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=0), "`moe_intermediate_size`=0"),
        (dict(num_hidden_layers=1, shared_expert_intermediate_size=-1), "`shared_expert_intermediate_size`=-1"),
        (dict(num_hidden_layers=1, vocab_size=10, pad_token_id=10), "`pad_token_id`=10"),
    ],
)
def test_bad_configs_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        M2RNNConfig(**kwargs)


def test_a_config_of_another_model_type_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2}')
    with pytest.raises(ValueError, match="`model_type`='llama' is not 'm2rnn'"):
        M2RNNConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="`model_type`='llama'"):
        M2RNNForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="`model_type`='qwen3_next'"):
        M2RNNConfig.from_dict({"model_type": "qwen3_next"})


def test_tiny_preset_fits_the_byte_tokenizer():
    from m2rnn.tokenization import BYTE_VOCAB_SIZE, byte_level_tokenizer

    config = M2RNNConfig.from_preset("tiny")
    tokenizer = byte_level_tokenizer()
    assert config.vocab_size == BYTE_VOCAB_SIZE == len(tokenizer) == 260
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
    ) == (0, 1, 2)
    assert max(tokenizer("ÿ héllo").input_ids) < config.vocab_size


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        M2RNNConfig.from_preset("nope")


def _num_parameters(config: M2RNNConfig) -> int:
    with torch.device("meta"):
        model = M2RNNForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


# Parameter counts of the paper's models, from the authors' evaluation logs.
@pytest.mark.parametrize(
    "preset, expected",
    [
        ("m2rnn-400m", 410_736_576),
        ("hybrid-m2rnn-400m", 410_191_176),
        ("hybrid-gdn-400m", 406_642_260),
        ("hybrid-gdn-m2rnn-1l-400m", 406_811_256),
    ],
)
def test_paper_presets_have_the_published_sizes(preset, expected):
    config = M2RNNConfig.from_preset(preset)
    assert _num_parameters(config) == expected


def test_paper_7b_layer_sizes():
    config = M2RNNConfig.from_preset("hybrid-m2rnn-7b", num_hidden_layers=5, mixer_types=["m2rnn", "gated_deltanet", "full_attention", "m2rnn", "m2rnn"])
    with torch.device("meta"):
        model = M2RNNForCausalLM(config)
    size = lambda module: sum(p.numel() for p in module.parameters())
    layers = model.model.layers
    assert size(layers[0].mixer) == 10_178_696
    assert size(layers[1].mixer) == 9_459_206
    assert size(layers[2].mixer) == 9_437_184
    assert size(layers[0].mlp) == 155_910_144


def test_presets_load():
    for name in M2RNNConfig.preset_names():
        config = M2RNNConfig.from_preset(name)
        assert len(config.mixer_types) == config.num_hidden_layers
    assert M2RNNConfig.from_preset("hybrid-gdn-m2rnn-1l-400m").mixer_types[:5] == [
        "m2rnn", "gated_deltanet", "gated_deltanet", "gated_deltanet", "full_attention"
    ]


def test_tiny_preset_is_small_and_has_every_layer_type():
    config = M2RNNConfig.from_preset("tiny")
    assert set(config.mixer_types) == {"m2rnn", "gated_deltanet", "full_attention"}
    assert any(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    assert 100_000 < _num_parameters(config) < 1_000_000
