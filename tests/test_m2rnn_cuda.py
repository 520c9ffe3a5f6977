"""CUDA M2RNN kernels (`m2rnn/kernels/m2rnn/cuda_forward.cu`, backend "cuda") against the torch reference.

The kernels need an NVIDIA GPU (NVRTC compiles them at run time): the numerical tests are marked `gpu`. The launch
shape choice and the dispatch rules are host code and run everywhere.
"""

from __future__ import annotations

import pytest
import torch

from m2rnn.kernels import M2RNNTritonConfig, m2rnn_recurrence_torch
from m2rnn.kernels.m2rnn import cuda_kernels, cuda_runtime

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
H100_SMS = 132


@pytest.mark.parametrize(
    ("batch_heads", "key_dim", "value_dim", "tiles"),
    [
        (8 * 84, 64, 16, 2),  # 400M training: 1,344 warps, 3 per scheduler, 2 tiles each (6) beats 2 x 4 (8)
        (4 * 132, 64, 16, 2),  # 7B training: 2 warps of 2 tiles per scheduler beat one lone warp of 4
        (1 * 84, 64, 16, 1),  # batch-1 prefill: one tile per warp, 336 warps
        (2 * 84, 64, 16, 1),  # 16K context at 4K's tokens (B = 2): 672 warps of one tile beat 336 lone warps of 2
        (8 * 84, 64, 32, 2),  # V = 32: at most 64 state columns per thread row (registers)
        (2, 48, 16, 1),  # K = 48: 3 tiles, only 1 divides
    ],
)
def test_tiles_per_warp_from_the_busiest_scheduler(batch_heads, key_dim, value_dim, tiles):
    assert cuda_kernels.tiles_per_warp(batch_heads, key_dim, value_dim, H100_SMS, M2RNNTritonConfig()) == tiles


def test_block_k_pins_the_rows_per_warp():
    config = M2RNNTritonConfig(block_k=64)
    assert cuda_kernels.tiles_per_warp(84, 64, 16, H100_SMS, config) == 4
    # within the backward's register budget of 32 state columns per thread row
    assert cuda_kernels.tiles_per_warp(84, 64, 16, H100_SMS, config, cuda_kernels.BACKWARD_COLUMNS) == 2
    # and in whole tiles per warp: K = 48 is three tiles, K = 96 six
    assert cuda_kernels.tiles_per_warp(84, 48, 16, H100_SMS, config) == 1
    assert cuda_kernels.tiles_per_warp(84, 96, 16, H100_SMS, config) == 2


def test_backward_tiles_stay_within_its_register_budget():
    assert cuda_kernels.tiles_per_warp(8 * 84, 64, 32, H100_SMS, M2RNNTritonConfig(), cuda_kernels.BACKWARD_COLUMNS) == 1


def test_compile_options_name_every_define_in_a_stable_order():
    options = cuda_runtime.compile_options({"M2_V": 16, "M2_BF16": True, "M2_TILES": 2}, "sm_90")
    assert options == ("--gpu-architecture=sm_90", "--std=c++17", f"-I{cuda_runtime._SOURCE_DIR}", "-DM2_BF16=1",
                       "-DM2_TILES=2", "-DM2_V=16")


def test_cuda_forward_does_not_cover_float32_or_cpu_inputs():
    config = M2RNNTritonConfig()
    assert not cuda_kernels.cuda_forward_covers(torch.zeros(1, dtype=torch.bfloat16), 64, 16, config)  # on CPU
    if torch.cuda.is_available():
        assert not cuda_kernels.cuda_forward_covers(torch.zeros(1, device="cuda"), 64, 16, config)  # float32
        half = torch.zeros(1, device="cuda", dtype=torch.float16)
        assert not cuda_kernels.cuda_forward_covers(half, 40, 16, config)  # K not a multiple of 16
        assert not cuda_kernels.cuda_forward_covers(half, 64, 16, M2RNNTritonConfig(checkpoint_interval=8))


