"""Configuration of M2RNN hybrid models: M2RNN, Gated DeltaNet and attention layers in any order."""

from __future__ import annotations

import copy
import math
from typing import Any

from transformers import PretrainedConfig
from transformers.activations import ACT2FN

MIXER_TYPES = ("m2rnn", "gated_deltanet", "full_attention")
STATE_WEIGHT_INITS = ("identity", "orthogonal", "normal")
CONV_INITS = ("normal", "identity")
QK_NORM_TYPES = (None, "per_head", "full")
BLOCK_NORM_TYPES = ("pre", "post")
# transformers' cache only knows its own layer-type strings: both recurrent mixers are "linear_attention".
_CACHE_LAYER_TYPE = {"m2rnn": "linear_attention", "gated_deltanet": "linear_attention", "full_attention": "full_attention"}


class M2RNNConfig(PretrainedConfig):
    r"""
    Configuration of an [`M2RNNForCausalLM`]: a pre-norm decoder whose layers each hold one sequence mixer
    (`"m2rnn"`, `"gated_deltanet"` or `"full_attention"`, listed per layer in `mixer_types`) and an MLP (dense SwiGLU,
    or a mixture of experts when `num_experts > 0`).

    `layer_types` is derived from `mixer_types` (`"linear_attention"` for both recurrent mixers) so that
    transformers' `DynamicCache(config=...)` and `StaticCache` hold a conv state and a recurrent state for recurrent
    layers and keys/values for attention layers.

    Args:
        vocab_size, hidden_size, intermediate_size, num_hidden_layers, hidden_act, rms_norm_eps, initializer_range,
        max_position_embeddings, tie_word_embeddings, use_cache: as in other transformers decoders.
        mixer_types (`list[str]`): one entry per layer. Defaults to all `"m2rnn"`.

        m2rnn_key_head_dim, m2rnn_value_head_dim: K and V of each head's K×V recurrent state (paper: 64 and 16).
        m2rnn_num_q_heads, m2rnn_num_k_heads, m2rnn_num_v_heads, m2rnn_num_forget_heads, m2rnn_num_weight_heads,
        m2rnn_num_gate_heads: head counts (`weight` counts state weights W, `gate` the output gate's heads).
            N = max(q, k, v, forget, weight) recurrent states; each count divides N and head n reads group
            n // (N / count). Paper: q = k = 1, the others N.
        m2rnn_conv_kernel_size: depthwise causal conv over [q|k|v] before the recurrence (4).
        m2rnn_use_residual: add D ⊙ v to the readout (D initialised to 1).
        m2rnn_gradient_clipping: clamp the recurrent carry ∂L/∂H_t to [-c, c] in backward (1.0; None disables).
        m2rnn_A_init_range, m2rnn_dt_min, m2rnn_dt_max, m2rnn_dt_init_floor: forget-gate init,
            A ~ U(range), dt ~ logU(dt_min, dt_max) floored, f = exp(-exp(A_log) softplus(x_f + dt_bias)).
        m2rnn_norm_eps: eps of the RMSNorm over the whole N·V output vector.
        m2rnn_state_weight_init (`"identity"`, `"orthogonal"` or `"normal"`): init of each head's V×V state weight
            W (the `state_weight` parameter): I (the paper's, default), a random orthogonal matrix per head, or
            N(0, 1/V).
        m2rnn_use_forget_gate (`bool`, True): False drops the forget gate (no x_f channels, A_log, dt_bias): f ≡ 0,
            so H_t = tanh(H_{t-1} W + k vᵀ), a plain non-linear RNN.
        m2rnn_in_proj_init_std (`float` or None): std of `in_proj`'s normal init; None uses `initializer_range`.
        m2rnn_conv_init (`"normal"` or `"identity"`): the short conv's init: N(0, `initializer_range`) or the
            identity filter (1 on the current token, 0 on the past ones).
            S3 state tracking needs orthogonal W, no forget gate, in_proj std 1/√hidden_size and the identity conv
            (docs/demo.md); the language-model presets keep the paper's init.

        linear_num_key_heads, linear_num_value_heads, linear_key_head_dim, linear_value_head_dim,
        linear_conv_kernel_dim: the Gated DeltaNet mixer's shapes, named as in Qwen3.5's config. Every Gated
            DeltaNet key carries that `linear_` prefix; code and messages call the mixer Gated DeltaNet.
        linear_allow_neg_eigval (`bool`, False): β = 2·sigmoid(b) instead of sigmoid(b), so the transition's
            eigenvalues reach into [-1, 1] (OLMo-hybrid's default; an fla / lm-engine option).
        linear_gate_before_norm (`bool`, False): output `RMSNorm(o ⊙ SiLU(z))` (lm-engine) instead of
            `RMSNorm(o) ⊙ SiLU(z)` (fla, Qwen, OLMo).
        linear_norm_eps (`float` or None): eps of the per-head output RMSNorm; None uses `rms_norm_eps`
            (OLMo-hybrid fixes it at 1e-5).
        linear_use_short_conv (`bool`, True): False replaces the short conv by SiLU alone (fla's `use_short_conv=False`).
        linear_use_decay_gate (`bool`, True): False drops the decay gate (no `in_proj_a`, A_log, dt_bias): g ≡ 0,
            plain DeltaNet.
        linear_use_output_gate (`bool`, True): False drops the output gate (no `in_proj_z`): out = out_proj(RMSNorm(o)).

        num_attention_heads, num_key_value_heads, head_dim: attention shapes (GQA when kv heads < heads).
        rope_parameters (`dict` or None): None for NoPE, else `{"rope_theta": float, "partial_rotary_factor": float}`;
            the rotary dims are the first `int(head_dim * partial_rotary_factor)` of each head.
        attention_output_gate: sigmoid output gate from a doubled `q_proj` (Qwen3.5 style).
        attention_qk_norm (None, `"per_head"` or `"full"`): RMSNorm on queries and keys, per head over `head_dim`
            (Qwen) or over the whole projection before the head split (OLMo). `True` means `"per_head"` and `False`
            means None (older configs).
        attention_block_norm (`"pre"` or `"post"`): block structure of the attention layers only. `"pre"`:
            `h = x + attn(n1(x))`, `out = h + mlp(n2(h))`. `"post"` (OLMo-hybrid): `h = x + n1(attn(x))`,
            `out = h + n2(mlp(h))`, where n1 is `input_layernorm` and n2 `post_attention_layernorm`.
        norm_zero_centered (`bool`, False): the block norms, the final norm and the qk-norms compute `x̂·(1 + w)`
            with w stored zero-centred (Qwen3-Next / Qwen3.5). The recurrent mixers' output norms always use `x̂·w`.
        attention_bias, attention_dropout: as usual.

        num_experts: 0 for dense SwiGLU MLPs; otherwise routed experts in every layer not in `mlp_only_layers`.
        num_experts_per_tok, moe_intermediate_size, norm_topk_prob: top-k routing (softmax over all experts, then the
            top k renormalised when `norm_topk_prob`).
        shared_expert_intermediate_size: 0 for none; `shared_expert_gated` puts a sigmoid gate on it.
        router_aux_loss_coef, output_router_logits: load-balancing loss (Switch-style) added to the LM loss.
        mlp_only_layers: layer indices that keep a dense MLP in an MoE model.
    """

    model_type = "m2rnn"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]  # the cache output before / from transformers 5.24
    base_model_tp_plan = {
        "layers.*.mixer.q_proj": "colwise",
        "layers.*.mixer.k_proj": "colwise",
        "layers.*.mixer.v_proj": "colwise",
        "layers.*.mixer.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 1024,
        intermediate_size: int = 2752,
        num_hidden_layers: int = 24,
        mixer_types: list[str] | None = None,
        hidden_act: str = "silu",
        rms_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        max_position_embeddings: int = 4096,
        tie_word_embeddings: bool = True,
        use_cache: bool = True,
        norm_zero_centered: bool = False,
        # M2RNN mixer
        m2rnn_key_head_dim: int = 64,
        m2rnn_value_head_dim: int = 16,
        m2rnn_num_q_heads: int = 1,
        m2rnn_num_k_heads: int = 1,
        m2rnn_num_v_heads: int = 84,
        m2rnn_num_forget_heads: int = 84,
        m2rnn_num_weight_heads: int = 84,
        m2rnn_num_gate_heads: int = 84,
        m2rnn_conv_kernel_size: int = 4,
        m2rnn_use_residual: bool = True,
        m2rnn_gradient_clipping: float | None = 1.0,
        m2rnn_A_init_range: tuple[float, float] = (0.0, 16.0),
        m2rnn_dt_min: float = 1e-3,
        m2rnn_dt_max: float = 0.1,
        m2rnn_dt_init_floor: float = 1e-4,
        m2rnn_norm_eps: float = 1e-5,
        m2rnn_state_weight_init: str = "identity",
        m2rnn_use_forget_gate: bool = True,
        m2rnn_in_proj_init_std: float | None = None,
        m2rnn_conv_init: str = "normal",
        # Gated DeltaNet mixer
        linear_num_key_heads: int = 2,
        linear_num_value_heads: int = 2,
        linear_key_head_dim: int = 256,
        linear_value_head_dim: int = 512,
        linear_conv_kernel_dim: int = 4,
        linear_allow_neg_eigval: bool = False,
        linear_gate_before_norm: bool = False,
        linear_norm_eps: float | None = None,
        linear_use_short_conv: bool = True,
        linear_use_decay_gate: bool = True,
        linear_use_output_gate: bool = True,
        # attention
        num_attention_heads: int = 16,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        rope_parameters: dict[str, Any] | None = None,
        attention_output_gate: bool = False,
        attention_qk_norm: bool | str | None = None,
        attention_block_norm: str = "pre",
        attention_bias: bool = False,
        attention_dropout: float = 0.0,
        # MLP / MoE
        num_experts: int = 0,
        num_experts_per_tok: int = 8,
        moe_intermediate_size: int = 256,
        norm_topk_prob: bool = True,
        shared_expert_intermediate_size: int = 0,
        shared_expert_gated: bool = False,
        router_aux_loss_coef: float = 0.001,
        output_router_logits: bool = False,
        mlp_only_layers: list[int] | None = None,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.mixer_types = list(mixer_types) if mixer_types is not None else ["m2rnn"] * num_hidden_layers
        self.hidden_act = hidden_act
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.max_position_embeddings = max_position_embeddings
        self.use_cache = use_cache
        self.norm_zero_centered = norm_zero_centered

        self.m2rnn_key_head_dim = m2rnn_key_head_dim
        self.m2rnn_value_head_dim = m2rnn_value_head_dim
        self.m2rnn_num_q_heads = m2rnn_num_q_heads
        self.m2rnn_num_k_heads = m2rnn_num_k_heads
        self.m2rnn_num_v_heads = m2rnn_num_v_heads
        self.m2rnn_num_forget_heads = m2rnn_num_forget_heads
        self.m2rnn_num_weight_heads = m2rnn_num_weight_heads
        self.m2rnn_num_gate_heads = m2rnn_num_gate_heads
        self.m2rnn_conv_kernel_size = m2rnn_conv_kernel_size
        self.m2rnn_use_residual = m2rnn_use_residual
        self.m2rnn_gradient_clipping = m2rnn_gradient_clipping
        self.m2rnn_A_init_range = list(m2rnn_A_init_range)
        self.m2rnn_dt_min = m2rnn_dt_min
        self.m2rnn_dt_max = m2rnn_dt_max
        self.m2rnn_dt_init_floor = m2rnn_dt_init_floor
        self.m2rnn_norm_eps = m2rnn_norm_eps
        self.m2rnn_state_weight_init = m2rnn_state_weight_init
        self.m2rnn_use_forget_gate = m2rnn_use_forget_gate
        self.m2rnn_in_proj_init_std = m2rnn_in_proj_init_std
        self.m2rnn_conv_init = m2rnn_conv_init

        self.linear_num_key_heads = linear_num_key_heads
        self.linear_num_value_heads = linear_num_value_heads
        self.linear_key_head_dim = linear_key_head_dim
        self.linear_value_head_dim = linear_value_head_dim
        self.linear_conv_kernel_dim = linear_conv_kernel_dim
        self.linear_allow_neg_eigval = linear_allow_neg_eigval
        self.linear_gate_before_norm = linear_gate_before_norm
        self.linear_norm_eps = linear_norm_eps
        self.linear_use_short_conv = linear_use_short_conv
        self.linear_use_decay_gate = linear_use_decay_gate
        self.linear_use_output_gate = linear_use_output_gate

        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads if num_key_value_heads is not None else num_attention_heads
        if head_dim is None and _is_positive_int(num_attention_heads) and _is_positive_int(hidden_size):
            head_dim = hidden_size // num_attention_heads
        self.head_dim = head_dim
        self.rope_parameters = copy.deepcopy(rope_parameters)
        self.attention_output_gate = attention_output_gate
        self.attention_qk_norm = {True: "per_head", False: None}.get(attention_qk_norm, attention_qk_norm)
        self.attention_block_norm = attention_block_norm
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout

        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_intermediate_size = moe_intermediate_size
        self.norm_topk_prob = norm_topk_prob
        self.shared_expert_intermediate_size = shared_expert_intermediate_size
        self.shared_expert_gated = shared_expert_gated
        self.router_aux_loss_coef = router_aux_loss_coef
        self.output_router_logits = output_router_logits
        self.mlp_only_layers = list(mlp_only_layers) if mlp_only_layers is not None else []

        kwargs.pop("layer_types", None)  # always derived from mixer_types
        model_type = kwargs.pop("model_type", self.model_type)
        if model_type != self.model_type:  # another family's config.json: its keys would be silently dropped
            raise ValueError(
                f"M2RNNConfig: `model_type`={model_type!r} is not {self.model_type!r}; this config belongs to another "
                "model family (convert it first with `m2rnn convert`, or load it with AutoConfig)"
            )
        self.layer_types = [_CACHE_LAYER_TYPE.get(m, m) for m in self.mixer_types]
        self.pad_token_id = pad_token_id  # read by _validate; set again by PretrainedConfig
        self._validate()
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        # PretrainedConfig turns rope_parameters=None into the default RoPE (theta 10000); None means NoPE here.
        if rope_parameters is None:
            self.rope_parameters = None

    # ------------------------------------------------------------------ derived sizes
    @property
    def m2rnn_num_heads(self) -> int:
        """N, the number of K×V recurrent states (heads) per M2RNN layer."""
        return max(
            self.m2rnn_num_q_heads,
            self.m2rnn_num_k_heads,
            self.m2rnn_num_v_heads,
            self.m2rnn_num_forget_heads,
            self.m2rnn_num_weight_heads,
        )

    def is_moe_layer(self, layer_idx: int) -> bool:
        return self.num_experts > 0 and layer_idx not in self.mlp_only_layers

    def recurrent_state_size(self, mixer: str) -> int:
        """Elements of the recurrent state one sequence keeps in one layer of kind `mixer` (conv state excluded)."""
        if mixer == "m2rnn":
            return self.m2rnn_num_heads * self.m2rnn_key_head_dim * self.m2rnn_value_head_dim
        if mixer == "gated_deltanet":
            return self.linear_num_value_heads * self.linear_key_head_dim * self.linear_value_head_dim
        return 0

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        def fail(key: str, value: Any, why: str) -> None:
            raise ValueError(f"M2RNNConfig: `{key}`={value!r} {why}")

        for key in _POSITIVE_INT_KEYS:
            if not _is_positive_int(getattr(self, key)):
                fail(key, getattr(self, key), "must be a positive integer")
        for key, low, inclusive in _FLOAT_RANGES:
            value = getattr(self, key)
            if not _is_number(value) or value < low or (value == low and not inclusive):
                fail(key, value, f"must be a finite number {'>=' if inclusive else '>'} {low}")
        if not (_is_number(self.attention_dropout) and 0 <= self.attention_dropout < 1):
            fail("attention_dropout", self.attention_dropout, "must be in [0, 1)")
        if self.hidden_act not in ACT2FN:
            fail("hidden_act", self.hidden_act, "is not a transformers activation (e.g. 'silu', 'gelu'; see ACT2FN)")
        if self.pad_token_id is not None and not (
            isinstance(self.pad_token_id, int) and 0 <= self.pad_token_id < self.vocab_size
        ):
            fail("pad_token_id", self.pad_token_id, f"must be None or a token id in 0..vocab_size-1={self.vocab_size - 1}")
        if len(self.mixer_types) != self.num_hidden_layers:
            fail("mixer_types", self.mixer_types, f"must have num_hidden_layers={self.num_hidden_layers} entries")
        for i, mixer in enumerate(self.mixer_types):
            if mixer not in MIXER_TYPES:
                fail(f"mixer_types[{i}]", mixer, f"is not one of {MIXER_TYPES}")
        if "m2rnn" in self.mixer_types:
            heads = self.m2rnn_num_heads
            for key in ("q", "k", "v", "forget", "weight", "gate"):
                name = f"m2rnn_num_{key}_heads"
                count = getattr(self, name)
                if not isinstance(count, int) or count <= 0 or heads % count:
                    fail(name, count, f"must be a positive integer dividing N={heads} (the largest head count)")
            clipping = self.m2rnn_gradient_clipping
            if clipping is not None and not (_is_number(clipping) and clipping > 0):
                fail("m2rnn_gradient_clipping", clipping, "must be a positive finite number or None")
            if len(self.m2rnn_A_init_range) != 2 or not all(_is_number(x) for x in self.m2rnn_A_init_range):
                fail("m2rnn_A_init_range", self.m2rnn_A_init_range, "must be two finite numbers (low, high)")
            low, high = self.m2rnn_A_init_range
            if not 0 <= low < high:
                fail("m2rnn_A_init_range", self.m2rnn_A_init_range, "must satisfy 0 <= low < high")
            if not (_is_number(self.m2rnn_dt_max) and _is_number(self.m2rnn_dt_min)):
                fail("m2rnn_dt_max", self.m2rnn_dt_max, f"and m2rnn_dt_min={self.m2rnn_dt_min} must be finite numbers")
            if not 0 < self.m2rnn_dt_min <= self.m2rnn_dt_max:
                fail("m2rnn_dt_min", self.m2rnn_dt_min, f"must satisfy 0 < dt_min <= dt_max={self.m2rnn_dt_max}")
            if not (_is_number(self.m2rnn_dt_init_floor) and self.m2rnn_dt_init_floor >= 0):
                fail("m2rnn_dt_init_floor", self.m2rnn_dt_init_floor, "must be a finite number >= 0")
            if self.m2rnn_state_weight_init not in STATE_WEIGHT_INITS:
                fail("m2rnn_state_weight_init", self.m2rnn_state_weight_init, f"must be one of {STATE_WEIGHT_INITS}")
            if self.m2rnn_conv_init not in CONV_INITS:
                fail("m2rnn_conv_init", self.m2rnn_conv_init, f"must be one of {CONV_INITS}")
            if self.m2rnn_in_proj_init_std is not None and not (
                isinstance(self.m2rnn_in_proj_init_std, (int, float)) and self.m2rnn_in_proj_init_std > 0
            ):
                fail("m2rnn_in_proj_init_std", self.m2rnn_in_proj_init_std, "must be a positive float or None")
        for name in ("m2rnn_use_forget_gate", "linear_use_short_conv", "linear_use_decay_gate", "linear_use_output_gate"):
            if not isinstance(getattr(self, name), bool):
                fail(name, getattr(self, name), "must be True or False")
        if "gated_deltanet" in self.mixer_types and self.linear_num_value_heads % self.linear_num_key_heads:
            fail(
                "linear_num_value_heads",
                self.linear_num_value_heads,
                f"must be a multiple of linear_num_key_heads={self.linear_num_key_heads}",
            )
        if self.linear_norm_eps is not None and not self.linear_norm_eps > 0:
            fail("linear_norm_eps", self.linear_norm_eps, "must be a positive float or None (use rms_norm_eps)")
        if self.attention_qk_norm not in QK_NORM_TYPES:
            fail("attention_qk_norm", self.attention_qk_norm, f"must be one of {QK_NORM_TYPES} (True means 'per_head')")
        if self.attention_block_norm not in BLOCK_NORM_TYPES:
            fail("attention_block_norm", self.attention_block_norm, f"must be one of {BLOCK_NORM_TYPES}")
        if "full_attention" in self.mixer_types:
            if self.num_attention_heads % self.num_key_value_heads:
                fail(
                    "num_key_value_heads",
                    self.num_key_value_heads,
                    f"must divide num_attention_heads={self.num_attention_heads}",
                )
            if self.rope_parameters is not None:
                if not isinstance(self.rope_parameters, dict) or "rope_theta" not in self.rope_parameters:
                    fail("rope_parameters", self.rope_parameters, "must be None (NoPE) or a dict with 'rope_theta'")
                factor = self.rope_parameters.get("partial_rotary_factor", 1.0)
                rotary = int(self.head_dim * factor)
                if not 0 < factor <= 1 or rotary % 2:
                    fail("rope_parameters.partial_rotary_factor", factor, f"must give an even rotary dim <= head_dim={self.head_dim}")
        if not isinstance(self.num_experts, int) or self.num_experts < 0:
            fail("num_experts", self.num_experts, "must be 0 (dense MLPs) or a positive integer")
        if not isinstance(self.shared_expert_intermediate_size, int) or self.shared_expert_intermediate_size < 0:
            fail("shared_expert_intermediate_size", self.shared_expert_intermediate_size, "must be an integer >= 0")
        theta = self.rope_parameters.get("rope_theta", 1.0) if isinstance(self.rope_parameters, dict) else 1.0
        if not (_is_number(theta) and theta > 0):
            fail("rope_parameters.rope_theta", theta, "must be a positive finite number")
        if self.num_experts:
            if not _is_positive_int(self.moe_intermediate_size):
                fail("moe_intermediate_size", self.moe_intermediate_size, "must be a positive integer")
            if not isinstance(self.num_experts_per_tok, int) or not 0 < self.num_experts_per_tok <= self.num_experts:
                fail("num_experts_per_tok", self.num_experts_per_tok, f"must be in 1..num_experts={self.num_experts}")
            for idx in self.mlp_only_layers:
                if not 0 <= idx < self.num_hidden_layers:
                    fail("mlp_only_layers", self.mlp_only_layers, f"has index {idx} outside 0..{self.num_hidden_layers - 1}")

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset_names(cls) -> list[str]:
        return sorted(_PRESETS)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "M2RNNConfig":
        """A named configuration: the paper's models (see `preset_names()`) or `"tiny"` for tests and examples."""
        if name not in _PRESETS:
            raise ValueError(f"M2RNNConfig.from_preset: unknown preset {name!r}; known: {cls.preset_names()}")
        kwargs = _PRESETS[name]()
        kwargs.update(overrides)
        return cls(**kwargs)


# sizes every layer kind reads (the attention and Gated DeltaNet shapes too, so a later mixer swap cannot fail)
_POSITIVE_INT_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "max_position_embeddings",
    "m2rnn_key_head_dim", "m2rnn_value_head_dim", "m2rnn_conv_kernel_size",
    "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
    "linear_conv_kernel_dim", "num_attention_heads", "num_key_value_heads", "head_dim",
)
# (key, lower bound, bound allowed): eps ≤ 0 divides by zero in RMSNorm, NaN anywhere spreads to every logit
_FLOAT_RANGES = (
    ("rms_norm_eps", 0.0, False),
    ("m2rnn_norm_eps", 0.0, False),
    ("initializer_range", 0.0, True),
    ("router_aux_loss_coef", 0.0, True),
)


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_number(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _pattern(num_layers: int, attention_at: list[int], default: str, m2rnn_at: list[int] = ()) -> list[str]:
    mixers = [default] * num_layers
    for i in m2rnn_at:
        mixers[i] = "m2rnn"
    for i in attention_at:
        mixers[i] = "full_attention"
    return mixers


def _paper_400m(default: str, m2rnn_at: list[int] = ()) -> dict[str, Any]:
    """The paper's 400M dense models: NoPE MHA at layers 4, 12, 20, tied embeddings."""
    return dict(
        vocab_size=100352, hidden_size=1024, intermediate_size=2752, num_hidden_layers=24,
        mixer_types=_pattern(24, [4, 12, 20], default, m2rnn_at),
        m2rnn_num_v_heads=84, m2rnn_num_forget_heads=84, m2rnn_num_weight_heads=84, m2rnn_num_gate_heads=84,
        linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=256, linear_value_head_dim=512,
        num_attention_heads=16, num_key_value_heads=16, head_dim=64, rope_parameters=None,
        bos_token_id=100257, eos_token_id=100257, pad_token_id=100256, tie_word_embeddings=True,
    )


def _paper_7b(default: str, m2rnn_at: list[int] = ()) -> dict[str, Any]:
    """The 7B MoE models: 128 experts top-8 (intermediate 256) + one ungated shared expert (1024) in every layer."""
    return dict(
        vocab_size=100352, hidden_size=1536, intermediate_size=1024, num_hidden_layers=40,
        mixer_types=_pattern(40, [4, 12, 20, 28, 36], default, m2rnn_at),
        m2rnn_num_v_heads=132, m2rnn_num_forget_heads=132, m2rnn_num_weight_heads=132, m2rnn_num_gate_heads=132,
        linear_num_key_heads=3, linear_num_value_heads=3, linear_key_head_dim=256, linear_value_head_dim=512,
        num_attention_heads=24, num_key_value_heads=24, head_dim=64, rope_parameters=None,
        num_experts=128, num_experts_per_tok=8, moe_intermediate_size=256, norm_topk_prob=True,
        shared_expert_intermediate_size=1024, shared_expert_gated=False, router_aux_loss_coef=0.001,
        bos_token_id=100257, eos_token_id=100257, pad_token_id=100256, tie_word_embeddings=True,
    )


def _tiny() -> dict[str, Any]:
    """A few hundred thousand parameters with every mixer, GQA, RoPE, qk-norm, an output gate and one MoE layer; its
    vocabulary and special ids are those of the byte-level tokenizer `m2rnn.tokenization` (260 ids; pad 0, bos 1, eos 2)."""
    return dict(
        vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        mixer_types=["m2rnn", "gated_deltanet", "full_attention", "m2rnn"],
        m2rnn_key_head_dim=16, m2rnn_value_head_dim=8, m2rnn_num_q_heads=1, m2rnn_num_k_heads=1,
        m2rnn_num_v_heads=4, m2rnn_num_forget_heads=4, m2rnn_num_weight_heads=4, m2rnn_num_gate_heads=4,
        linear_num_key_heads=1, linear_num_value_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        attention_output_gate=True, attention_qk_norm=True,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
        shared_expert_gated=True, mlp_only_layers=[0, 1, 2],
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )


_PRESETS = {
    "tiny": _tiny,
    "m2rnn-400m": lambda: _paper_400m("m2rnn") | {"mixer_types": ["m2rnn"] * 24},
    "hybrid-m2rnn-400m": lambda: _paper_400m("m2rnn"),
    "hybrid-gdn-400m": lambda: _paper_400m("gated_deltanet"),
    "hybrid-gdn-m2rnn-1l-400m": lambda: _paper_400m("gated_deltanet", [0]),
    "hybrid-gdn-m2rnn-3l-400m": lambda: _paper_400m("gated_deltanet", [3, 11, 19]),
    "hybrid-m2rnn-7b": lambda: _paper_7b("m2rnn"),
    "hybrid-gdn-7b": lambda: _paper_7b("gated_deltanet"),
    "hybrid-gdn-m2rnn-1l-7b": lambda: _paper_7b("gated_deltanet", [0]),
    "hybrid-gdn-m2rnn-5l-7b": lambda: _paper_7b("gated_deltanet", [3, 11, 19, 27, 35]),
}
