"""M2RNN hybrid models for transformers: M2RNN, Gated DeltaNet and softmax-attention layers in one pre-norm decoder.

Read top to bottom: the MLPs (SwiGLU and mixture of experts), the decoder layer (one mixer and one MLP), the
pretrained base (initialisation, strict loading, saving), then the model and the causal LM. The mixers and norms
live in `mixers_m2rnn`, the caches in `cache_m2rnn`, the input checks in `inputs_m2rnn` and the recurrences in
`m2rnn.kernels`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, StaticCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask, create_recurrent_attention_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .cache_m2rnn import M2RNNCache, M2RNNStaticCache, TokenCounterMixin, check_cache
from .configuration_m2rnn import M2RNNConfig
from .inputs_m2rnn import (
    check_attention_mask,
    check_inputs,
    cu_seqlens_from_position_ids,
    embed_ids,
    one_cache,
    position_ids_from_cu_seqlens,
)
from .kernels import check_cu_seqlens
from .losses import fused_linear_cross_entropy, register_with_liger_where_it_runs
from .mixers_m2rnn import (
    M2RNNAttention,
    M2RNNGatedDeltaNet,
    M2RNNMixer,
    M2RNNRMSNorm,
    M2RNNRotaryEmbedding,
    RecurrentMixer,
    real_positions,
)

# transformers 5.24 renamed the cache argument and output field `past_key_values` to `cache` (the old name is
# deprecated until 5.40); outputs are built with the field the installed version declares, so neither warns.
_CACHE_FIELD = "cache" if "cache" in MoeModelOutputWithPast.__dataclass_fields__ else "past_key_values"


# ---------------------------------------------------------------------------------------------------------------
# MLPs
# ---------------------------------------------------------------------------------------------------------------
class M2RNNMLP(nn.Module):
    """SwiGLU: down_proj(act(gate_proj x) ⊙ up_proj x)."""

    def __init__(self, config: M2RNNConfig, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class M2RNNTopKRouter(nn.Module):
    """Softmax over all experts in fp32, keep the top k (renormalised when `norm_topk_prob`)."""

    def __init__(self, config: M2RNNConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.zeros(config.num_experts, config.hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        router_logits = F.linear(hidden_states, self.weight)
        probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
        top_weights, top_experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True)
        return router_logits, top_weights.to(hidden_states.dtype), top_experts


class M2RNNSparseMoeBlock(nn.Module):
    """Routed SwiGLU experts plus an optional shared expert (with an optional sigmoid gate).

    Eager calls run each routed expert on its own tokens (`experts_sparse`); while compiling, capturing a CUDA graph
    or when called with `dense_moe_dispatch=True` (`m2rnn.generation` passes it in its decode step), the sync-free
    `experts_dense` gives the same sum.
    """

    def __init__(self, config: M2RNNConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.gate = M2RNNTopKRouter(config)
        self.experts = nn.ModuleList(M2RNNMLP(config, config.moe_intermediate_size) for _ in range(self.num_experts))
        self.shared_expert = (
            M2RNNMLP(config, config.shared_expert_intermediate_size) if config.shared_expert_intermediate_size else None
        )
        self.shared_expert_gate = (
            nn.Linear(config.hidden_size, 1, bias=False)
            if self.shared_expert is not None and config.shared_expert_gated
            else None
        )

    def forward(self, hidden_states: torch.Tensor, dense_moe_dispatch: bool = False) -> torch.Tensor:
        shape = hidden_states.shape
        tokens = hidden_states.reshape(-1, shape[-1])
        _, top_weights, top_experts = self.gate(tokens)
        if dense_moe_dispatch or _must_avoid_host_sync():
            output = self.experts_dense(tokens, top_weights, top_experts)
        else:
            output = self.experts_sparse(tokens, top_weights, top_experts)
        if self.shared_expert is not None:
            shared = self.shared_expert(tokens)
            if self.shared_expert_gate is not None:
                shared = shared * torch.sigmoid(self.shared_expert_gate(tokens))
            output = output + shared
        return output.reshape(shape)

    def experts_sparse(self, tokens: torch.Tensor, top_weights: torch.Tensor, top_experts: torch.Tensor) -> torch.Tensor:
        """Each routed expert on its own tokens only. Reads the routing on the host (`.tolist()`), so eager only.
        While training, an expert that got no token still runs (on zero tokens): its parameters join the graph
        with zero gradients, so data-parallel engines (DDP) see every parameter used on every process."""
        output = torch.zeros_like(tokens)
        every_expert = self.training and torch.is_grad_enabled()
        for expert_idx in range(self.num_experts) if every_expert else top_experts.unique().tolist():
            token_idx, slot = torch.where(top_experts == expert_idx)
            expert_out = self.experts[expert_idx](tokens[token_idx]) * top_weights[token_idx, slot, None]
            output.index_add_(0, token_idx, expert_out.to(output.dtype))
        return output

    def experts_dense(self, tokens: torch.Tensor, top_weights: torch.Tensor, top_experts: torch.Tensor) -> torch.Tensor:
        """The same sum without a host sync: every expert runs on every token and tokens that did not route to it
        get weight 0. Static shapes, so it compiles with `fullgraph=True` and can be captured in a CUDA graph; it costs
        `num_experts / top_k` times the expert FLOPs (and reads every expert's weights), so it is used only while
        compiling or capturing. Experts are added in ascending order, as `experts_sparse` does."""
        combine = torch.zeros(
            tokens.shape[0], self.num_experts, dtype=top_weights.dtype, device=tokens.device
        ).scatter(1, top_experts, top_weights)
        output = torch.zeros_like(tokens)
        for expert_idx, expert in enumerate(self.experts):
            output = output + (expert(tokens) * combine[:, expert_idx, None]).to(output.dtype)
        return output


def _must_avoid_host_sync() -> bool:
    """True while torch.compile traces or a CUDA graph is being captured: no `.tolist()`/`.item()` allowed then."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def load_balancing_loss(router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int) -> torch.Tensor:
    """Switch-Transformer auxiliary loss: E · Σ_e (share of routed slots to e) · (mean router prob of e)."""
    logits = torch.cat([layer_logits.reshape(-1, num_experts) for layer_logits in router_logits], dim=0)
    probs = F.softmax(logits, dim=-1, dtype=torch.float32)
    _, selected = torch.topk(probs, top_k, dim=-1)
    routed_share = F.one_hot(selected, num_experts).float().sum(dim=1).mean(dim=0) / top_k
    return num_experts * torch.sum(routed_share * probs.mean(dim=0))


# ---------------------------------------------------------------------------------------------------------------
# Decoder layer
# ---------------------------------------------------------------------------------------------------------------
_MIXERS = {"m2rnn": M2RNNMixer, "gated_deltanet": M2RNNGatedDeltaNet, "full_attention": M2RNNAttention}


class M2RNNDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: x + mixer(norm(x)), then x + mlp(norm(x)).

    Attention layers with `attention_block_norm="post"` (OLMo-hybrid) normalise the sublayer outputs instead:
    x + input_layernorm(mixer(x)), then x + post_attention_layernorm(mlp(x)).
    """

    def __init__(self, config: M2RNNConfig, layer_idx: int):
        super().__init__()
        self.mixer_type = config.mixer_types[layer_idx]
        self.post_norm = self.mixer_type == "full_attention" and config.attention_block_norm == "post"
        self.input_layernorm = M2RNNRMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_zero_centered)
        self.mixer = _MIXERS[self.mixer_type](config, layer_idx)
        self.post_attention_layernorm = M2RNNRMSNorm(
            config.hidden_size, config.rms_norm_eps, config.norm_zero_centered
        )
        self.is_moe = config.is_moe_layer(layer_idx)
        if self.is_moe:
            self.mlp = M2RNNSparseMoeBlock(config)
        else:
            self.mlp = M2RNNMLP(config, config.intermediate_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cu_seqlens: torch.Tensor | None = None,
        dense_moe_dispatch: bool = False,
        **kwargs: Any,
    ) -> torch.Tensor:
        mlp_kwargs = {"dense_moe_dispatch": dense_moe_dispatch} if self.is_moe else {}
        residual = hidden_states
        if not self.post_norm:
            hidden_states = self.input_layernorm(hidden_states)
        if self.mixer_type == "full_attention":
            hidden_states, _ = self.mixer(
                hidden_states, attention_mask=attention_mask, past_key_values=past_key_values,
                position_embeddings=position_embeddings, **kwargs,
            )
        else:
            hidden_states = self.mixer(
                hidden_states, attention_mask=attention_mask, past_key_values=past_key_values, cu_seqlens=cu_seqlens
            )
        if self.post_norm:
            hidden_states = residual + self.input_layernorm(hidden_states)
            return hidden_states + self.post_attention_layernorm(self.mlp(hidden_states, **mlp_kwargs))
        hidden_states = residual + hidden_states
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states), **mlp_kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Pretrained base: initialisation, strict loading, saving
# ---------------------------------------------------------------------------------------------------------------
class M2RNNPreTrainedModel(PreTrainedModel):
    config: M2RNNConfig
    config_class = M2RNNConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["M2RNNDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]  # the cache's name before / from transformers 5.24
    _supports_flash_attn = True
    _supports_sdpa = True
    _is_stateful = True
    _keep_in_fp32_modules_strict = ["A_log", "dt_bias"]
    _can_record_outputs = {
        "router_logits": OutputRecorder(M2RNNTopKRouter, index=0),
        "hidden_states": M2RNNDecoderLayer,
        "attentions": OutputRecorder(M2RNNAttention, index=1),
    }

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The paper's init: N(0, 0.02) everywhere, residual-branch outputs scaled by 1/√(2L), state weights
        W = I, D = 1."""
        config = self.config
        std = config.initializer_range
        output_std = std / math.sqrt(2 * config.num_hidden_layers)
        if isinstance(module, (nn.Linear, nn.Conv1d)):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, M2RNNRMSNorm):
            (init.zeros_ if module.zero_centered else init.ones_)(module.weight)
        elif isinstance(module, M2RNNTopKRouter):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, M2RNNRotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq(module.inv_freq.device))

        for name in ("out_proj", "o_proj", "down_proj"):
            if isinstance(getattr(module, name, None), nn.Linear):
                init.normal_(getattr(module, name).weight, mean=0.0, std=output_std)
        if isinstance(module, RecurrentMixer) and module.A_log is not None:
            self._init_decay_gate(module.A_log, module.dt_bias)
        if isinstance(module, M2RNNMixer):
            self._init_m2rnn_options(module)
            if module.D is not None:
                init.ones_(module.D)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *model_args: Any, strict: bool = True, **kwargs: Any):
        """transformers' `from_pretrained`, strict by default: weights the model expects but the checkpoint lacks,
        weights the model has no place for, and weights of another shape raise a `ValueError` naming them (transformers
        alone logs a LOAD REPORT and leaves random weights in place). `strict=False` opts out and restores
        transformers' behaviour; `ignore_mismatched_sizes=True` allows only shape mismatches (reinitialised)."""
        if not strict:
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        return_info = kwargs.pop("output_loading_info", False)
        allow_mismatch = kwargs.pop("ignore_mismatched_sizes", False)
        model, info = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
        )
        unexpected = info["unexpected_keys"]
        if not hasattr(model, "lm_head"):  # the base model of a causal-LM checkpoint leaves its head behind
            unexpected = {key for key in unexpected if not key.startswith("lm_head.")}
        problems = [
            f"{label} {_some(keys)}"
            for label, keys in (
                ("missing from the checkpoint:", info["missing_keys"]),
                ("in the checkpoint but not in the model:", unexpected),
            )
            if keys
        ]
        if info["mismatched_keys"] and not allow_mismatch:
            shapes = [f"{key} {tuple(saved)} vs model {tuple(model_shape)}" for key, saved, model_shape in info["mismatched_keys"]]
            problems.append(f"of another shape: {_some(shapes)}")
        if problems:
            raise ValueError(
                f"{cls.__name__}.from_pretrained({str(pretrained_model_name_or_path)!r}): weights "
                + "; weights ".join(problems)
                + ". The checkpoint does not match this configuration; pass strict=False to load it anyway "
                "(those weights are then freshly initialised or dropped)"
            )
        return (model, info) if return_info else model

    def save_pretrained(self, save_directory: Any, *args: Any, **kwargs: Any) -> None:
        """transformers' save, plus what makes the folder load anywhere with `trust_remote_code=True`: the flat code
        files, `auto_map` and a model card (`m2rnn.remote_code`)."""
        try:  # the m2rnn package; absent where the flat trust_remote_code copy of this file runs
            from m2rnn.remote_code import save_pretrained_with_hub_files
        except ImportError:
            return super().save_pretrained(save_directory, *args, **kwargs)
        return save_pretrained_with_hub_files(self, super().save_pretrained, save_directory, *args, **kwargs)

    def _init_m2rnn_options(self, module: M2RNNMixer) -> None:
        """The state weight W (`m2rnn_state_weight_init`), `in_proj` (`m2rnn_in_proj_init_std`) and the conv
        (`m2rnn_conv_init`)."""
        config = self.config
        heads, value_dim = module.state_weight.shape[:2]
        if config.m2rnn_state_weight_init == "identity":
            init.copy_(module.state_weight, torch.eye(value_dim).expand(heads, value_dim, value_dim))
        elif config.m2rnn_state_weight_init == "orthogonal":
            q, r = torch.linalg.qr(torch.randn(heads, value_dim, value_dim, dtype=torch.float64))
            q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)  # Haar-uniform
            init.copy_(module.state_weight, q.to(module.state_weight.dtype))
        else:
            init.normal_(module.state_weight, mean=0.0, std=value_dim**-0.5)
        if config.m2rnn_in_proj_init_std is not None:
            init.normal_(module.in_proj.weight, mean=0.0, std=config.m2rnn_in_proj_init_std)
        if config.m2rnn_conv_init == "identity":  # the last tap multiplies the current token
            identity = torch.zeros(module.conv1d.weight.shape)
            identity[..., -1] = 1.0
            init.copy_(module.conv1d.weight, identity)

    def _init_decay_gate(self, a_log: torch.Tensor, dt_bias: torch.Tensor) -> None:
        """A ~ U(A_init_range), dt ~ logU(dt_min, dt_max) floored, dt_bias = softplus⁻¹(dt)."""
        config = self.config
        low, high = config.m2rnn_A_init_range
        a = torch.empty(a_log.shape, dtype=torch.float32).uniform_(low, high).clamp_min(1e-4)
        init.copy_(a_log, a.log())
        log_dt = torch.empty(dt_bias.shape, dtype=torch.float32).uniform_(
            math.log(config.m2rnn_dt_min), math.log(config.m2rnn_dt_max)
        )
        dt = log_dt.exp().clamp_min(config.m2rnn_dt_init_floor)
        init.copy_(dt_bias, dt + torch.log(-torch.expm1(-dt)))


