"""Shared pieces of the Triton M2RNN kernels: launch config, device helpers, and the launch layout.

Per head n and step t (DESIGN.md, "The recurrence op"):

    Z_t = tanh(H_{t-1} @ W_n + k_t v_tᵀ)
    H_t = f_t · H_{t-1} + (1 - f_t) · Z_t
    y_t = q_tᵀ H_t

Rows of H (the K axis) never interact, so one program owns a ``(BLOCK_K, V)`` row block of one head's state for
the whole sequence, and the K axis is split across programs when batch × heads is too small to fill the GPU
(batch-1 prefill, long-context training): the readout ``qᵀH`` is then summed over the row blocks afterwards.

Both triton 3.6 (GPU) and 3.9 (CPU interpreter) are supported: plain pointer arithmetic (no block pointers),
loads upcast to float32 at once (the interpreter cannot do bf16 arithmetic), `tanh.approx.f32` behind a
constexpr switch that is off under ``TRITON_INTERPRET=1``, and a single autotune config under the interpreter.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .config import DEFAULT_CONFIG, M2RNNTritonConfig

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

MAX_KEY_DIM = 256
MAX_VALUE_DIM = 64


def _autotune_configs() -> list[triton.Config]:
    """Warps per program to try; ``M2RNN_TRITON_NUM_WARPS=n`` pins one (profilers, reproducible timings)."""
    pinned = os.environ.get("M2RNN_TRITON_NUM_WARPS")
    warps = [int(pinned)] if pinned else [4] if INTERPRET else [1, 2, 4]
    return [triton.Config({}, num_warps=w, num_stages=1) for w in warps]


# --------------------------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _tanh(x, TANH_MODE: tl.constexpr):
    """tanh of a float32 tensor. TANH_MODE 0: exp-based exact form (CPU interpreter, float32 inputs);
    1: the special-function unit's approximation (`tanh.approx.f16x2` was tried: sm_90 splits it into one
    MUFU op per element, so it saves nothing)."""
    if TANH_MODE == 1:
        out = tl.inline_asm_elementwise(
            "tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        # exp overflow gives 1 - 2/inf = 1, underflow gives 1 - 2/1 = -1: saturates cleanly at both ends.
        out = 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)
    return out


@triton.jit
def _recurrence_step(h, w_dot, k, v, f, TANH_MODE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One step on a float32 row block h (BLOCK_K, BLOCK_V); returns the new block and Z.

    H @ W runs in w_dot's dtype with float32 accumulation: float32 (tf32/ieee) by default; 16-bit operands with
    `half_precision_state_dot`, which may let the compiler feed the tensor cores from registers without a trip
    through shared memory on every step. The carry f·H itself always stays float32.
    """
    z = _tanh(tl.dot(h.to(w_dot.dtype), w_dot, input_precision=DOT_PRECISION) + k[:, None] * v[None, :], TANH_MODE)
    return h + (1.0 - f) * (z - h), z


@triton.jit
def _load_step_inputs(q_base, k_base, v_base, f_base, tok, row_mask, col_mask,
                      NQ: tl.constexpr, NK: tl.constexpr, NV: tl.constexpr, NF: tl.constexpr,
                      K: tl.constexpr, V: tl.constexpr):
    """q_t, k_t (BLOCK_K,), v_t (BLOCK_V,) and f_t of token tok (int64), upcast to float32."""
    q_t = tl.load(q_base + tok * (NQ * K), mask=row_mask, other=0.0).to(tl.float32)
    k_t = tl.load(k_base + tok * (NK * K), mask=row_mask, other=0.0).to(tl.float32)
    v_t = tl.load(v_base + tok * (NV * V), mask=col_mask, other=0.0).to(tl.float32)
    f_t = tl.load(f_base + tok * NF).to(tl.float32)
    return q_t, k_t, v_t, f_t


