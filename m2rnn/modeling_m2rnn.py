"""M2RNN hybrid models for transformers: M2RNN, Gated DeltaNet and softmax-attention layers in one pre-norm decoder.

Read top to bottom: norms and rotary embeddings, the short convolution shared by the recurrent mixers, the three
mixers (M2RNN, Gated DeltaNet, attention), the MLPs (SwiGLU and mixture of experts), the decoder layer, the cache,
and the models. The recurrences themselves live in `m2rnn.kernels` behind one dispatch function per op.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, LinearAttentionCacheLayerMixin, StaticCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask, create_recurrent_attention_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_m2rnn import M2RNNConfig
from .kernels import (
    causal_conv1d,
    causal_conv1d_step,
    check_cu_seqlens,
    expand_heads,
    gated_delta_rule,
    gated_delta_rule_step,
    m2rnn_decode_step,
    m2rnn_recurrence,
)

# transformers 5.24 renamed the cache argument and output field `past_key_values` to `cache` (the old name is
# deprecated until 5.40); outputs are built with the field the installed version declares, so neither warns.
_CACHE_FIELD = "cache" if "cache" in MoeModelOutputWithPast.__dataclass_fields__ else "past_key_values"

# ---------------------------------------------------------------------------------------------------------------
# Norms and rotary embeddings
# ---------------------------------------------------------------------------------------------------------------
class M2RNNRMSNorm(nn.Module):
    """RMSNorm computed in float32: `x̂ · w`, or `x̂ · (1 + w)` with a zero-centred weight (Qwen)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, zero_centered: bool = False):
        super().__init__()
        self.zero_centered = zero_centered
        self.weight = nn.Parameter(torch.zeros(hidden_size) if zero_centered else torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        hidden_states = hidden_states.float()
        hidden_states = hidden_states * torch.rsqrt(hidden_states.pow(2).mean(-1, keepdim=True) + self.eps)
        weight = 1.0 + self.weight.float() if self.zero_centered else self.weight.float()
        return (weight * hidden_states).to(dtype)


class M2RNNRotaryEmbedding(nn.Module):
    """RoPE on the first `rotary_dim` dims of each head; `inv_freq` is a non-persistent buffer set in `_init_weights`."""

    inv_freq: torch.Tensor

    def __init__(self, config: M2RNNConfig):
        super().__init__()
        factor = config.rope_parameters.get("partial_rotary_factor", 1.0)
        self.rotary_dim = int(config.head_dim * factor)
        self.rope_theta = float(config.rope_parameters["rope_theta"])
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.float32, device=device) / self.rotary_dim
        return 1.0 / (self.rope_theta**exponents)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.float().to(x.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary_pos_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first `cos.shape[-1]` dims of x (B, heads, S, D); the rest pass through."""
    rotary_dim = cos.shape[-1]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rotated, passthrough = x[..., :rotary_dim], x[..., rotary_dim:]
    rotated = rotated * cos + _rotate_half(rotated) * sin
    return torch.cat((rotated, passthrough), dim=-1)


# ---------------------------------------------------------------------------------------------------------------
# The short convolution of the recurrent mixers, with its cache
# ---------------------------------------------------------------------------------------------------------------
def short_convolution(
    x: torch.Tensor,
    weight: torch.Tensor,
    layer_idx: int,
    cache: Cache | None,
    cu_seqlens: torch.Tensor | None,
    decoding: bool,
) -> torch.Tensor:
    """Depthwise causal conv + SiLU over x (B, S, C), reading and updating the layer's conv state in `cache`.

    The cache keeps the last `Kc` raw inputs (B, C, Kc). A 1-token decode step updates it in place; anything else
    (prefill, chunked prefill) convolves the cached columns followed by the new ones and keeps the last S outputs.
    """
    kernel_size = weight.shape[-1]
    if decoding:
        return causal_conv1d_step(x[:, 0], cache.get_conv_state(layer_idx), weight).unsqueeze(1)
    columns = x.transpose(1, 2)
    if cache is not None:
        columns = cache.update_conv_state(columns, layer_idx, conv_kernel_size=kernel_size)
    out = causal_conv1d(columns, weight, cu_seqlens=cu_seqlens, check_values=False)  # checked once per forward
    return out[..., -x.shape[1] :].transpose(1, 2)


def _cache_mode(cache: Cache | None, layer_idx: int, seq_len: int) -> tuple[bool, bool]:
    """(resuming, decoding): the layer continues from cached states; this is a 1-token step that updates them in place."""
    resuming = cache is not None and cache.has_previous_state(layer_idx)
    decoding = resuming and seq_len == 1 and not cache.is_recording_past(layer_idx)
    return resuming, decoding


def _mask_padding(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Zero padded positions so that nothing they carry (NaN included) reaches a conv or a recurrent state."""
    keep = _keep_mask(attention_mask, hidden_states.shape[1])
    if keep is None:
        return hidden_states
    return hidden_states.masked_fill(~keep[..., None], 0.0)


def _keep_mask(attention_mask: torch.Tensor | None, seq_len: int) -> torch.Tensor | None:
    """Boolean (B, S) of real (non-padded) positions, or None."""
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    return attention_mask[:, -seq_len:].bool()


# ---------------------------------------------------------------------------------------------------------------
# The M2RNN mixer (the paper's layer)
# ---------------------------------------------------------------------------------------------------------------
class M2RNNMixer(nn.Module):
    """Matrix-to-matrix non-linear RNN layer (arXiv 2603.14360), as the published models were trained.

    in_proj → [q | k | v | x_f | g]; depthwise causal conv (no bias) + SiLU on [q | k | v];
    f = exp(-exp(A_log) · softplus(x_f + dt_bias)) in fp32; per head n: Z = tanh(H W_n + k vᵀ),
    H = f H + (1 - f) Z, y = qᵀ H; y += D ⊙ v; y ⊙= SiLU(g); RMSNorm over the whole N·V vector; out_proj.
    """

    def __init__(self, config: M2RNNConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.key_dim = config.m2rnn_key_head_dim
        self.value_dim = config.m2rnn_value_head_dim
        self.num_heads = config.m2rnn_num_heads
        self.num_q_heads = config.m2rnn_num_q_heads
        self.num_k_heads = config.m2rnn_num_k_heads
        self.num_v_heads = config.m2rnn_num_v_heads
        self.num_forget_heads = config.m2rnn_num_forget_heads
        self.num_gate_heads = config.m2rnn_num_gate_heads
        self.gradient_clipping = config.m2rnn_gradient_clipping
        self.use_residual = config.m2rnn_use_residual
        self.use_forget_gate = config.m2rnn_use_forget_gate
        self.conv_dim = (self.num_q_heads + self.num_k_heads) * self.key_dim + self.num_v_heads * self.value_dim
        self.forget_dim = self.num_forget_heads if self.use_forget_gate else 0
        gate_dim = self.num_gate_heads * self.value_dim
        output_dim = self.num_heads * self.value_dim

        self.in_proj = nn.Linear(config.hidden_size, self.conv_dim + self.forget_dim + gate_dim, bias=False)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, config.m2rnn_conv_kernel_size, groups=self.conv_dim, bias=False
        )
        self.A_log = nn.Parameter(torch.zeros(self.num_forget_heads)) if self.use_forget_gate else None
        self.dt_bias = nn.Parameter(torch.zeros(self.num_forget_heads)) if self.use_forget_gate else None
        self.state_weight = nn.Parameter(torch.zeros(config.m2rnn_num_weight_heads, self.value_dim, self.value_dim))
        self.D = nn.Parameter(torch.ones(self.num_heads, self.value_dim)) if self.use_residual else None
        self.norm = M2RNNRMSNorm(output_dim, eps=config.m2rnn_norm_eps)
        self.out_proj = nn.Linear(output_dim, config.hidden_size, bias=False)

    def forget_gate(self, x_f: torch.Tensor) -> torch.Tensor:
        """f = exp(-exp(A_log) · softplus(x_f + dt_bias)), in float32; f ≡ 0 without the gate."""
        if not self.use_forget_gate:
            return x_f.new_zeros(*x_f.shape[:-1], self.num_forget_heads, dtype=torch.float32)
        return torch.exp(-self.A_log.float().exp() * F.softplus(x_f.float() + self.dt_bias.float()))

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        cu_seqlens: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        batch, seq_len, _ = hidden_states.shape
        resuming, decoding = _cache_mode(past_key_values, self.layer_idx, seq_len)
        hidden_states = _mask_padding(hidden_states, attention_mask)

        qkv, x_f, gate = self.in_proj(hidden_states).split(
            [self.conv_dim, self.forget_dim, self.num_gate_heads * self.value_dim], dim=-1
        )
        qkv = short_convolution(
            qkv, self.conv1d.weight.squeeze(1), self.layer_idx, past_key_values, cu_seqlens, decoding
        )
        q, k, v = qkv.split(
            [self.num_q_heads * self.key_dim, self.num_k_heads * self.key_dim, self.num_v_heads * self.value_dim], -1
        )
        q = q.reshape(batch, seq_len, self.num_q_heads, self.key_dim)
        k = k.reshape(batch, seq_len, self.num_k_heads, self.key_dim)
        v = v.reshape(batch, seq_len, self.num_v_heads, self.value_dim)
        forget = self.forget_gate(x_f)
        keep = _keep_mask(attention_mask, seq_len)
        if keep is not None:  # f = 1 leaves the state untouched at padded positions
            forget = forget.masked_fill(~keep[..., None], 1.0)

        if decoding:
            state = past_key_values.get_recurrent_state(self.layer_idx)
            y = m2rnn_decode_step(q[:, 0], k[:, 0], v[:, 0], self.state_weight, forget[:, 0], state).unsqueeze(1)
        elif cu_seqlens is not None:  # packed documents: (1, T, ...) rows become the op's (T, ...) layout
            y, _ = m2rnn_recurrence(
                q[0], k[0], v[0], self.state_weight, forget[0], cu_seqlens=cu_seqlens,
                gradient_clipping=self.gradient_clipping if self.training else None, check_values=False,
            )
            y = y.unsqueeze(0)
        else:
            initial_state = past_key_values.get_recurrent_state(self.layer_idx) if resuming else None
            y, final_state = m2rnn_recurrence(
                q, k, v, self.state_weight, forget, initial_state,
                gradient_clipping=self.gradient_clipping if self.training else None, check_values=False,
            )
            if past_key_values is not None:
                past_key_values.update_recurrent_state(final_state, self.layer_idx)

        if self.use_residual:
            y = y + self.D * expand_heads(v, self.num_heads, 2)
        y = y * F.silu(expand_heads(gate.reshape(batch, seq_len, self.num_gate_heads, self.value_dim), self.num_heads, 2))
        y = self.norm(y.reshape(batch, seq_len, self.num_heads * self.value_dim))
        return self.out_proj(y)


# ---------------------------------------------------------------------------------------------------------------
# The Gated DeltaNet mixer (Qwen3.5 layout)
# ---------------------------------------------------------------------------------------------------------------
class M2RNNGatedDeltaNet(nn.Module):
    """Gated DeltaNet (gdn-checkpoint-formats.md §1): l2-normed q, k; S ← exp(g) S; S ← S + k (β(v − Sᵀk))ᵀ; o = Sᵀq;
    out = out_proj(RMSNorm_per_head(o) ⊙ SiLU(z)), or out_proj(RMSNorm_per_head(o ⊙ SiLU(z))) when
    `linear_gate_before_norm`; β = sigmoid(b), doubled when `linear_allow_neg_eigval`."""

    def __init__(self, config: M2RNNConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_k_heads = config.linear_num_key_heads
        self.num_v_heads = config.linear_num_value_heads
        self.key_dim = config.linear_key_head_dim
        self.value_dim = config.linear_value_head_dim
        self.beta_scale = 2.0 if config.linear_allow_neg_eigval else 1.0
        self.gate_before_norm = config.linear_gate_before_norm
        key_total, value_total = self.num_k_heads * self.key_dim, self.num_v_heads * self.value_dim
        self.conv_dim = 2 * key_total + value_total
        decay, output_gate = config.linear_use_decay_gate, config.linear_use_output_gate

        self.in_proj_qkv = nn.Linear(config.hidden_size, self.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(config.hidden_size, value_total, bias=False) if output_gate else None
        self.in_proj_b = nn.Linear(config.hidden_size, self.num_v_heads, bias=False)
        self.in_proj_a = nn.Linear(config.hidden_size, self.num_v_heads, bias=False) if decay else None
        self.conv1d = (
            nn.Conv1d(self.conv_dim, self.conv_dim, config.linear_conv_kernel_dim, groups=self.conv_dim, bias=False)
            if config.linear_use_short_conv
            else None
        )
        self.A_log = nn.Parameter(torch.zeros(self.num_v_heads)) if decay else None
        self.dt_bias = nn.Parameter(torch.zeros(self.num_v_heads)) if decay else None
        norm_eps = config.linear_norm_eps if config.linear_norm_eps is not None else config.rms_norm_eps
        self.norm = M2RNNRMSNorm(self.value_dim, eps=norm_eps)
        self.out_proj = nn.Linear(value_total, config.hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        cu_seqlens: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        batch, seq_len, _ = hidden_states.shape
        resuming, decoding = _cache_mode(past_key_values, self.layer_idx, seq_len)
        hidden_states = _mask_padding(hidden_states, attention_mask)

        qkv = self.in_proj_qkv(hidden_states)
        # Without the short conv: a fixed width-1 identity filter, i.e. SiLU alone, which still marks the cache.
        conv_weight = self.conv1d.weight.squeeze(1) if self.conv1d is not None else qkv.new_ones(self.conv_dim, 1)
        qkv = short_convolution(qkv, conv_weight, self.layer_idx, past_key_values, cu_seqlens, decoding)
        q, k, v = qkv.split([self.num_k_heads * self.key_dim] * 2 + [self.num_v_heads * self.value_dim], dim=-1)
        q = q.reshape(batch, seq_len, self.num_k_heads, self.key_dim)
        k = k.reshape(batch, seq_len, self.num_k_heads, self.key_dim)
        v = v.reshape(batch, seq_len, self.num_v_heads, self.value_dim)
        beta = torch.sigmoid(self.in_proj_b(hidden_states).float())
        if self.beta_scale != 1.0:
            beta = beta * self.beta_scale
        if self.A_log is None:
            g = beta.new_zeros(beta.shape)
        else:
            g = -self.A_log.float().exp() * F.softplus(self.in_proj_a(hidden_states).float() + self.dt_bias.float())
        keep = _keep_mask(attention_mask, seq_len)
        if keep is not None:  # no decay and no write at padded positions
            g = g.masked_fill(~keep[..., None], 0.0)
            beta = beta.masked_fill(~keep[..., None], 0.0)

        if decoding:
            state = past_key_values.get_recurrent_state(self.layer_idx)
            o = gated_delta_rule_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], state).unsqueeze(1)
        else:
            initial_state = past_key_values.get_recurrent_state(self.layer_idx) if resuming else None
            o, final_state = gated_delta_rule(q, k, v, g, beta, initial_state, cu_seqlens=cu_seqlens, check_values=False)
            if past_key_values is not None:
                past_key_values.update_recurrent_state(final_state, self.layer_idx)

        if self.in_proj_z is None:
            o = self.norm(o)
        else:
            z = self.in_proj_z(hidden_states).reshape(batch, seq_len, self.num_v_heads, self.value_dim)
            o = self.norm(o * F.silu(z)) if self.gate_before_norm else self.norm(o) * F.silu(z)
        return self.out_proj(o.reshape(batch, seq_len, -1))


# ---------------------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------------------
def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with GQA on (B, heads, S, D) tensors; returns (B, S, heads, D) and the weights."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]]
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class M2RNNAttention(nn.Module):
    """Causal softmax attention: GQA, NoPE or (partial) RoPE on the first dims of each head, optional qk RMSNorm
    (per head, or over the whole projection) and sigmoid output gate (per head `[q_h | gate_h]` rows in `q_proj`)."""

    def __init__(self, config: M2RNNConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_kv_heads  # read by transformers' attention functions
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        self.output_gate = config.attention_output_gate
        q_out = self.num_heads * self.head_dim * (2 if self.output_gate else 1)
        self.q_proj = nn.Linear(config.hidden_size, q_out, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.attention_bias)
        self.qk_norm = config.attention_qk_norm
        if self.qk_norm is not None:
            full = self.qk_norm == "full"
            q_size = self.num_heads * self.head_dim if full else self.head_dim
            k_size = self.num_kv_heads * self.head_dim if full else self.head_dim
            self.q_norm = M2RNNRMSNorm(q_size, config.rms_norm_eps, config.norm_zero_centered)
            self.k_norm = M2RNNRMSNorm(k_size, config.rms_norm_eps, config.norm_zero_centered)
        else:
            self.q_norm = self.k_norm = None

    def _normalize_qk(self, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """qk RMSNorm on (B, S, heads, D): per head, or over each token's whole projection (`"full"`)."""
        if self.qk_norm == "full":
            return self.q_norm(query.flatten(-2)).view_as(query), self.k_norm(key.flatten(-2)).view_as(key)
        return self.q_norm(query), self.k_norm(key)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, seq_len, _ = hidden_states.shape
        query = self.q_proj(hidden_states).view(batch, seq_len, self.num_heads, -1)
        gate = None
        if self.output_gate:
            query, gate = query.chunk(2, dim=-1)
        key = self.k_proj(hidden_states).view(batch, seq_len, self.num_kv_heads, self.head_dim)
        value = self.v_proj(hidden_states).view(batch, seq_len, self.num_kv_heads, self.head_dim)
        if self.qk_norm is not None:
            query, key = self._normalize_qk(query, key)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        if position_embeddings is not None:
            cos, sin = position_embeddings
            query, key = apply_rotary_pos_emb(query, cos, sin), apply_rotary_pos_emb(key, cos, sin)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)

        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        output, weights = attention(
            self, query, key, value, attention_mask,
            dropout=self.config.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        output = output.reshape(batch, seq_len, -1)
        if gate is not None:
            output = output * torch.sigmoid(gate.reshape(batch, seq_len, -1))
        return self.o_proj(output), weights


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
    or when `dense_dispatch` is set (`m2rnn.generation` sets it around captured decode steps), the sync-free
    `experts_dense` gives the same sum.
    """

    dense_dispatch: bool = False

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

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        tokens = hidden_states.reshape(-1, shape[-1])
        _, top_weights, top_experts = self.gate(tokens)
        if self.dense_dispatch or _must_avoid_host_sync():
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
        """Each routed expert on its own tokens only. Reads the routing on the host (`.tolist()`), so eager only."""
        output = torch.zeros_like(tokens)
        for expert_idx in top_experts.unique().tolist():
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
        if config.is_moe_layer(layer_idx):
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
        **kwargs: Any,
    ) -> torch.Tensor:
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
            return hidden_states + self.post_attention_layernorm(self.mlp(hidden_states))
        hidden_states = residual + hidden_states
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


# ---------------------------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------------------------
class _TokenCounter:
    """Cache mixin that counts the tokens the model has fed it (`M2RNNModel.forward` adds each chunk's length).

    transformers asks the first attention layer of a cache for its length; a model made only of recurrent layers
    has none, so these caches answer from their own count instead.
    """

    seen_tokens: int = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if any(isinstance(layer, CacheLayerMixin) for layer in self.layers):
            return super().get_seq_length(layer_idx)
        return self.seen_tokens

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = 0


class M2RNNCache(_TokenCounter, DynamicCache):
    """`DynamicCache` that also counts the tokens it has seen.

    Hybrids with attention use a plain `DynamicCache` or `StaticCache`; `generate` switches to this class only for
    attention-free models.
    """

    def __init__(self, config: M2RNNConfig, **kwargs: Any):
        super().__init__(config=config, **kwargs)
        self.seen_tokens = 0


class M2RNNStaticCache(_TokenCounter, StaticCache):
    """`StaticCache` that also counts the tokens it has seen: what `generate(cache_implementation="static")` gives
    an attention-free model (preallocated conv and recurrent states updated in place, so decode can be compiled)."""

    def __init__(self, config: M2RNNConfig, max_cache_len: int, **kwargs: Any):
        super().__init__(config=config, max_cache_len=max_cache_len, **kwargs)
        self.seen_tokens = 0


def _check_cache(cache: Cache, config: M2RNNConfig) -> None:
    """Refuse a cache whose layers do not match the model's: a recurrent layer needs a conv/recurrent-state layer
    (`LinearAttentionLayer`), an attention layer a key/value layer. `DynamicCache()` without `config=` has neither."""
    if not isinstance(cache, Cache):
        raise TypeError(
            f"M2RNNModel: the cache must be a transformers `Cache`, got {type(cache).__name__} (tuples of past key "
            "values are not supported)"
        )
    expected = {"linear_attention": LinearAttentionCacheLayerMixin, "full_attention": CacheLayerMixin}
    layer_types = config.layer_types
    wrong = [
        i for i, layer_type in enumerate(layer_types)
        if i >= len(cache.layers) or not isinstance(cache.layers[i], expected[layer_type])
    ]
    if wrong or len(cache.layers) != len(layer_types):
        kinds = [type(layer).__name__ for layer in cache.layers]
        raise ValueError(
            f"M2RNNModel: the cache passed has layers {kinds or '[] (none yet)'}, but this model's layers are "
            f"{layer_types}. Build it with `DynamicCache(config=model.config)` (or `StaticCache(config=model.config, "
            "max_cache_len=...)`), or pass no cache and `use_cache=True`."
        )


# ---------------------------------------------------------------------------------------------------------------
# Models
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
        """The paper's init: N(0, 0.02) everywhere, residual-branch outputs scaled by 1/√(2L), W = I, D = 1."""
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
        if isinstance(module, (M2RNNMixer, M2RNNGatedDeltaNet)) and module.A_log is not None:
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
        """W (`m2rnn_state_weight_init`), `in_proj` (`m2rnn_in_proj_init_std`) and the conv (`m2rnn_conv_init`)."""
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


def _cu_seqlens_from_position_ids(position_ids: torch.Tensor | None) -> torch.Tensor | None:
    """Boundaries of packed documents in a (1, T) row whose positions restart at 0 (padding-free batches)."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1:
        return None
    starts = torch.nonzero(position_ids[0] == 0).flatten()
    if starts.numel() <= 1 and (starts.numel() == 0 or starts[0].item() == 0):
        return None
    total = torch.tensor([position_ids.shape[1]], device=position_ids.device)
    if starts[0].item() != 0:
        starts = torch.cat([starts.new_zeros(1), starts])
    return torch.cat([starts, total]).to(torch.int32)


def _position_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(1, T) positions restarting at 0 at every document start of `cu_seqlens` (padding-free batches)."""
    positions = torch.arange(total, device=cu_seqlens.device)
    document = torch.bucketize(positions, cu_seqlens[1:].long(), right=True)
    return (positions - cu_seqlens[:-1].long()[document]).unsqueeze(0)


def _one_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The cache under either of its names (`cache` from transformers 5.24 on, `past_key_values` before)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("M2RNNModel: pass the cache as `cache` or as `past_key_values`, not two different caches")
    return cache if cache is not None else past_key_values


def _check_inputs(input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> None:
    """(batch, seq_len) ids or (batch, seq_len, hidden) embeddings with at least one row and one token."""
    tensor, name, dims = (input_ids, "input_ids", 2) if input_ids is not None else (inputs_embeds, "inputs_embeds", 3)
    if tensor.dim() != dims:
        layout = "(batch, seq_len)" if dims == 2 else "(batch, seq_len, hidden_size)"
        hint = "; for one sequence pass `ids[None]`" if name == "input_ids" and tensor.dim() == 1 else ""
        raise ValueError(f"M2RNNModel: `{name}` must be {layout}, got shape {tuple(tensor.shape)}{hint}")
    if tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise ValueError(f"M2RNNModel: `{name}` is empty (shape {tuple(tensor.shape)}); pass at least one token per row")


def _check_attention_mask(
    attention_mask: torch.Tensor, batch: int, seq_len: int, cache: Cache | None
) -> None:
    """A 2-D mask covers the cached tokens and the new ones of every row; 4-D masks are passed through as given."""
    if attention_mask.dim() == 4:
        return
    past = _past_length(cache)
    expected = "past + new tokens" if past is None else f"{past + seq_len} (past {past} + new {seq_len})"
    if (
        attention_mask.dim() != 2
        or attention_mask.shape[0] != batch
        or attention_mask.shape[1] < seq_len
        or (past is not None and attention_mask.shape[1] != past + seq_len)
    ):
        raise ValueError(
            f"M2RNNModel: `attention_mask` has shape {tuple(attention_mask.shape)}; expected (batch={batch}, "
            f"{expected}), 1 for tokens and 0 for padding"
        )


def _past_length(cache: Cache | None) -> int | None:
    """Tokens already in `cache` where the host knows it without a sync (None for static attention caches)."""
    if cache is None:
        return 0
    if not any(isinstance(layer, CacheLayerMixin) for layer in cache.layers):
        return cache.seen_tokens if isinstance(cache, _TokenCounter) else None
    past = cache.get_seq_length()
    return past if isinstance(past, int) else None


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
        **kwargs: Any,
    ) -> MoeModelOutputWithPast:
        """The decoder stack. The cache may be passed as `cache` (transformers >= 5.24) or `past_key_values`; the
        output carries it under the name the installed transformers reads back."""
        past_key_values = _one_cache(cache, past_key_values)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("M2RNNModel: pass exactly one of `input_ids` and `inputs_embeds`")
        _check_inputs(input_ids, inputs_embeds)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        seq_len = inputs_embeds.shape[1]
        if past_key_values is not None:
            _check_cache(past_key_values, self.config)
        if isinstance(attention_mask, torch.Tensor):
            _check_attention_mask(attention_mask, inputs_embeds.shape[0], seq_len, past_key_values)

        cu_seqlens = kwargs.get("cu_seq_lens_q")
        if cu_seqlens is None and past_key_values is None and not isinstance(attention_mask, torch.Tensor):
            cu_seqlens = _cu_seqlens_from_position_ids(position_ids)
        if cu_seqlens is not None:  # packed documents never read or write a cache
            if inputs_embeds.shape[0] != 1:
                raise ValueError(
                    f"M2RNNModel: cu_seq_lens_q describes one packed row, but the batch has {inputs_embeds.shape[0]} rows"
                )
            cu_seqlens, use_cache, past_key_values = cu_seqlens.to(torch.int32), False, None
            if "cu_seq_lens_q" in kwargs:  # the layers trust it (no host sync each): checked here, once
                check_cu_seqlens(cu_seqlens, seq_len, inputs_embeds.device, "M2RNNModel (cu_seq_lens_q)")
            if position_ids is None:  # restarting positions keep RoPE and the attention mask within each document
                position_ids = _position_ids_from_cu_seqlens(cu_seqlens, seq_len)

        if use_cache and past_key_values is None:
            past_key_values = M2RNNCache(config=self.config)
        if position_ids is None:  # positions only matter to attention layers; recurrent-only caches may not count
            knows_length = isinstance(past_key_values, _TokenCounter) or "full_attention" in self.config.layer_types
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
        keep = _keep_mask(masks.get("linear_attention"), seq_len)

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
                **kwargs,
            )
        if isinstance(past_key_values, _TokenCounter):
            past_key_values.seen_tokens += seq_len
        return MoeModelOutputWithPast(last_hidden_state=self.norm(hidden_states), **{_CACHE_FIELD: past_key_values})


class M2RNNForCausalLM(M2RNNPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: M2RNNConfig):
        super().__init__(config)
        self.model = M2RNNModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

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
            and not isinstance(cache, _TokenCounter)
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
        outputs: MoeModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=_one_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])

        loss = aux_loss = None
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