def _some(names: Any, limit: int = 8) -> str:
    """Up to `limit` sorted names, and how many more."""
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------
MODEL_BUILT_HOOKS: list[Callable[[], None]] = []
"""Called, without arguments, each time a model is built: the installed package registers its optional integrations
here (PEFT's default LoRA targets, `m2rnn.training`). The flat Hub copy of this file has none."""


class M2RNNModel(M2RNNPreTrainedModel):
    def __init__(self, config: M2RNNConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(M2RNNDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = M2RNNRMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_zero_centered)
        uses_rope = config.rope_parameters is not None and "full_attention" in config.mixer_types
        self.rotary_emb = M2RNNRotaryEmbedding(config) if uses_rope else None
        self.gradient_checkpointing = False
        self.post_init()
        for hook in MODEL_BUILT_HOOKS:
            hook()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | dict | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cache: Cache | None = None,
        dense_moe_dispatch: bool = False,
        **kwargs: Any,
    ) -> MoeModelOutputWithPast:
        """The decoder stack. The cache may be passed as `cache` (transformers >= 5.24) or `past_key_values`; the
        output carries it under the name the installed transformers reads back. `dense_moe_dispatch=True` runs the
        MoE blocks through their sync-free `experts_dense` (what a CUDA-graph capture needs) in this call."""
        past_key_values = one_cache(cache, past_key_values)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("M2RNNModel: pass exactly one of `input_ids` and `inputs_embeds`")
        check_inputs(input_ids, inputs_embeds)
        if inputs_embeds is None:
            inputs_embeds = embed_ids(self.embed_tokens, input_ids)
        seq_len = inputs_embeds.shape[1]
        if past_key_values is not None:
            check_cache(past_key_values, self.config)
        if isinstance(attention_mask, torch.Tensor):
            check_attention_mask(attention_mask, inputs_embeds.shape[0], seq_len, past_key_values)

        cu_seqlens = kwargs.get("cu_seq_lens_q")
        if cu_seqlens is None and past_key_values is None and not isinstance(attention_mask, torch.Tensor):
            cu_seqlens = cu_seqlens_from_position_ids(position_ids)
        if cu_seqlens is not None:  # packed documents never read or write a cache
            if inputs_embeds.shape[0] != 1:
                raise ValueError(
                    f"M2RNNModel: cu_seq_lens_q describes one packed row, but the batch has {inputs_embeds.shape[0]} rows"
                )
            cu_seqlens, use_cache, past_key_values = cu_seqlens.to(torch.int32), False, None
            if "cu_seq_lens_q" in kwargs:  # the layers trust it (no host sync each): checked here, once
                check_cu_seqlens(cu_seqlens, seq_len, inputs_embeds.device, "M2RNNModel (cu_seq_lens_q)")
            if position_ids is None:  # restarting positions keep RoPE and the attention mask within each document
                position_ids = position_ids_from_cu_seqlens(cu_seqlens, seq_len)

        if use_cache and past_key_values is None:
            past_key_values = M2RNNCache(config=self.config)
        if position_ids is None:  # positions only matter to attention layers; recurrent-only caches may not count
            knows_length = isinstance(past_key_values, TokenCounterMixin) or "full_attention" in self.config.layer_types
            past_seen = past_key_values.get_seq_length() if past_key_values is not None and knows_length else 0
            position_ids = torch.arange(seq_len, device=inputs_embeds.device).unsqueeze(0) + past_seen

        if isinstance(attention_mask, dict):
            masks = attention_mask
        else:
            # the cache goes by position: its keyword is `past_key_values` before transformers 5.24, `cache` after
            mask_args = (self.config, inputs_embeds, attention_mask, past_key_values)
            masks = {
                "full_attention": (
                    create_causal_mask(*mask_args, position_ids=position_ids)
                    if "full_attention" in self.config.layer_types else None
                ),
                "linear_attention": create_recurrent_attention_mask(*mask_args, position_ids=position_ids),
            }
        # padded positions hold zeros before every layer, so nothing there (NaN included) reaches a real token: an
        # attention weight of exactly 0 times NaN is still NaN
        keep = real_positions(masks.get("linear_attention"), seq_len)

        position_embeddings = self.rotary_emb(inputs_embeds, position_ids) if self.rotary_emb is not None else None
        hidden_states = inputs_embeds
        for layer, layer_type in zip(self.layers, self.config.layer_types):
            if keep is not None:
                hidden_states = hidden_states.masked_fill(~keep[..., None], 0.0)
            hidden_states = layer(
                hidden_states,
                attention_mask=masks[layer_type],
                past_key_values=past_key_values,
                position_embeddings=position_embeddings,
                cu_seqlens=cu_seqlens,
                position_ids=position_ids,
                dense_moe_dispatch=dense_moe_dispatch,
                **kwargs,
            )
        if isinstance(past_key_values, TokenCounterMixin):
            past_key_values.advance(seq_len)
        return MoeModelOutputWithPast(last_hidden_state=self.norm(hidden_states), **{_CACHE_FIELD: past_key_values})


