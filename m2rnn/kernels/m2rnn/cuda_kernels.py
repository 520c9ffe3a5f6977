"""Host side of the CUDA M2RNN kernels (`cuda_forward.cu`, `cuda_backward.cu`): which cases they cover, the launch
shape, the launch.

They take the same token-major inputs and produce the same outputs as the Triton kernels (`forward.py`,
`backward.py`): one checkpoint format, one layout of gradient partials, so either pass can run on either backend.
"""

from __future__ import annotations

import math

import torch

from .config import M2RNNTritonConfig
from .cuda_runtime import LongLong, cuda_kernels_available, get_kernel
from .triton_common import reduce_partials

WARPS_PER_BLOCK = 4
STAGE_STEPS = 16  # steps per shared-memory stage of the forward (P in cuda_forward.cu)
SUB_STEPS = 8  # steps per sub-chunk of the backward (SUB in cuda_backward.cu)
TILE_ROWS = 16  # rows of one mma tile
# State columns a thread may carry per row (tiles · V): the register budget of each kernel.
FORWARD_COLUMNS = 64
BACKWARD_COLUMNS = 32


def cuda_forward_covers(x: torch.Tensor, key_dim: int, value_dim: int, config: M2RNNTritonConfig) -> bool:
    """The cases the CUDA forward handles: 16-bit inputs on a CUDA device, K a multiple of 16 up to 256, V in
    {16, 32, 48, 64}, a checkpoint interval that is a multiple of 16. Anything else runs the Triton kernels."""
    return (
        x.device.type == "cuda" and x.dtype in (torch.bfloat16, torch.float16)
        and key_dim % TILE_ROWS == 0 and key_dim <= 256
        and value_dim % 16 == 0 and value_dim <= FORWARD_COLUMNS
        and config.checkpoint_interval % STAGE_STEPS == 0
        and cuda_kernels_available()
    )


def cuda_backward_covers(x: torch.Tensor, key_dim: int, value_dim: int, config: M2RNNTritonConfig) -> bool:
    """The cases the CUDA backward handles: as the forward, with V of 16 or 32 (its registers hold dW, dH and H)."""
    return value_dim <= BACKWARD_COLUMNS and cuda_forward_covers(x, key_dim, value_dim, config)


# Per-step time of a scheduler's warps, in units of one tile's work: max(warps on the busiest scheduler, LATENCY)
# × (tiles + WARP_OVERHEAD). LATENCY: a lone warp's step takes as long as ~1.65 interleaved ones (its dependency
# chain is exposed), measured on an H200 (benchmarks/RESULTS.md §1, row-block sweep); WARP_OVERHEAD: the readout's
# shuffles, the input copies and the loop, shared by a warp's tiles.
LATENCY = 1.65
WARP_OVERHEAD = 0.5