class _RecordedLaunches:
    """Stands in for `get_kernel`: records each launch (entry, grid, arguments) instead of running it; the GPU holds
    `resident` blocks per multiprocessor."""

    def __init__(self, resident: int = 3):
        self.launches = []
        self.launch_defines = []
        self.resident = resident

    def __call__(self, source, entry, defines, device):
        recorded = self

        class Kernel:
            def launch(self, grid, block, args, shared_bytes=0):
                recorded.launches.append((entry, grid, args))
                recorded.launch_defines.append(defines)

            def resident_blocks_per_multiprocessor(self, block, shared_bytes=0):
                return recorded.resident

        return Kernel()


@pytest.mark.parametrize(("walk_blocks", "resident", "beside"), [
    (336, 3, 60),  # 400M (B=8, N=84, 2 tiles): 72 multiprocessors hold 3 walk blocks, 60 hold 2 and an A1 block
    (264, 3, 0),  # 7B (B=4, N=132): 2 walk blocks on every multiprocessor, room on all of them: A1 first
    (168, 4, 0),  # 16K (B=2, one tile)
    (396, 3, 0),  # no room left
    (400, 3, 0),  # more walk blocks than the GPU holds
])
def test_a1_goes_beside_the_walk_only_where_the_busiest_multiprocessors_are_full(walk_blocks, resident, beside):
    assert cuda_kernels.a1_blocks_beside_walk(walk_blocks, resident, 132) == beside