class M2RNNForCausalLM(M2RNNPreTrainedModel, GenerationMixin):
    # training forwards with labels compute the loss without logits (`m2rnn.losses.apply_liger_kernel_to_m2rnn`)
    fused_linear_cross_entropy: bool = False
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: M2RNNConfig):
        super().__init__(config)
        self.model = M2RNNModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        register_with_liger_where_it_runs()  # so that `Trainer(use_liger_kernel=True)` knows this model type

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs: dict, generation_mode: Any, batch_size: int, max_cache_length: int
    ):
        """As `GenerationMixin`, but an attention-free model gets an `M2RNNCache` (or, with
        `cache_implementation="static"`, an `M2RNNStaticCache`), which can tell its length."""
        result = super()._prepare_cache_for_generation(
            generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
        )
        name = "cache" if "cache" in model_kwargs else "past_key_values"  # transformers >= 5.24: "cache"
        cache = model_kwargs.get(name)
        if (
            cache is not None
            and not isinstance(cache, TokenCounterMixin)
            and not getattr(cache, "_is_user_defined", False)
            and "full_attention" not in self.config.mixer_types
        ):
            offloading = getattr(cache, "offloading", False)  # cache_implementation="offloaded"
            if isinstance(cache, StaticCache):
                model_kwargs[name] = M2RNNStaticCache(
                    config=self.config, max_cache_len=max_cache_length, offloading=offloading
                )
            elif type(cache) is DynamicCache:
                model_kwargs[name] = M2RNNCache(config=self.config, offloading=offloading)
        return result

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> MoeCausalLMOutputWithPast:
        """Causal-LM forward. `labels` are shifted inside; `num_items_in_batch` (from Trainer) reaches the loss.
        The cache may be passed as `cache` (transformers >= 5.24) or `past_key_values` (older); the output carries
        it as the field the installed transformers declares (`cache`, or `past_key_values` before 5.24)."""
        output_router_logits = (
            output_router_logits if output_router_logits is not None else self.config.output_router_logits
        )
        output_router_logits = output_router_logits and self.config.num_experts > 0
        skip_logits = kwargs.pop("skip_logits", None)  # Trainer's use_liger_kernel evaluation passes it
        skip_logits = self.training if skip_logits is None else skip_logits
        outputs: MoeModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=one_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = loss = aux_loss = None
        if self.fused_linear_cross_entropy and labels is not None and skip_logits:
            loss = fused_linear_cross_entropy(hidden_states[:, keep, :], self.lm_head.weight, labels, **kwargs)
        else:
            logits = self.lm_head(hidden_states[:, keep, :])
            if labels is not None:
                loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        if output_router_logits and outputs.router_logits:
            aux_loss = load_balancing_loss(outputs.router_logits, self.config.num_experts, self.config.num_experts_per_tok)
            if loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device)
        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
            **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD)},
        )


__all__ = [
    "M2RNNCache",
    "M2RNNStaticCache",
    "M2RNNForCausalLM",
    "M2RNNModel",
    "M2RNNPreTrainedModel",
]
