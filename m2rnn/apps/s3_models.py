"""The S3 state-tracking models: the tiny M2RNN with the S3 recipe and the two Gated DeltaNet [-1, 1] baselines, as
`m2rnn demo` and the S3 benchmarks (`benchmarks/s3_ablation.py`, `benchmarks/s3_paper_scale.py`) build them."""

from __future__ import annotations

import torch

S3_RECIPE_CHANGES = ("orthogonal", "no_forget_gate", "input_scale")
"""The three init/gate changes that make the M2RNN learn S3 (docs/demo.md): orthogonal W per head, no
forget gate, and in_proj std 1/√width with an identity-initialised conv."""


def m2rnn_config(quick: bool = False, changes: tuple[str, ...] = S3_RECIPE_CHANGES):
    """The tiny M2RNN: 3 M2RNN layers of width 64; one shared q and k; 8 value/forget/weight/gate heads of
    16×16 states (2,048 state elements per layer), with the S3 recipe's `changes` to the language-model init."""
    from m2rnn import M2RNNConfig

    unknown = set(changes) - set(S3_RECIPE_CHANGES)
    if unknown:
        raise ValueError(f"m2rnn_config: unknown changes {sorted(unknown)}; known: {S3_RECIPE_CHANGES}")
    heads, width = (2, 32) if quick else (8, 64)
    return M2RNNConfig(
        vocab_size=8, hidden_size=width, intermediate_size=2 * width,
        num_hidden_layers=2 if quick else 3, mixer_types=["m2rnn"] * (2 if quick else 3),
        m2rnn_key_head_dim=8 if quick else 16, m2rnn_value_head_dim=8 if quick else 16,
        m2rnn_num_q_heads=1, m2rnn_num_k_heads=1, m2rnn_num_v_heads=heads, m2rnn_num_forget_heads=heads,
        m2rnn_num_weight_heads=heads, m2rnn_num_gate_heads=heads, m2rnn_gradient_clipping=1.0,
        m2rnn_state_weight_init="orthogonal" if "orthogonal" in changes else "identity",
        m2rnn_use_forget_gate="no_forget_gate" not in changes,
        m2rnn_in_proj_init_std=width**-0.5 if "input_scale" in changes else None,
        m2rnn_conv_init="identity" if "input_scale" in changes else "normal",
        max_position_embeddings=4096, tie_word_embeddings=False,
    )


def gdn_config(quick: bool = False):
    """Our hybrid-style Gated DeltaNet: 3 layers of width 64, 2 heads of 32×32 states (2,048 per layer), short conv,
    decay and output gates, eigenvalues in [-1, 1] (β = 2σ)."""
    from m2rnn import M2RNNConfig

    return M2RNNConfig(
        vocab_size=8, hidden_size=32 if quick else 64, intermediate_size=64 if quick else 128,
        num_hidden_layers=2 if quick else 3, mixer_types=["gated_deltanet"] * (2 if quick else 3),
        linear_num_key_heads=2, linear_num_value_heads=2,
        linear_key_head_dim=8 if quick else 32, linear_value_head_dim=8 if quick else 32,
        linear_allow_neg_eigval=True, max_position_embeddings=4096, tie_word_embeddings=False,
    )


def harness_gdn_config(quick: bool = False):
    """The paper's linear baseline "Gated DeltaNet [-1, 1]" as its harness builds it: ONE layer of width 128, 8 heads
    of 32×32, no short conv, no decay gate, no output gate, β = 2σ(·) (a DeltaNet with eigenvalues in [-1, 1])."""
    from m2rnn import M2RNNConfig

    width, heads = (32, 2) if quick else (128, 8)
    return M2RNNConfig(
        vocab_size=8, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=1,
        mixer_types=["gated_deltanet"], linear_num_key_heads=heads, linear_num_value_heads=heads,
        linear_key_head_dim=8 if quick else 32, linear_value_head_dim=8 if quick else 32,
        linear_use_short_conv=False, linear_use_decay_gate=False, linear_use_output_gate=False,
        linear_allow_neg_eigval=True, max_position_embeddings=4096, tie_word_embeddings=False,
    )


CONFIGS = {"m2rnn": m2rnn_config, "harness_gdn": harness_gdn_config, "gdn": gdn_config}


def build_model(config, seed: int) -> torch.nn.Module:
    """A freshly initialised `M2RNNForCausalLM` (seeded)."""
    from m2rnn import M2RNNForCausalLM

    torch.manual_seed(seed)
    return M2RNNForCausalLM(config)
