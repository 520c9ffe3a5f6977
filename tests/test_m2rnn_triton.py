"""Triton M2RNN kernels against the torch reference.

Without CUDA the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before anything
defines a kernel); shapes are tiny because the interpreter runs every program in numpy. Tests marked `gpu`
need CUDA: bf16 at real shapes, more than 2³² state elements in one call, and S = 65,536.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from m2rnn.kernels import M2RNNTritonConfig, m2rnn_decode_step_torch, m2rnn_recurrence_torch  # noqa: E402
from m2rnn.kernels.m2rnn import autograd, op  # noqa: E402
from m2rnn.kernels.m2rnn.decode import m2rnn_decode_step_triton  # noqa: E402
from m2rnn.kernels.m2rnn.triton_common import checkpoints_shape  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
NAMES = ("q", "k", "v", "weight", "forget", "initial_state")


# Checkpoint every 8 steps so that short sequences cross several chunks and end mid-chunk.
SHORT = M2RNNTritonConfig(checkpoint_interval=8)
REAL = M2RNNTritonConfig()


def m2rnn_recurrence_triton(*args, config=SHORT, **kwargs):
    return autograd.m2rnn_recurrence_triton(*args, config=config, **kwargs)


def make_inputs(batch, seqlen, heads, key_dim, value_dim, groups=None, dtype=torch.float32, seed=0, packed=False,
                device=DEVICE, w_diagonal=1.0):
    """Random inputs: W = w_diagonal·I + noise, gates in (0.5, 1).

    Long sequences use w_diagonal < 1: with W near I and random inputs the recurrence can be chaotic, and then
    any two correct implementations (fp32 with different rounding) drift apart and their gradients explode.
    """
    nq, nk, nv, nf, nw = groups or (heads,) * 5
    g = torch.Generator().manual_seed(seed)
    lead = (batch * seqlen,) if packed else (batch, seqlen)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    q = rand(*lead, nq, key_dim, scale=key_dim**-0.5)
    k = rand(*lead, nk, key_dim, scale=0.5)
    v = rand(*lead, nv, value_dim, scale=0.5)
    w = (w_diagonal * torch.eye(value_dim) + 0.3 * torch.randn(nw, value_dim, value_dim, generator=g) / value_dim**0.5).to(device, dtype)
    f = torch.sigmoid(torch.randn(*lead, nf, generator=g) + 1.5).to(device, dtype)
    h0 = (torch.randn(1 if packed else batch, heads, key_dim, value_dim, generator=g) * 0.3).to(device)
    return [q, k, v, w, f, h0]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def run(fn, inputs, seed=1, final_only=False, **kwargs):
    """Outputs and gradients of a random linear loss on y and the final state."""
    inputs = [x.detach().clone().requires_grad_() if x is not None else None for x in inputs]
    y, ht = fn(*inputs, **kwargs)
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(y.shape, generator=g).to(y.device)
    dht = torch.randn(ht.shape, generator=g).to(ht.device)
    loss = (ht.double() * dht).sum() if final_only else (y.double() * dy).sum() + (ht.double() * dht).sum()
    grads = torch.autograd.grad(loss, [x for x in inputs if x is not None])
    return y, ht, grads


def reference(inputs, **kwargs):
    """The torch reference in float64 on the same (rounded) inputs."""
    return run(m2rnn_recurrence_torch, [x.double() if x is not None else None for x in inputs], **kwargs)


def assert_close(got, want, tol, what=""):
    y, ht, grads = got
    y_ref, ht_ref, grads_ref = want
    errors = {"y": rel(y, y_ref), "final_state": rel(ht, ht_ref)}
    errors.update({f"d{name}": rel(a, b) for name, a, b in zip(NAMES, grads, grads_ref)})
    bad = {name: err for name, err in errors.items() if not err < tol}
    assert not bad, f"{what} relative errors above {tol}: {bad}"


GROUPINGS = {
    "shared_qk": (1, 1, 4, 4, 4),  # the paper models: one q/k head for all state heads
    "mixed": (2, 4, 1, 2, 4),
    "ungrouped": (4, 4, 4, 4, 4),
}


@pytest.mark.parametrize("grouping", list(GROUPINGS))
@pytest.mark.parametrize("clip", [None, 0.05])
def test_matches_reference_fp32(grouping, clip):
    # K=32 with B·N=8 splits the rows over two programs; V=8 is padded to 16 inside the kernel; S=19 is not a
    # multiple of the checkpoint interval.
    inputs = make_inputs(2, 19, 4, 32, 8, GROUPINGS[grouping])
    if grouping == "ungrouped":
        inputs[-1] = None  # also cover a missing initial state
    want = reference(inputs, gradient_clipping=clip)
    assert_close(run(m2rnn_recurrence_triton, inputs, gradient_clipping=clip), want, 1e-4, grouping)
    if clip is not None:  # the clip must bite, or the test proves nothing about it
        unclipped = reference(inputs)
        assert rel(unclipped[2][1], want[2][1]) > 1e-2


@pytest.mark.parametrize("half_state_dot", [False, True])
@pytest.mark.parametrize("unroll", [1, 2])
def test_matches_reference_fp16(half_state_dot, unroll):
    config = M2RNNTritonConfig(checkpoint_interval=8, half_precision_state_dot=half_state_dot, loop_unroll=unroll)
    inputs = make_inputs(2, 13, 4, 16, 16, GROUPINGS["shared_qk"], dtype=torch.float16)
    inputs[-1] = inputs[-1].half()
    assert_close(run(m2rnn_recurrence_triton, inputs, gradient_clipping=0.05, config=config),
                 reference(inputs, gradient_clipping=0.05), 2e-2, "fp16")


@pytest.mark.parametrize("with_h0", [True, False])
def test_exported_forward_backward_pair_equals_autograd(with_h0):
    """The pair that the torch.library ops wrap (forward returning its checkpoints, backward starting from them)
    gives the autograd path's outputs and gradients."""
    inputs = make_inputs(2, 11, 4, 16, 8, GROUPINGS["shared_qk"])
    if not with_h0:
        inputs[-1] = None
    y, ht, grads = run(m2rnn_recurrence_triton, inputs, gradient_clipping=0.05)
    y2, ht2, checkpoints = autograd.m2rnn_recurrence_triton_forward(*inputs, config=SHORT)
    assert checkpoints.shape == checkpoints_shape(inputs[0], inputs[2], 4, None, 8)
    g = torch.Generator().manual_seed(1)  # the same cotangents as `run`
    dy, dht = torch.randn(y.shape, generator=g).to(y.device), torch.randn(ht.shape, generator=g).to(ht.device)
    grads2 = autograd.m2rnn_recurrence_triton_backward(
        *inputs, checkpoints, dy, dht, gradient_clipping=0.05, config=SHORT
    )
    assert torch.equal(y, y2) and torch.equal(ht, ht2)
    assert (grads2[5] is None) == (not with_h0)
    for a, b in zip(grads, [x for x in grads2 if x is not None]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_compiled_op_equals_eager():
    """Under torch.compile the op is the registered custom op pair (forward keeping its checkpoints, backward
    starting from them), with the launch config passed through; outputs and gradients equal the eager path."""
    inputs = make_inputs(2, 11, 4, 16, 8, GROUPINGS["shared_qk"])
    config = M2RNNTritonConfig(checkpoint_interval=4)  # not the default: the custom op must carry it through

    def fn(*args, **kwargs):
        return op.m2rnn_recurrence(*args, backend="triton", triton_config=config, **kwargs)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    eager = run(fn, inputs, gradient_clipping=0.05)
    got = run(compiled, inputs, gradient_clipping=0.05)
    for a, b in zip((eager[0], eager[1], *eager[2]), (got[0], got[1], *got[2])):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_loss_on_final_state_only():
    inputs = make_inputs(1, 11, 2, 16, 16)
    assert_close(run(m2rnn_recurrence_triton, inputs, final_only=True), reference(inputs, final_only=True), 1e-4)


def test_packed_sequences():
    lengths = [9, 1, 0, 14]
    cu_seqlens = torch.tensor([0, 9, 10, 10, 24], dtype=torch.int32, device=DEVICE)
    inputs = make_inputs(1, sum(lengths), 4, 32, 16, GROUPINGS["mixed"], packed=True)
    inputs[-1] = (torch.randn(len(lengths), 4, 32, 16) * 0.3).to(DEVICE)
    want = reference(inputs, cu_seqlens=cu_seqlens, gradient_clipping=0.05)
    # through the public op: cu_seqlens validated, the launch config passed down
    got = run(op.m2rnn_recurrence, inputs, cu_seqlens=cu_seqlens, gradient_clipping=0.05, backend="triton",
              triton_config=SHORT)
    assert_close(got, want, 1e-4, "packed")
    # nothing leaks across boundaries: the empty sequence returns its initial state untouched
    torch.testing.assert_close(got[1][2], inputs[-1][2])


def test_no_grad_forward_matches():
    inputs = make_inputs(2, 10, 4, 16, 16, GROUPINGS["shared_qk"])
    with torch.no_grad():
        y, ht = m2rnn_recurrence_triton(*inputs)
        y_ref, ht_ref = m2rnn_recurrence_torch(*[x.double() for x in inputs])
    assert rel(y, y_ref) < 1e-5 and rel(ht, ht_ref) < 1e-5


def test_decode_step_takes_strided_inputs():
    """q, k, v sliced out of a wider projection (last dimension strided) give the same step as contiguous ones."""
    q, k, v, w, f, h0 = make_inputs(2, 1, 4, 16, 16, GROUPINGS["shared_qk"])
    wide = [torch.stack([x[:, 0], torch.zeros_like(x[:, 0])], dim=-1) for x in (q, k, v)]
    strided = [x[..., 0] for x in wide]
    assert all(x.stride(-1) == 2 for x in strided)
    state_a, state_b = h0.clone(), h0.clone()
    y_a = m2rnn_decode_step_triton(*strided, w, f[:, 0], state_a)
    y_b = m2rnn_decode_step_triton(q[:, 0], k[:, 0], v[:, 0], w, f[:, 0], state_b)
    assert torch.equal(y_a, y_b) and torch.equal(state_a, state_b)


def test_decode_steps_equal_forward():
    batch, steps, heads, key_dim, value_dim = 2, 5, 4, 16, 8
    q, k, v, w, f, h0 = make_inputs(batch, steps, heads, key_dim, value_dim, GROUPINGS["mixed"])
    with torch.no_grad():
        y_ref, ht_ref = m2rnn_recurrence_torch(q, k, v, w, f, h0)
    state, state_torch = h0.clone(), h0.clone()
    for t in range(steps):
        # strided views, as the model slices them out of one projection
        y = m2rnn_decode_step_triton(q[:, t], k[:, t], v[:, t], w, f[:, t], state)
        y_torch = m2rnn_decode_step_torch(q[:, t], k[:, t], v[:, t], w, f[:, t], state_torch)
        assert y.shape == (batch, heads, value_dim) and y.dtype == v.dtype
        assert rel(y, y_ref[:, t]) < 1e-5 and rel(y, y_torch) < 1e-5
    assert rel(state, ht_ref) < 1e-5


@pytest.mark.parametrize(("key_dim", "value_dim", "bad"), [(512, 16, "K=512"), (16, 128, "V=128")])
def test_rejects_large_head_dims(key_dim, value_dim, bad):
    inputs = make_inputs(1, 2, 2, key_dim, value_dim)
    with pytest.raises(ValueError, match=bad):
        m2rnn_recurrence_triton(*inputs)
    with pytest.raises(ValueError, match=bad):
        m2rnn_decode_step_triton(*(x[:, 0] for x in inputs[:3]), inputs[3], inputs[4][:, 0], inputs[5])


_BAD_CU_SEQLENS_SCRIPT = """
import torch
from m2rnn.kernels import m2rnn_recurrence
torch.manual_seed(0)
tokens, heads, key_dim, value_dim = 10, 2, 16, 16
q, k = torch.randn(tokens, heads, key_dim), torch.randn(tokens, heads, key_dim)
v, weight = torch.randn(tokens, heads, value_dim), torch.randn(heads, value_dim, value_dim)
forget = torch.rand(tokens, heads) * 0.5 + 0.25
for bounds in ([2, 4, 10], [0, 6, 4, 10], [-3, 4, 10], [0, 4, 1000], [0, 4, 9]):
    try:
        y, state = m2rnn_recurrence(q, k, v, weight, forget, cu_seqlens=torch.tensor(bounds, dtype=torch.int32),
                                    backend="triton")
        print("accepted", bounds, tuple(y.shape), float(y.abs().max()), flush=True)
    except ValueError as error:
        print("refused", bounds, error, flush=True)
"""


def test_bad_cu_seqlens_are_refused_before_the_triton_kernel_runs():
    """Run in a subprocess under the interpreter: unchecked, these boundaries made the kernels read and write out of
    bounds (an abort would kill the test process) or return uninitialised rows."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", _BAD_CU_SEQLENS_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 5 and all(line.startswith("refused") for line in lines), result.stdout
    assert all("cu_seqlens must start at 0, never decrease and end at T=10" in line for line in lines)


@pytest.mark.parametrize("with_state", [True, False])
def test_one_step_without_grad_runs_the_decode_kernel(with_state, monkeypatch):
    """S == 1 with nothing to differentiate goes to the decode kernel (one launch) and equals the reference."""
    dispatch = op
    inputs = make_inputs(3, 1, 4, 16, 8, GROUPINGS["mixed"])
    if not with_state:
        inputs[-1] = None
    calls = []
    decode = dispatch.m2rnn_decode_step_triton
    monkeypatch.setattr(dispatch, "m2rnn_decode_step_triton", lambda *a: calls.append(1) or decode(*a))

    def sequence_kernel(*args, **kwargs):
        raise AssertionError("the sequence kernel ran for S == 1")

    monkeypatch.setattr(dispatch, "m2rnn_recurrence_triton", sequence_kernel)
    with torch.no_grad():
        y, state = dispatch.m2rnn_recurrence(*inputs, backend="triton")
        y_ref, state_ref = m2rnn_recurrence_torch(*[x.double() if x is not None else None for x in inputs])
    assert calls == [1]
    assert y.shape == y_ref.shape and y.dtype == inputs[0].dtype and state.dtype == torch.float32
    assert rel(y, y_ref) < 1e-5 and rel(state, state_ref) < 1e-5
    if with_state:
        assert not torch.equal(state, inputs[-1])  # a new tensor: the caller's initial state is left alone


# ----------------------------------------------------------------------------------------------------------------
# GPU only
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("clip", [None, 1.0])
@pytest.mark.parametrize("variant", ["default", "fp16 H@W"])
def test_bf16_real_shape(clip, variant):
    config = {"default": REAL, "fp16 H@W": M2RNNTritonConfig(half_precision_state_dot=True)}[variant]
    # W = 0.3·I + noise has spectral norm < 1: without clipping, a recurrence that is not contractive amplifies
    # the rounding of any two correct implementations over 1000 steps (seen on the H100: 50% apart in dk).
    inputs = make_inputs(2, 1000, 84, 64, 16, (1, 1, 84, 84, 84), dtype=torch.bfloat16, w_diagonal=0.3)
    want = run(m2rnn_recurrence_torch, [x.float() for x in inputs], gradient_clipping=clip)
    got = run(m2rnn_recurrence_triton, inputs, gradient_clipping=clip, config=config)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    assert_close(got, want, 3e-2, "bf16")


@pytest.mark.gpu
@gpu
def test_bf16_packed_real_shape():
    """Packed documents (one empty, one of a single token) at the paper's head layout, through the public op."""
    lengths = [700, 1, 0, 300]
    cu_seqlens = torch.tensor([0, 700, 701, 701, 1001], dtype=torch.int32, device=DEVICE)
    inputs = make_inputs(1, sum(lengths), 84, 64, 16, (1, 1, 84, 84, 84), dtype=torch.bfloat16, packed=True,
                         w_diagonal=0.3)
    inputs[-1] = (torch.randn(len(lengths), 84, 64, 16) * 0.3).to(DEVICE)
    want = run(m2rnn_recurrence_torch, [x.float() for x in inputs], cu_seqlens=cu_seqlens, gradient_clipping=1.0)
    got = run(op.m2rnn_recurrence, inputs, cu_seqlens=cu_seqlens, gradient_clipping=1.0, backend="triton")
    assert_close(got, want, 3e-2, "bf16 packed")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kernels", ["triton", "cuda"])
def test_more_than_2_pow_32_state_elements(kernels):
    """16·4096·84·64·16 = 5.8e9 state elements in one call, checked against its two halves."""
    config = M2RNNTritonConfig(cuda_kernels=kernels == "cuda")
    inputs = make_inputs(16, 4096, 84, 64, 16, (1, 1, 84, 84, 84), dtype=torch.bfloat16)
    upper = [x if i == 3 else x[8:] for i, x in enumerate(inputs)]  # weight is shared, the rest is per sequence
    with torch.no_grad():
        y, ht = m2rnn_recurrence_triton(*inputs, config=config)
        y_upper, ht_upper = m2rnn_recurrence_triton(*upper, config=config)
    # (the two calls may autotune to different warp counts, which reorders the readout's row sum)
    assert rel(y[8:], y_upper) < 1e-2 and rel(ht[8:], ht_upper) < 1e-5
    # a loss on the upper half only: its gradients live at the offsets above 2³²
    dy = torch.randn(y.shape, device=DEVICE, dtype=y.dtype)
    dy[:8] = 0
    full = [x.detach().clone().requires_grad_() for x in inputs]
    part = [x.detach().clone().requires_grad_() for x in upper]
    grads_full = torch.autograd.grad((m2rnn_recurrence_triton(*full, config=config)[0].float() * dy).sum(), full)
    grads_part = torch.autograd.grad((m2rnn_recurrence_triton(*part, config=config)[0].float() * dy[8:]).sum(), part)
    for i, (a, b) in enumerate(zip(grads_full, grads_part)):
        assert rel(a if i == 3 else a[8:], b) < 1e-3, f"d{NAMES[i]}: {rel(a if i == 3 else a[8:], b)}"


@pytest.mark.gpu
@gpu
def test_long_sequence_stable():
    inputs = make_inputs(1, 65536, 84, 64, 16, (1, 1, 84, 84, 84), dtype=torch.bfloat16, w_diagonal=0.3)
    y, ht, grads = run(m2rnn_recurrence_triton, inputs, gradient_clipping=1.0, config=REAL)
    y32, ht32, grads32 = run(m2rnn_recurrence_triton, [x.float() for x in inputs], gradient_clipping=1.0, config=REAL)
    for name, x in [("y", y), ("final_state", ht), *zip(NAMES, grads)]:
        assert torch.isfinite(x).all(), name
    drift = {"y": rel(y, y32), "final_state": rel(ht, ht32), **{f"d{n}": rel(a, b) for n, a, b in zip(NAMES, grads, grads32)}}
    print("S=65536 bf16-vs-fp32 drift:", {k: f"{v:.2e}" for k, v in drift.items()})
    assert drift["y"] < 0.1 and drift["final_state"] < 0.1


@pytest.mark.gpu
@gpu
def test_decode_in_cuda_graph():
    q, k, v, w, f, h0 = make_inputs(8, 1, 84, 64, 16, (1, 1, 84, 84, 84), dtype=torch.bfloat16)
    args = (q[:, 0], k[:, 0], v[:, 0], w, f[:, 0])
    state = h0.clone()
    m2rnn_decode_step_triton(*args, state)  # compile outside the capture
    state.copy_(h0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_graph = m2rnn_decode_step_triton(*args, state)
    state.copy_(h0)
    graph.replay()
    state_eager = h0.clone()
    y_eager = m2rnn_decode_step_triton(*args, state_eager)
    assert torch.equal(y_graph, y_eager) and torch.equal(state, state_eager)