@pytest.mark.parametrize(("lead", "packed_lengths", "chunks"), [
    ((3, 130), None, 3 * 3),
    ((215,), (0, 150, 0, 64, 1), 215 // 64 + 5),  # packed: the forward's bound on Σ ⌈length / 64⌉ = 5, no host sync
    ((2, 0), None, 0),  # empty sequences: no chunk, no A1
])
@pytest.mark.parametrize("resident", [3, 1])
def test_backward_launches_a1_then_the_walk_or_both_at_once(monkeypatch, lead, packed_lengths, chunks, resident):
    """The backward's host side. A1's items (one per chunk, head and row block) come with a zeroed queue; A1 writes
    the state before each 8-step sub-chunk into a scratch the walk reads (the kernel skips the chunks past a
    sequence's end). With room on the GPU only beside the busiest multiprocessors' walk blocks (here one block per
    multiprocessor: the walk's few blocks fill the busiest), A1 blocks share the walk's launch; else A1 runs alone
    first."""
    from m2rnn.kernels.m2rnn.triton_common import _prepare

    recorded = _RecordedLaunches(resident)
    monkeypatch.setattr(cuda_kernels, "get_kernel", recorded)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: type("P", (), {"multi_processor_count": 132}))
    heads, key_dim, value_dim = 6, 64, 16
    cu_seqlens = None
    if packed_lengths is not None:
        cu_seqlens = torch.tensor([0, *torch.tensor(packed_lengths).cumsum(0).tolist()], dtype=torch.int32)
    q, k = torch.zeros(*lead, 1, key_dim, dtype=torch.bfloat16), torch.zeros(*lead, 1, key_dim, dtype=torch.bfloat16)
    v, f = torch.zeros(*lead, heads, value_dim, dtype=torch.bfloat16), torch.zeros(*lead, heads, dtype=torch.bfloat16)
    w = torch.zeros(heads, value_dim, value_dim)
    config = M2RNNTritonConfig(cuda_kernels=True)
    layout, (q_, k_, v_, w_, f_, _) = _prepare(q, k, v, w, f, None, cu_seqlens, heads, config)
    checkpoints = torch.zeros(layout.total_chunks, heads, key_dim, value_dim)
    dy = torch.zeros(layout.tokens, heads, value_dim, dtype=torch.bfloat16)
    cuda_kernels.cuda_backward(layout, q_, k_, v_, w_, f_, checkpoints, dy, None, 1.0, False)

    tiles = cuda_kernels.tiles_per_warp(layout.batch * heads, key_dim, value_dim, 132, config,
                                        cuda_kernels.BACKWARD_COLUMNS)
    k_blocks = key_dim // (16 * tiles)
    items = layout.batch * heads * k_blocks
    walk_blocks = -(-items // 4)
    work = chunks * heads * k_blocks
    beside = 132 - walk_blocks if work and resident == 1 else 0
    assert layout.total_chunks == chunks
    alone_first = bool(work) and not beside
    assert [entry for entry, _, _ in recorded.launches] == ["m2rnn_backward_states"] * alone_first + ["m2rnn_backward"]
    _, grid, args = recorded.launches[-1]
    assert grid == walk_blocks + beside
    assert recorded.launch_defines[-1]["M2_A1_BESIDE"] == bool(beside)  # the walk's queue code only where used
    checkpoints_arg, scratch, queue = args[13:16]
    assert checkpoints_arg is checkpoints
    assert scratch.shape == (chunks, heads, k_blocks, config.checkpoint_interval // 8, 16 * tiles * value_dim)
    if beside:
        assert queue.dtype == torch.int32 and queue.tolist() == [0] * (2 + work)
    else:
        assert queue is None  # the walk alone needs no queue
    assert args[18:25] == [items, walk_blocks, work, layout.batch, layout.seqlen, layout.chunks_per_seq, chunks]
    if alone_first:
        _, grid, states_args = recorded.launches[0]
        assert grid == -(-work // 4)
        assert states_args[4] is checkpoints and states_args[5] is scratch
        assert states_args[8:12] == [work, layout.batch, layout.seqlen, layout.chunks_per_seq]


def test_occupancy_is_asked_of_the_driver_once_per_block_and_shared_size(monkeypatch):
    """The backward asks how many walk blocks a multiprocessor holds on every call: the driver answers once per
    (block, shared bytes), with the shared-memory ceiling raised first where the size needs it."""
    import contextlib
    import ctypes

    calls = []

    class Driver:
        def cuFuncSetAttribute(self, function, attribute, value):
            calls.append(("raise shared", value))
            return 0

        def cuOccupancyMaxActiveBlocksPerMultiprocessor(self, blocks, function, block, shared_bytes):
            calls.append(("occupancy", block, shared_bytes.value))
            ctypes.cast(blocks, ctypes.POINTER(ctypes.c_int)).contents.value = 3
            return 0

    monkeypatch.setattr(cuda_runtime, "_driver", lambda: Driver())
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    kernel = object.__new__(cuda_runtime.CudaKernel)  # no module to load on this machine
    kernel.function, kernel.entry, kernel.device, kernel.shared_limit, kernel._resident = None, "walk", None, 48 * 1024, {}
    assert kernel.resident_blocks_per_multiprocessor(128, 62464) == 3
    assert kernel.resident_blocks_per_multiprocessor(128, 62464) == 3
    assert kernel.resident_blocks_per_multiprocessor(128, 1024) == 3
    assert calls == [("raise shared", 62464), ("occupancy", 128, 62464), ("occupancy", 128, 1024)]


def test_availability_is_a_constant_under_fullgraph_compile():
    """A compiled decode step asks which backend runs: the availability check must not break the graph (its file
    checks, made first, are untraceable; found by the GPU test of a `fullgraph=True` CUDA-graph decoder)."""
    cuda_runtime._cuda_kernels_available.cache_clear()
    try:
        expected = cuda_runtime.cuda_kernels_available()
        cuda_runtime._cuda_kernels_available.cache_clear()
        torch._dynamo.reset()
        step = torch.compile(lambda x: x + cuda_runtime.cuda_kernels_available(), fullgraph=True, backend="eager")
        assert step(torch.zeros(2)).tolist() == [float(expected)] * 2
    finally:
        cuda_runtime._cuda_kernels_available.cache_clear()
        torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------------------------
# GPU only
# ----------------------------------------------------------------------------------------------------------------


def _inputs(batch, seqlen, heads, key_dim, value_dim, groups, dtype, packed=False, gate_dtype=None, seed=0):
    nq, nk, nv, nf, nw = groups
    g = torch.Generator().manual_seed(seed)
    lead = (batch * seqlen,) if packed else (batch, seqlen)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to("cuda", dtype)

    q = rand(*lead, nq, key_dim, scale=key_dim**-0.5)
    k = rand(*lead, nk, key_dim, scale=0.5)
    v = rand(*lead, nv, value_dim, scale=0.5)
    w = (0.3 * torch.eye(value_dim) + 0.3 * torch.randn(nw, value_dim, value_dim, generator=g) / value_dim**0.5)
    f = torch.sigmoid(torch.randn(*lead, nf, generator=g) + 1.5)
    h0 = torch.randn(batch, heads, key_dim, value_dim, generator=g) * 0.3
    return [q, k, v, w.to("cuda", dtype), f.to("cuda", gate_dtype or dtype), h0.to("cuda")]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


CASES = {
    # name: (batch, seqlen, heads, K, V, (Nq, Nk, Nv, Nf, Nw), dtype, gate dtype, with h0, block_k, clip)
    "400M layout, 2 tiles": (4, 300, 84, 64, 16, (1, 1, 84, 84, 84), torch.bfloat16, None, True, None, 1.0),
    "one tile, K split in 4": (1, 77, 6, 64, 16, (1, 1, 6, 6, 6), torch.bfloat16, None, False, 16, None),
    "four tiles, float16, float32 gates": (2, 130, 8, 64, 16, (2, 4, 8, 8, 8), torch.float16, torch.float32, True,
                                           64, 0.5),
    "V = 32, grouped W and gates": (2, 50, 4, 32, 32, (1, 2, 4, 2, 1), torch.bfloat16, None, True, None, None),
    "V = 64, K = 128 (Triton backward)": (1, 40, 2, 128, 64, (1, 1, 2, 2, 2), torch.bfloat16, None, True, None, None),
}
GRADIENTS = ("y", "final_state", "dq", "dk", "dv", "dweight", "dforget", "dinitial_state")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_kernels_match_reference(case):
    """Outputs and gradients of backend="cuda" against the float64 reference on the same (rounded) inputs, and
    against the Triton backend."""
    from m2rnn.kernels import m2rnn_recurrence

    batch, seqlen, heads, key_dim, value_dim, groups, dtype, gate_dtype, with_h0, block_k, clip = CASES[case]
    inputs = _inputs(batch, seqlen, heads, key_dim, value_dim, groups, dtype, gate_dtype=gate_dtype)
    if not with_h0:
        inputs[-1] = None
    # a checkpoint interval of 16 puts several checkpoints and sub-chunks in every sequence
    config = M2RNNTritonConfig(block_k=block_k, checkpoint_interval=16)
    got = _grads(lambda *x: m2rnn_recurrence(*x, gradient_clipping=clip, backend="cuda", triton_config=config),
                 inputs)
    triton = _grads(lambda *x: m2rnn_recurrence(*x, gradient_clipping=clip, backend="triton"), inputs)
    want = _grads(lambda *x: m2rnn_recurrence_torch(*x, gradient_clipping=clip),
                  [x.double() if x is not None else None for x in inputs])
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    # 16-bit H @ W operands and tanh.approx, as the Triton kernels for 16-bit inputs: errors of their size
    errors = {name: _rel(a, b) for name, a, b in zip(GRADIENTS, got, want)}
    assert max(errors.values()) < 3e-2, (case, errors)
    errors = {name: _rel(a, b) for name, a, b in zip(GRADIENTS, got, triton)}
    assert max(errors.values()) < 3e-2, (case, "vs triton", errors)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("clip", [None, 1.0])
def test_cuda_backend_trains_like_reference_real_shape(clip):
    """bf16 at the paper's head layout through the public op with backend="cuda", gradients included (the
    backward starts from the CUDA forward's checkpoints)."""
    from m2rnn.kernels import m2rnn_recurrence

    inputs = _inputs(2, 1000, 84, 64, 16, (1, 1, 84, 84, 84), torch.bfloat16)
    got = _grads(lambda *x: m2rnn_recurrence(*x, gradient_clipping=clip, backend="cuda"), inputs)
    want = _grads(lambda *x: m2rnn_recurrence_torch(*x, gradient_clipping=clip), [x.float() for x in inputs])
    errors = {name: _rel(a, b) for name, a, b in zip(("y", "ht", "dq", "dk", "dv", "dw", "df", "dh0"), got, want)}
    assert max(errors.values()) < 3e-2, errors


@pytest.mark.gpu
@gpu
def test_cuda_backend_packed_documents():
    """Packed documents (one empty, one of a single token) through the public op with backend="cuda"."""
    from m2rnn.kernels import m2rnn_recurrence

    cu_seqlens = torch.tensor([0, 700, 701, 701, 1001], dtype=torch.int32, device="cuda")
    inputs = _inputs(1, 1001, 84, 64, 16, (1, 1, 84, 84, 84), torch.bfloat16, packed=True)
    inputs[-1] = (torch.randn(4, 84, 64, 16) * 0.3).to("cuda")
    got = _grads(lambda *x: m2rnn_recurrence(*x, cu_seqlens=cu_seqlens, gradient_clipping=1.0, backend="cuda"),
                 inputs)
    want = _grads(lambda *x: m2rnn_recurrence_torch(*x, cu_seqlens=cu_seqlens, gradient_clipping=1.0),
                  [x.float() for x in inputs])
    errors = {name: _rel(a, b) for name, a, b in zip(("y", "ht", "dq", "dk", "dv", "dw", "df", "dh0"), got, want)}
    assert max(errors.values()) < 3e-2, errors
    torch.testing.assert_close(got[1][2], inputs[-1][2])  # the empty document keeps its initial state


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("packed", [False, True])
def test_cuda_backward_is_the_same_whoever_runs_a1(monkeypatch, packed):
    """A1's items give the same scratch whichever warps run them: A1 alone before the walk (this shape's default),
    one A1 block beside the walk (whose warps then run most items themselves while they wait), or more A1 blocks
    than the GPU holds. Bit-equal gradients, and no hang; the launches show which plan ran."""
    from m2rnn.kernels import m2rnn_recurrence

    sequences = 5 if packed else 3
    cu_seqlens = torch.tensor([0, 300, 301, 301, 777, 1200], dtype=torch.int32, device="cuda") if packed else None
    inputs = _inputs(1 if packed else 3, 1200 if packed else 400, 84, 64, 16, (1, 1, 84, 84, 84), torch.bfloat16,
                     packed=packed)
    if packed:
        inputs[-1] = (torch.randn(sequences, 84, 64, 16) * 0.3).to("cuda")
    config = M2RNNTritonConfig(checkpoint_interval=16)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    tiles = cuda_kernels.tiles_per_warp(sequences * 84, 64, 16, sms, config, cuda_kernels.BACKWARD_COLUMNS)
    walk_blocks = -(-sequences * 84 * (64 // (16 * tiles)) // 4)
    launched = []
    launch = cuda_runtime.CudaKernel.launch

    def recording_launch(self, grid, block, args, shared_bytes=0):
        launched.append((self.entry, grid))
        return launch(self, grid, block, args, shared_bytes)

    monkeypatch.setattr(cuda_runtime.CudaKernel, "launch", recording_launch)

    def run(beside):
        launched.clear()
        grads = _grads(lambda *x: m2rnn_recurrence(*x, cu_seqlens=cu_seqlens, gradient_clipping=1.0, backend="cuda",
                                                   triton_config=config), inputs)
        backward = [(entry, grid) for entry, grid in launched if entry.startswith("m2rnn_backward")]
        if beside:
            assert backward == [("m2rnn_backward", walk_blocks + beside)]
        else:
            assert [entry for entry, _ in backward] == ["m2rnn_backward_states", "m2rnn_backward"]
            assert backward[1][1] == walk_blocks
        return grads

    alone_first = run(0)
    for beside in (1, 5000):
        monkeypatch.setattr(cuda_kernels, "a1_blocks_beside_walk", lambda *_, beside=beside: beside)
        for name, a, b in zip(GRADIENTS, run(beside), alone_first):
            assert torch.equal(a, b), (beside, name)


def _grads(fn, inputs):
    """Outputs and the gradients of a random linear loss on y and the final state (inputs may hold a None)."""
    inputs = [x.detach().clone().requires_grad_() if x is not None else None for x in inputs]
    y, ht = fn(*inputs)
    g = torch.Generator().manual_seed(1)
    dy = torch.randn(y.shape, generator=g).to(y.device)
    dht = torch.randn(ht.shape, generator=g).to(ht.device)
    loss = (y.double() * dy).sum() + (ht.double() * dht).sum()
    return [y.detach(), ht.detach(), *torch.autograd.grad(loss, [x for x in inputs if x is not None])]
