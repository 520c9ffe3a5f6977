"""The sequence mixers of M2RNN models and the norms they use: M2RNN, Gated DeltaNet and softmax attention.

Read top to bottom: the RMSNorm and rotary embeddings; the recurrent mixers (`RecurrentMixer`, which owns padding,
the short convolution, the cache modes and the state update, then `M2RNNMixer` and `M2RNNGatedDeltaNet`, which
supply their projections, gates and ops); attention. The recurrences live in `m2rnn.kernels`, behind one dispatch
function per op.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_m2rnn import M2RNNConfig
from .kernels import (
    causal_conv1d,
    causal_conv1d_step,
    expand_heads,
    gated_delta_rule,
    gated_delta_rule_step,
    m2rnn_decode_step,
    m2rnn_recurrence,
)

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
# The recurrent mixers: one base that runs the cache modes, M2RNN and Gated DeltaNet on top of it
# ---------------------------------------------------------------------------------------------------------------
def real_positions(attention_mask: torch.Tensor | None, seq_len: int) -> torch.Tensor | None:
    """Boolean (B, S) of real (non-padded) positions, or None."""
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    return attention_mask[:, -seq_len:].bool()


class RecurrentMixer(nn.Module):
    """What the M2RNN and Gated DeltaNet mixers share: padding, the short conv, the cache modes and the state update.

    A subclass builds its parameters and supplies `project` (its input projections), `gates` (its per-head gates),
    `recurrence` and `step` (its op over a sequence and over one token) and `output`. `forward` runs them:

    - padded positions (0 in a 2-D `attention_mask`) are zeroed and get `state_preserving_gates`, so they neither
      carry anything (NaN included) into the conv or the state nor change the state;
    - [q | k | v] go through the depthwise causal conv + SiLU (`short_conv`), which reads and writes the conv state;
    - the cache mode: *prefill* (no cached state), *resume* (a chunk continues from the cached state), *decode* (one
      token updates the cached states in place) or *packed* (documents of one row delimited by `cu_seqlens`, each
      starting from a zero state, no cache); the final state of a prefill or resume goes back into the cache.
    """

    layer_idx: int
    num_q_heads: int
    num_k_heads: int
    num_v_heads: int
    key_dim: int
    value_dim: int
    conv_dim: int
    conv1d: nn.Conv1d | None  # depthwise, no bias; None: SiLU alone
    # one value per tensor `gates` returns, the one that leaves the state untouched
    state_preserving_gates: tuple[float, ...]

    def project(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(conv input [q | k | v], input of `gates`, input of `output`'s gate) for (B, S, hidden) states."""
        raise NotImplementedError

    def gates(self, gate_input: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The per-head gates, each (B, S, heads), in float32."""
        raise NotImplementedError

    def recurrence(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        gates: tuple[torch.Tensor, ...],
        initial_state: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The op over (B, S, heads, dim) inputs: the output (B, S, heads, V) and the final state."""
        raise NotImplementedError

    def step(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: tuple[torch.Tensor, ...], state: torch.Tensor
    ) -> torch.Tensor:
        """The op for one token of (B, heads, dim) inputs: the output (B, heads, V); updates `state` in place."""
        raise NotImplementedError

    def output(self, y: torch.Tensor, v: torch.Tensor, gate_input: torch.Tensor) -> torch.Tensor:
        """The op's output (B, S, heads, V) to the layer's output (B, S, hidden)."""
        raise NotImplementedError

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        cu_seqlens: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        cache, seq_len = past_key_values, hidden_states.shape[1]
        if cache is not None and cu_seqlens is not None:
            raise ValueError(f"{type(self).__name__}: packed documents (cu_seqlens) are never cached; pass no cache")
        resuming = cache is not None and cache.has_previous_state(self.layer_idx)
        decoding = resuming and seq_len == 1 and not cache.is_recording_past(self.layer_idx)
        keep = real_positions(attention_mask, seq_len)
        if keep is not None:
            hidden_states = hidden_states.masked_fill(~keep[..., None], 0.0)

        conv_input, gate_input, output_gate_input = self.project(hidden_states)
        q, k, v = self._split_heads(self.short_conv(conv_input, cache, cu_seqlens, decoding))
        gates = self.gates(gate_input)
        if keep is not None:
            gates = tuple(
                gate.masked_fill(~keep[..., None], value) for gate, value in zip(gates, self.state_preserving_gates)
            )

        if decoding:
            state = cache.get_recurrent_state(self.layer_idx)
            y = self.step(q[:, 0], k[:, 0], v[:, 0], tuple(gate[:, 0] for gate in gates), state).unsqueeze(1)
        elif cu_seqlens is not None:
            y, _ = self.recurrence(q, k, v, gates, None, cu_seqlens)
        else:
            initial_state = cache.get_recurrent_state(self.layer_idx) if resuming else None
            y, final_state = self.recurrence(q, k, v, gates, initial_state, None)
            if cache is not None:
                cache.update_recurrent_state(final_state, self.layer_idx)
        return self.output(y, v, output_gate_input)

    def short_conv(
        self, x: torch.Tensor, cache: Cache | None, cu_seqlens: torch.Tensor | None, decoding: bool
    ) -> torch.Tensor:
        """Depthwise causal conv + SiLU over x (B, S, C), reading and updating the layer's conv state in `cache`.

        The cache keeps the last `Kc` raw inputs (B, C, Kc). A 1-token decode step updates it in place; anything
        else (prefill, resume) convolves the cached columns followed by the new ones and keeps the last S outputs.
        Without a conv the filter is a fixed width-1 identity: SiLU alone, still through the cache's conv state.
        """
        weight = self.conv1d.weight.squeeze(1) if self.conv1d is not None else x.new_ones(self.conv_dim, 1)
        if decoding:
            return causal_conv1d_step(x[:, 0], cache.get_conv_state(self.layer_idx), weight).unsqueeze(1)
        columns = x.transpose(1, 2)
        if cache is not None:
            columns = cache.update_conv_state(columns, self.layer_idx, conv_kernel_size=weight.shape[-1])
        out = causal_conv1d(columns, weight, cu_seqlens=cu_seqlens, check_values=False)  # checked once per forward
        return out[..., -x.shape[1] :].transpose(1, 2)

    def _split_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[q | k | v] (B, S, C) to q, k (B, S, heads, K) and v (B, S, heads, V)."""
        heads = (self.num_q_heads, self.num_k_heads, self.num_v_heads)
        dims = (self.key_dim, self.key_dim, self.value_dim)
        parts = qkv.split([count * dim for count, dim in zip(heads, dims)], dim=-1)
        return tuple(part.unflatten(-1, (count, dim)) for part, count, dim in zip(parts, heads, dims))


class M2RNNMixer(RecurrentMixer):
    """Matrix-to-matrix non-linear RNN layer (arXiv 2603.14360), as the published models were trained.

    in_proj → [q | k | v | x_f | g]; depthwise causal conv (no bias) + SiLU on [q | k | v];
    f = exp(-exp(A_log) · softplus(x_f + dt_bias)) in fp32; per head n, with the state weight W_n:
    Z = tanh(H W_n + k vᵀ), H = f H + (1 - f) Z, y = qᵀ H; y += D ⊙ v; y ⊙= SiLU(g); RMSNorm over the whole N·V
    vector; out_proj.
    """

    state_preserving_gates = (1.0,)  # f = 1 keeps H

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

    def project(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One projection split into [q | k | v], x_f (the forget gate's input) and g (the output gate's)."""
        return self.in_proj(hidden_states).split(
            [self.conv_dim, self.forget_dim, self.num_gate_heads * self.value_dim], dim=-1
        )

    def gates(self, x_f: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.forget_gate(x_f),)

    def forget_gate(self, x_f: torch.Tensor) -> torch.Tensor:
        """f = exp(-exp(A_log) · softplus(x_f + dt_bias)), in float32; f ≡ 0 without the gate."""
        if not self.use_forget_gate:
            return x_f.new_zeros(*x_f.shape[:-1], self.num_forget_heads, dtype=torch.float32)
        return torch.exp(-self.A_log.float().exp() * F.softplus(x_f.float() + self.dt_bias.float()))

    def recurrence(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        gates: tuple[torch.Tensor, ...],
        initial_state: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        (forget,) = gates
        clipping = self.gradient_clipping if self.training else None
        if cu_seqlens is not None:  # the op takes packed documents as (T, ...) rows, without the batch of one
            y, final_state = m2rnn_recurrence(
                q[0], k[0], v[0], self.state_weight, forget[0], cu_seqlens=cu_seqlens,
                gradient_clipping=clipping, check_values=False,
            )
            return y.unsqueeze(0), final_state
        return m2rnn_recurrence(
            q, k, v, self.state_weight, forget, initial_state, gradient_clipping=clipping, check_values=False
        )

    def step(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: tuple[torch.Tensor, ...], state: torch.Tensor
    ) -> torch.Tensor:
        (forget,) = gates
        return m2rnn_decode_step(q, k, v, self.state_weight, forget, state)

    def output(self, y: torch.Tensor, v: torch.Tensor, output_gate: torch.Tensor) -> torch.Tensor:
        """y + D ⊙ v, times SiLU of the output gate, RMSNorm over each token's N·V values, out_proj."""
        if self.use_residual:
            y = y + self.D * expand_heads(v, self.num_heads, 2)
        output_gate = output_gate.unflatten(-1, (self.num_gate_heads, self.value_dim))
        y = y * F.silu(expand_heads(output_gate, self.num_heads, 2))
        return self.out_proj(self.norm(y.flatten(2)))


class M2RNNGatedDeltaNet(RecurrentMixer):
    """Gated DeltaNet (Qwen3.5 layout, `docs/checkpoint-formats.md`): l2-normed q, k; S ← exp(g) S;
    S ← S + k (β(v − Sᵀk))ᵀ; o = Sᵀq; out = out_proj(RMSNorm_per_head(o) ⊙ SiLU(z)), or
    out_proj(RMSNorm_per_head(o ⊙ SiLU(z))) when `linear_gate_before_norm`; β = sigmoid(b), doubled when
    `linear_allow_neg_eigval`. Its config keys carry Qwen3.5's `linear_` prefix."""

    state_preserving_gates = (0.0, 0.0)  # no decay (g = 0) and no write (β = 0)

    def __init__(self, config: M2RNNConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_k_heads = config.linear_num_key_heads
        self.num_q_heads = self.num_k_heads
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

    def project(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[q | k | v] from `in_proj_qkv`; the gates and the output gate project the hidden states themselves."""
        return self.in_proj_qkv(hidden_states), hidden_states, hidden_states

    def gates(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(g, β): the log decay -exp(A_log) · softplus(a + dt_bias) (0 without the decay gate) and the write
        strength β, both in float32."""
        beta = torch.sigmoid(self.in_proj_b(hidden_states).float())
        if self.beta_scale != 1.0:
            beta = beta * self.beta_scale
        if self.A_log is None:
            return beta.new_zeros(beta.shape), beta
        g = -self.A_log.float().exp() * F.softplus(self.in_proj_a(hidden_states).float() + self.dt_bias.float())
        return g, beta

    def recurrence(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        gates: tuple[torch.Tensor, ...],
        initial_state: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        g, beta = gates
        return gated_delta_rule(q, k, v, g, beta, initial_state, cu_seqlens=cu_seqlens, check_values=False)

    def step(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: tuple[torch.Tensor, ...], state: torch.Tensor
    ) -> torch.Tensor:
        g, beta = gates
        return gated_delta_rule_step(q, k, v, g, beta, state)

    def output(self, o: torch.Tensor, v: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """Per-head RMSNorm and the SiLU(z) output gate (before or after the norm), out_proj."""
        if self.in_proj_z is None:
            o = self.norm(o)
        else:
            z = self.in_proj_z(hidden_states).unflatten(-1, (self.num_v_heads, self.value_dim))
            o = self.norm(o * F.silu(z)) if self.gate_before_norm else self.norm(o) * F.silu(z)
        return self.out_proj(o.flatten(2))


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