def tiles_per_warp(batch_heads: int, key_dim: int, value_dim: int, multiprocessors: int,
                   config: M2RNNTritonConfig, max_columns: int = FORWARD_COLUMNS) -> int:
    """16-row tiles each warp carries (1, 2 or 4: its independent chains), from the time of the busiest scheduler.

    Every warp of a 4-warp block sits on its own scheduler, so a launch of W warps puts ⌈W / (4 · SMs)⌉ warps on
    the busiest one; more tiles per warp mean fewer warps but longer steps. A thread carries at most `max_columns`
    state columns per row (tiles · V). `config.block_k` pins 16 · tiles rows instead, within that budget.
    """
    if config.block_k is not None:
        tiles = max(1, min(config.block_k // TILE_ROWS, max_columns // value_dim))
        while (key_dim // TILE_ROWS) % tiles:  # whole tiles per warp: K = 48 takes 1 of 16 rows, not 64
            tiles //= 2
        return tiles
    best_cost, best_tiles = math.inf, 1
    for tiles in (4, 2, 1):
        if (key_dim // TILE_ROWS) % tiles or tiles * value_dim > max_columns:
            continue
        warps = batch_heads * (key_dim // (TILE_ROWS * tiles))
        per_scheduler = math.ceil(warps / (WARPS_PER_BLOCK * multiprocessors))
        cost = max(per_scheduler, LATENCY) * (tiles + WARP_OVERHEAD)
        if cost < best_cost:
            best_cost, best_tiles = cost, tiles
    return best_tiles


def a1_blocks_beside_walk(walk_blocks: int, resident_per_multiprocessor: int, multiprocessors: int) -> int:
    """A1 blocks to launch with the backward's walk (0: A1 runs alone before it, at full occupancy).

    They fill the room the GPU has left beside the walk's blocks, which pays only where that room is on the
    multiprocessors holding fewer walk blocks than the busiest ones: there A1 uses issue slots the walk leaves idle.
    So only where the busiest multiprocessors are full (400M, B=8, S=4096: 336 walk blocks, 3 per multiprocessor:
    72 hold 3, 60 hold 2 and an A1 block). Where every multiprocessor has room (7B: 2 walk blocks on each of 132),
    A1 blocks beside the walk slowed it more than A1 alone costs (benchmarks/RESULTS.md §1, sixth round).
    """
    resident = resident_per_multiprocessor * multiprocessors
    busiest_full = math.ceil(walk_blocks / multiprocessors) == resident_per_multiprocessor
    return resident - walk_blocks if busiest_full and walk_blocks < resident else 0


def _aligned(x: torch.Tensor) -> torch.Tensor:
    """The kernels copy inputs in 16-byte pieces: a view that does not start on a 16-byte boundary gets a copy."""
    return x if x.data_ptr() % 16 == 0 else x.clone()


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


def _backward_shared_bytes(tiles: int, value_dim: int) -> int:
    """Dynamic shared memory of one block of `cuda_backward.cu` (its WarpShared, per warp); the kernel traps if the
    formula and the struct ever disagree."""
    rows = TILE_ROWS * tiles
    step_inputs = -(-(2 * rows * 2 + 2 * value_dim * 2 + 4) // 16) * 16  # StepInputs: k, q, v, dy, f; 16-aligned
    stage = SUB_STEPS * step_inputs + tiles * (value_dim // 8) * 32 * 4 * 4
    states = SUB_STEPS * tiles * (value_dim // 16) * 32 * 16
    return WARPS_PER_BLOCK * (2 * stage + states)


def cuda_backward(layout, q, k, v, weight, forget, checkpoints, dy, d_final_state, clip, needs_dh0: bool):
    """`backward._backward` on the CUDA kernel: the gradients of (q, k, v, weight, forget, initial_state)."""
    device, heads, key_dim, value_dim = q.device, layout.heads, layout.key_dim, layout.value_dim
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    tiles = tiles_per_warp(layout.batch * heads, key_dim, value_dim, sms, layout.config, BACKWARD_COLUMNS)
    k_blocks = key_dim // (TILE_ROWS * tiles)
    items = layout.batch * heads * k_blocks
    f32 = dict(dtype=torch.float32, device=device)
    dq_heads = torch.empty(layout.tokens, heads, key_dim, **f32)
    dk_heads = torch.empty(layout.tokens, heads, key_dim, **f32)
    dv_parts = torch.empty(k_blocks, layout.tokens, heads, value_dim, **f32)
    df_parts = torch.empty(k_blocks, layout.tokens, heads, **f32)
    dw_parts = torch.empty(k_blocks, layout.batch, heads, value_dim, value_dim, **f32)
    dh0 = torch.empty(layout.batch, heads, key_dim, value_dim, **f32) if needs_dh0 else None
    # The state before every sub-chunk (A1's output, one item per chunk, head and row block, read by the walk): 8x the
    # checkpoints, transient (1.4 GB at the 400M shape, B=8, S=4096).
    scratch = torch.empty(
        layout.total_chunks, heads, k_blocks, layout.chunk // SUB_STEPS, tiles * TILE_ROWS * value_dim, **f32
    )
    work = layout.total_chunks * heads * k_blocks  # none where every sequence is empty
    if forget.dtype not in (torch.float32, q.dtype):
        forget = forget.to(torch.float32)
    if d_final_state is not None:
        d_final_state = d_final_state.to(torch.float32).contiguous()
    defines = dict(
        M2_TILES=tiles, M2_V=value_dim, M2_BF16=q.dtype == torch.bfloat16, M2_VARLEN=layout.packed,
        M2_GATE_F32=forget.dtype == torch.float32, M2_CHUNK=layout.chunk, M2_HAS_DHT=d_final_state is not None,
        M2_STORE_DH0=needs_dh0, M2_CLIP=clip is not None, M2_A1_BESIDE=False,
    )
    counts = layout.head_counts
    q, k, v, weight = _aligned(q), _aligned(k), _aligned(v), weight.to(torch.float32).contiguous()
    shared_bytes = _backward_shared_bytes(tiles, value_dim)
    walk_blocks = math.ceil(items / WARPS_PER_BLOCK)

    def room_beside(walk) -> int:  # A1 blocks the GPU holds beside `walk`'s blocks, where that pays
        resident = walk.resident_blocks_per_multiprocessor(32 * WARPS_PER_BLOCK, shared_bytes)
        return a1_blocks_beside_walk(walk_blocks, resident, sms)

    kernel = get_kernel("cuda_backward.cu", "m2rnn_backward", defines, device)
    states_blocks = 0
    if work and room_beside(kernel):
        beside = get_kernel("cuda_backward.cu", "m2rnn_backward", dict(defines, M2_A1_BESIDE=True), device)
        states_blocks = room_beside(beside)  # as this variant's registers allow
        kernel = beside if states_blocks else kernel
    queue = None  # A1's items, claimed by the A1 blocks beside the walk: [tickets, claims, state of each item]
    if states_blocks:
        queue = torch.zeros(2 + work, dtype=torch.int32, device=device)
    elif work:
        states = get_kernel("cuda_backward.cu", "m2rnn_backward_states", defines, device)
        states.launch(
            math.ceil(work / WARPS_PER_BLOCK), 32 * WARPS_PER_BLOCK,
            [
                k, v, weight, forget, checkpoints, scratch, layout.cu_seqlens, layout.chunk_offsets,
                work, layout.batch, layout.seqlen, layout.chunks_per_seq,
                counts["N"], counts["NK"], counts["NV"], counts["NF"], counts["NW"], key_dim,
            ],
        )
    kernel.launch(
        walk_blocks + states_blocks, 32 * WARPS_PER_BLOCK,
        [
            q, k, v, weight, forget,
            _aligned(dy.to(q.dtype)), d_final_state, dq_heads, dk_heads, dv_parts, df_parts, dw_parts, dh0,
            checkpoints, scratch, queue, layout.cu_seqlens, layout.chunk_offsets,
            items, walk_blocks, work, layout.batch, layout.seqlen, layout.chunks_per_seq, layout.total_chunks,
            LongLong(layout.tokens), float(clip or 0.0),
            counts["N"], counts["NQ"], counts["NK"], counts["NV"], counts["NF"], counts["NW"], key_dim,
        ],
        shared_bytes=shared_bytes,
    )
    return reduce_partials(layout, dq_heads, dk_heads, dv_parts, df_parts, dw_parts, dh0)