@triton.jit
def _sequence_bounds(cu_seqlens_ptr, chunk_offsets_ptr, b, seqlen, chunks_per_seq, IS_VARLEN: tl.constexpr):
    """First token (int64), length and index of the first checkpoint of sequence b."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens_ptr + b).to(tl.int64)
        eos = tl.load(cu_seqlens_ptr + b + 1).to(tl.int64)
        first_chunk = tl.load(chunk_offsets_ptr + b).to(tl.int64)
    else:
        bos = b.to(tl.int64) * seqlen
        eos = bos + seqlen
        first_chunk = b.to(tl.int64) * chunks_per_seq
    return bos, (eos - bos).to(tl.int32), first_chunk


# --------------------------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _multiprocessor_count(device_index: int | None) -> int:
    if INTERPRET or not torch.cuda.is_available():
        return 132
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _check_dims(key_dim: int, value_dim: int) -> None:
    if key_dim > MAX_KEY_DIM:
        raise ValueError(f"m2rnn triton kernels: key head dim K={key_dim} is above the supported {MAX_KEY_DIM}")
    if value_dim > MAX_VALUE_DIM:
        raise ValueError(f"m2rnn triton kernels: value head dim V={value_dim} is above the supported {MAX_VALUE_DIM}")


def _block_k(batch_heads: int, key_dim: int, device: torch.device, config: M2RNNTritonConfig) -> int:
    """Row block: 64 rows per program unless batch × heads leaves the GPU short of programs (batch-1 prefill,
    long-context training with few sequences per batch): then fewer rows per program, down to 16."""
    if config.block_k is not None:
        return config.block_k
    block_k = min(64, max(16, triton.next_power_of_2(key_dim)))
    wanted_programs = 4 * _multiprocessor_count(device.index if device.type == "cuda" else None)
    while block_k > 16 and batch_heads * triton.cdiv(key_dim, block_k) < wanted_programs:
        block_k //= 2
    return block_k


def _math_flags(dtype: torch.dtype, config: M2RNNTritonConfig = DEFAULT_CONFIG) -> dict:
    """float32 inputs get an exact tanh and full-precision dots; 16-bit inputs the fast approximations: tanh.approx,
    tf32 dots (float16 H @ W operands with `half_precision_state_dot`). The interpreter has no inline assembly."""
    half = dtype in (torch.float16, torch.bfloat16)
    return dict(
        TANH_MODE=1 if half and not INTERPRET else 0,
        DOT_PRECISION="tf32" if half else "ieee",
        STATE_DOT_DTYPE=tl.float16 if half and config.half_precision_state_dot else tl.float32,
    )


class _Layout:
    """Token-major view of the inputs shared by the forward and backward launches."""

    def __init__(self, q, k, v, weight, forget, cu_seqlens, heads: int, config: M2RNNTritonConfig):
        checkpoint_interval = config.checkpoint_interval
        self.config = config
        self.packed = cu_seqlens is not None
        if self.packed:
            self.tokens = q.shape[0]
            self.batch = cu_seqlens.numel() - 1
            self.seqlen = 0
            self.chunks_per_seq = 0
            lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int32)
            chunks = (lengths + checkpoint_interval - 1) // checkpoint_interval
            self.chunk_offsets = (torch.cumsum(chunks, 0) - chunks).to(torch.int32)
            self.cu_seqlens = cu_seqlens
        else:
            self.batch, self.seqlen = q.shape[:2]
            self.tokens = self.batch * self.seqlen
            self.chunks_per_seq = triton.cdiv(self.seqlen, checkpoint_interval)
            self.chunk_offsets = None
            self.cu_seqlens = None
        self.heads = heads
        self.total_chunks = checkpoints_shape(q, v, heads, cu_seqlens, checkpoint_interval)[0]
        self.key_dim = q.shape[-1]
        self.value_dim = v.shape[-1]
        self.chunk = checkpoint_interval
        self.block_k = _block_k(self.batch * heads, self.key_dim, q.device, config)
        self.block_v = max(16, triton.next_power_of_2(self.value_dim))
        self.k_blocks = triton.cdiv(self.key_dim, self.block_k)
        self.grid = (self.batch * heads, self.k_blocks)
        self.work_bucket = triton.next_power_of_2(self.batch * heads * self.k_blocks)
        self.math_flags = _math_flags(q.dtype, config)
        self.head_counts = dict(
            N=heads, NQ=q.shape[-2], NK=k.shape[-2], NV=v.shape[-2], NF=forget.shape[-1], NW=weight.shape[0]
        )

    def tokens_first(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, heads, ...) or (T, heads, ...) -> contiguous (T, heads, ...)."""
        return x.reshape(self.tokens, *x.shape[(1 if self.packed else 2):]).contiguous()

    def constexprs(self) -> dict:
        return dict(
            **self.head_counts, K=self.key_dim, V=self.value_dim, BLOCK_K=self.block_k, BLOCK_V=self.block_v,
            CHUNK=self.chunk, IS_VARLEN=self.packed, LOOP_UNROLL=self.config.loop_unroll, **self.math_flags,
        )


def _prepare(q, k, v, weight, forget, initial_state, cu_seqlens, heads: int, config: M2RNNTritonConfig):
    """The launch layout and the kernels' inputs: token-major q, k, v, forget; contiguous weight and h0."""
    layout = _Layout(q, k, v, weight, forget, cu_seqlens, heads, config)
    h0 = initial_state.contiguous() if initial_state is not None else None
    q_, k_, v_, f_ = (layout.tokens_first(x) for x in (q, k, v, forget))
    return layout, (q_, k_, v_, weight.contiguous(), f_, h0)


def _sum_groups(x: torch.Tensor, groups: int, dim: int) -> torch.Tensor:
    """Sum the per-state-head gradient over the heads of each group: dim of size N -> size `groups`."""
    heads = x.shape[dim]
    if groups == heads:
        return x
    return x.unflatten(dim, (groups, heads // groups)).sum(dim + 1)


def reduce_partials(layout: "_Layout", dq_heads, dk_heads, dv_parts, df_parts, dw_parts, dh0):
    """The backward kernels' float32 partials -> gradients of (q, k, v, weight, forget, initial_state): sum the row
    blocks (the leading dim of dv, df, dw) and the state heads of each input head group."""
    counts = layout.head_counts
    dq = _sum_groups(dq_heads, counts["NQ"], 1)
    dk = _sum_groups(dk_heads, counts["NK"], 1)
    dv = _sum_groups(dv_parts.sum(0) if dv_parts.shape[0] > 1 else dv_parts[0], counts["NV"], 1)
    df = _sum_groups(df_parts.sum(0) if df_parts.shape[0] > 1 else df_parts[0], counts["NF"], 1)
    dw = _sum_groups(dw_parts.sum((0, 1)), counts["NW"], 0)
    return dq, dk, dv, dw, df, dh0


def checkpoints_shape(q: torch.Tensor, v: torch.Tensor, heads: int, cu_seqlens: torch.Tensor | None,
                      chunk: int = DEFAULT_CONFIG.checkpoint_interval) -> tuple:
    """Shape of the float32 checkpoint buffer the forward keeps (also for shape-only fake tensors)."""
    if cu_seqlens is None:
        total = q.shape[0] * triton.cdiv(q.shape[1], chunk)
    else:  # Σ ⌈len/C⌉ ≤ T/C + number of sequences: an upper bound that needs no host sync
        total = q.shape[0] // chunk + cu_seqlens.shape[0] - 1
    return (total, heads, q.shape[-1], v.shape[-1])


