"""Host side of the CUDA M2RNN kernels (`cuda_forward.cu`): which cases they cover, the launch shape, the launch.

They take the same token-major inputs and produce the same outputs as the Triton forward (`forward.py`), so the
two are interchangeable under one autograd function and one checkpoint format.
"""

from __future__ import annotations

import math

import torch

from .config import M2RNNTritonConfig
from .cuda_runtime import LongLong, cuda_kernels_available, get_kernel

WARPS_PER_BLOCK = 4
STAGE_STEPS = 16  # steps per shared-memory stage of the kernels (P in the sources)
TILE_ROWS = 16  # rows of one mma tile


def cuda_forward_covers(x: torch.Tensor, key_dim: int, value_dim: int, config: M2RNNTritonConfig) -> bool:
    """The cases the CUDA forward handles: 16-bit inputs on a CUDA device, K a multiple of 16 up to 256, V in
    {16, 32, 48, 64}, a checkpoint interval that is a multiple of 16. Anything else runs the Triton kernels."""
    return (
        x.device.type == "cuda" and x.dtype in (torch.bfloat16, torch.float16)
        and key_dim % TILE_ROWS == 0 and key_dim <= 256
        and value_dim % 16 == 0 and value_dim <= 64
        and config.checkpoint_interval % STAGE_STEPS == 0
        and cuda_kernels_available()
    )


def tiles_per_warp(batch_heads: int, key_dim: int, value_dim: int, multiprocessors: int,
                   config: M2RNNTritonConfig) -> int:
    """16-row tiles each warp carries (1, 2 or 4: its independent chains), from the load of the busiest scheduler.

    Every warp of a 4-warp block sits on its own scheduler, so a launch of W warps puts ⌈W / (4 · SMs)⌉ warps on
    the busiest one. Its per-step time grows with the tiles it carries plus a per-warp overhead (the readout's
    shuffles, the input copies) worth about half a tile. `config.block_k` pins 16 · tiles rows instead.
    """
    if config.block_k is not None:
        return config.block_k // TILE_ROWS
    best_cost, best_tiles = math.inf, 1
    for tiles in (4, 2, 1):
        if (key_dim // TILE_ROWS) % tiles or tiles * value_dim > 64:
            continue
        warps = batch_heads * (key_dim // (TILE_ROWS * tiles))
        cost = math.ceil(warps / (WARPS_PER_BLOCK * multiprocessors)) * (tiles + 0.5)
        if cost < best_cost:
            best_cost, best_tiles = cost, tiles
    return best_tiles


def _aligned(x: torch.Tensor) -> torch.Tensor:
    """The kernels copy inputs in 4-byte words: a view starting at an odd element gets a fresh copy."""
    return x if x.data_ptr() % 4 == 0 else x.clone()


def cuda_forward(layout, q, k, v, weight, forget, initial_state, store_checkpoints: bool):
    """`forward._forward` on the CUDA kernel: y (T, N, V), the float32 final state and (optionally) checkpoints."""
    device, heads, key_dim, value_dim = q.device, layout.heads, layout.key_dim, layout.value_dim
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    tiles = tiles_per_warp(layout.batch * heads, key_dim, value_dim, sms, layout.config)
    k_blocks = key_dim // (TILE_ROWS * tiles)
    y_dtype = q.dtype if k_blocks == 1 else torch.float32
    y = torch.empty(k_blocks, layout.tokens, heads, value_dim, dtype=y_dtype, device=device)
    final_state = torch.empty(layout.batch, heads, key_dim, value_dim, dtype=torch.float32, device=device)
    checkpoints = (
        torch.empty(layout.total_chunks, heads, key_dim, value_dim, dtype=torch.float32, device=device)
        if store_checkpoints else final_state
    )
    h0 = initial_state.to(torch.float32).contiguous() if initial_state is not None else None
    if forget.dtype not in (torch.float32, q.dtype):
        forget = forget.to(torch.float32)
    defines = dict(
        M2_TILES=tiles, M2_V=value_dim, M2_BF16=q.dtype == torch.bfloat16, M2_VARLEN=layout.packed,
        M2_HAS_H0=h0 is not None, M2_GATE_F32=forget.dtype == torch.float32, M2_STORE_CKPT=store_checkpoints,
        M2_CHUNK=layout.chunk, M2_PARTIAL_Y=k_blocks > 1,
    )
    kernel = get_kernel("cuda_forward.cu", "m2rnn_forward", defines, device)
    items = layout.batch * heads * k_blocks
    counts = layout.head_counts
    kernel.launch(
        math.ceil(items / WARPS_PER_BLOCK), 32 * WARPS_PER_BLOCK,
        [
            _aligned(q), _aligned(k), _aligned(v), weight.to(torch.float32).contiguous(), forget, h0,
            y, final_state, checkpoints, layout.cu_seqlens, layout.chunk_offsets,
            items, layout.seqlen, layout.chunks_per_seq, LongLong(layout.tokens),
            counts["N"], counts["NQ"], counts["NK"], counts["NV"], counts["NF"], counts["NW"], key_dim,
        ],
    )
    y = y[0] if k_blocks == 1 else y.sum(0).to(q.dtype)
    return y, final_state, (checkpoints if store_checkpoints else None)
