"""The torch reference of the M2RNN recurrence against plain autograd through an unrolled loop."""

import pytest
import torch

from m2rnn.kernels import m2rnn_decode_step, m2rnn_recurrence, m2rnn_recurrence_torch


class _ClipGrad(torch.autograd.Function):
    """Identity whose backward clamps the gradient: placed on the carry only, it is carry-only clipping."""

    @staticmethod
    def forward(ctx, x, c):
        ctx.c = c
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.clamp(-ctx.c, ctx.c), None


def unrolled(q, k, v, w, f, h0, clip=None):
    """Head-expanded plain loop: autograd differentiates it; the carry passes through _ClipGrad when clipping."""
    n = max(q.shape[2], k.shape[2], v.shape[2], f.shape[2], w.shape[0])
    q, k, v, f = (x.repeat_interleave(n // x.shape[2], 2) for x in (q, k, v, f))
    w = w.repeat_interleave(n // w.shape[0], 0)
    h = h0
    ys = []
    for t in range(q.shape[1]):
        carry = _ClipGrad.apply(h, clip) if clip is not None and t > 0 else h  # ∂L/∂h0 is returned unclipped
        z = torch.tanh(carry @ w + k[:, t, :, :, None] * v[:, t, :, None, :])
        ft = f[:, t, :, None, None]
        h = ft * carry + (1 - ft) * z
        ys.append(torch.einsum("bnk,bnkv->bnv", q[:, t], h))
    final = _ClipGrad.apply(h, clip) if clip is not None else h
    return torch.stack(ys, 1), final


def make_inputs(b=2, s=7, nq=1, nk=1, nv=4, nf=4, nw=4, k=8, v=4, dtype=torch.float64, seed=0, packed=False):
    g = torch.Generator().manual_seed(seed)
    n = max(nq, nk, nv, nf, nw)
    lead = (b * s,) if packed else (b, s)
    tensors = dict(
        q=torch.randn(*lead, nq, k, generator=g, dtype=dtype),
        k=torch.randn(*lead, nk, k, generator=g, dtype=dtype) * 0.5,
        v=torch.randn(*lead, nv, v, generator=g, dtype=dtype) * 0.5,
        weight=(torch.eye(v, dtype=dtype) + 0.3 * torch.randn(nw, v, v, generator=g, dtype=dtype)),
        forget=torch.rand(*lead, nf, generator=g, dtype=dtype) * 0.9 + 0.05,
        initial_state=torch.randn(b, n, k, v, generator=g, dtype=dtype) * 0.5,
    )
    for t in tensors.values():
        t.requires_grad_(True)
    return tensors


def grads(outputs, inputs, seed=1):
    y, h = outputs
    g = torch.Generator().manual_seed(seed)
    loss = (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum() + (
        h * torch.randn(h.shape, generator=g, dtype=h.dtype)
    ).sum()
    return torch.autograd.grad(loss, list(inputs.values()))


@pytest.mark.parametrize("heads", [dict(), dict(nq=2, nk=4, nv=4, nf=2, nw=1), dict(nq=4, nk=4, nv=1, nf=4, nw=4)])
def test_forward_and_gradients_match_unrolled_loop(heads):
    x = make_inputs(**heads)
    ours = m2rnn_recurrence_torch(**x)
    ref = unrolled(x["q"], x["k"], x["v"], x["weight"], x["forget"], x["initial_state"])
    torch.testing.assert_close(ours[0], ref[0])
    torch.testing.assert_close(ours[1], ref[1])
    for a, b in zip(grads(ours, x), grads(ref, x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_carry_only_clipping_matches_hand_written_reference():
    x = make_inputs(s=9)
    clip = 0.05
    ours = grads(m2rnn_recurrence_torch(**x, gradient_clipping=clip), x)
    ref = grads(unrolled(x["q"], x["k"], x["v"], x["weight"], x["forget"], x["initial_state"], clip=clip), x)
    unclipped = grads(m2rnn_recurrence_torch(**x), x)
    for a, b, c in zip(ours, ref, unclipped):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any((a - c).abs().max() > 1e-3 for a, c in zip(ours[1:], unclipped[1:])), "clipping must bite here"
    torch.testing.assert_close(ours[0], unclipped[0])  # dq has no carry term: clipping never touches it


def test_state_is_float32_and_output_keeps_input_dtype():
    x = {k: t.detach().to(torch.float16) for k, t in make_inputs(dtype=torch.float32).items()}
    y, h = m2rnn_recurrence(**x, backend="torch")
    assert y.dtype == torch.float16 and h.dtype == torch.float32
    y32, h32 = m2rnn_recurrence(**{k: t.float() for k, t in x.items()}, backend="torch")
    torch.testing.assert_close(y.float(), y32, rtol=2e-3, atol=2e-3)


def test_packed_sequences_equal_separate_calls():
    x = make_inputs(b=3, s=5, packed=True)
    lengths = [4, 1, 10]
    cu = torch.tensor([0, 4, 5, 15], dtype=torch.int32)
    y, h = m2rnn_recurrence_torch(**x, cu_seqlens=cu)
    for i, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        yi, hi = m2rnn_recurrence_torch(
            *(x[n][None, start:end] for n in ("q", "k", "v")), x["weight"], x["forget"][None, start:end],
            x["initial_state"][i : i + 1],
        )
        torch.testing.assert_close(y[start:end], yi[0])
        torch.testing.assert_close(h[i : i + 1], hi)
    assert sum(lengths) == y.shape[0]


def test_decode_steps_equal_full_recurrence():
    x = {k: t.detach() for k, t in make_inputs(nq=2, nk=1, nv=4, nf=4, nw=2).items()}
    y_full, h_full = m2rnn_recurrence(**x)
    state = x["initial_state"].clone()
    for t in range(x["q"].shape[1]):
        y_t = m2rnn_decode_step(
            x["q"][:, t], x["k"][:, t], x["v"][:, t], x["weight"], x["forget"][:, t], state
        )
        torch.testing.assert_close(y_t, y_full[:, t])
    torch.testing.assert_close(state, h_full)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(v=torch.zeros(2, 7, 3, 4)), "v has 3 heads"),
        (dict(weight=torch.zeros(4, 5, 5)), "weight is"),
        (dict(k=torch.zeros(2, 7, 1, 9)), "k head dim"),
        (dict(initial_state=torch.zeros(2, 4, 8, 5)), "initial_state must be"),
        (dict(forget=torch.zeros(2, 6, 4)), "forget has leading shape"),
    ],
)
def test_bad_shapes_raise_clear_errors(change, message):
    x = {k: t.detach() for k, t in make_inputs(dtype=torch.float32).items()}
    x.update(change)
    with pytest.raises(ValueError, match=message):
        m2rnn_recurrence(**x)


def test_unknown_backend_is_refused():
    x = {k: t.detach() for k, t in make_inputs(dtype=torch.float32).items()}
    with pytest.raises(ValueError, match="unknown backend='tpu'"):
        m2rnn_recurrence(**x, backend="tpu")


def test_cuda_backend_on_cpu_inputs_is_refused_with_the_reason():
    x = {k: t.detach() for k, t in make_inputs(dtype=torch.float32).items()}
    with pytest.raises(RuntimeError, match="backend='cuda' needs a CUDA device.*inputs are on cpu"):
        m2rnn_recurrence(**x, backend="cuda")


def test_backend_variable_names_the_default(monkeypatch):
    """M2RNN_BACKEND picks the backend of calls that name none, checked like an explicit one."""
    x = {k: t.detach() for k, t in make_inputs(dtype=torch.float32).items()}
    monkeypatch.setenv("M2RNN_BACKEND", "torch")
    y, _ = m2rnn_recurrence(**x)
    torch.testing.assert_close(y, m2rnn_recurrence(**x, backend="torch")[0])
    monkeypatch.setenv("M2RNN_BACKEND", "tpu")
    with pytest.raises(ValueError, match="unknown M2RNN_BACKEND='tpu'"):
        m2rnn_recurrence(**x)
    m2rnn_recurrence(**x, backend="torch")  # an explicit backend wins over the variable


def packed_inputs(tokens=10):
    return {k: t.detach().float() for k, t in make_inputs(b=1, s=tokens, packed=True).items()} | {"initial_state": None}


@pytest.mark.parametrize("bounds", [[2, 4, 10], [0, 6, 4, 10], [-3, 4, 10], [0, 4, 9], [0, 4, 11]])
def test_cu_seqlens_values_are_refused(bounds):
    """Wrong starts, decreasing boundaries or a wrong total used to return wrong row counts silently."""
    x = packed_inputs()
    with pytest.raises(ValueError, match=r"cu_seqlens must start at 0, never decrease and end at T=10"):
        m2rnn_recurrence(**x, cu_seqlens=torch.tensor(bounds, dtype=torch.int32), backend="torch")


@pytest.mark.parametrize(
    "cu_seqlens, message",
    [
        (torch.tensor([0, 4, 10]), "1-D int32"),
        (torch.tensor([[0, 4, 10]], dtype=torch.int32), "1-D int32"),
        (torch.tensor([0], dtype=torch.int32), "1-D int32"),
        (torch.tensor([0, 4, 10], dtype=torch.int32, device="meta"), "cu_seqlens is on meta"),
    ],
)
def test_cu_seqlens_layout_is_refused(cu_seqlens, message):
    with pytest.raises(ValueError, match=message):
        m2rnn_recurrence(**packed_inputs(), cu_seqlens=cu_seqlens)


@pytest.mark.parametrize("clip", [-1, 0, 0.0, float("nan"), float("inf"), "1", True])
def test_gradient_clipping_must_be_none_or_positive(clip):
    x = {k: t.detach() for k, t in make_inputs(dtype=torch.float32).items()}
    with pytest.raises(ValueError, match=f"gradient_clipping must be None.*got {clip!r}"):
        m2rnn_recurrence(**x, gradient_clipping=clip)


@pytest.mark.parametrize("value", [-1e-6, -0.2, 1.5, float("inf"), float("nan")])
def test_forget_gates_outside_unit_interval_are_refused(value):
    x = {k: t.detach() for k, t in make_inputs(dtype=torch.float32).items()}
    x["forget"][1, 3, 2] = value
    with pytest.raises(ValueError, match=r"forget gates must lie in \[0, 1\], got 1 outside"):
        m2rnn_recurrence(**x)


def test_forget_gates_of_zero_and_one_are_accepted_and_value_checks_can_be_skipped(monkeypatch):
    """f = 1 keeps the state (padding does that), f = 0 is the model gate's float32 underflow;
    M2RNN_SKIP_VALUE_CHECKS=1 trusts the values (documented)."""
    x = {k: t.detach() for k, t in make_inputs(dtype=torch.float32).items()}
    x["forget"][:, 2] = 1.0
    x["forget"][:, 3] = 0.0
    m2rnn_recurrence(**x)
    x["forget"][0, 0, 0] = 2.0
    monkeypatch.setenv("M2RNN_SKIP_VALUE_CHECKS", "1")
    m2rnn_recurrence(**x)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(checkpoint_interval=0), "checkpoint_interval must be >= 1"),
        (dict(block_k=48), "block_k must be None, 16, 32 or 64"),
        (dict(loop_unroll=0), "loop_unroll must be >= 1"),
    ],
)
def test_triton_launch_config_refuses_bad_fields(fields, message):
    """The launch knobs are a frozen dataclass passed in (no module globals); bad values are named at construction."""
    from m2rnn.kernels import M2RNNTritonConfig

    with pytest.raises(ValueError, match=message):
        M2RNNTritonConfig(**fields)
    config = M2RNNTritonConfig()
    with pytest.raises(AttributeError):
        config.block_k = 32


def test_reference_keeps_no_states_without_gradients(monkeypatch):
    """Inference through the reference holds one state, not S+1 (the demo's CPU evaluation at length 512)."""
    import m2rnn.kernels.m2rnn.reference as reference

    calls = []
    original = reference._run

    def spy(*args, keep_states):
        calls.append(keep_states)
        return original(*args, keep_states=keep_states)

    monkeypatch.setattr(reference, "_run", spy)
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 7, 2, 4), torch.randn(2, 7, 2, 4), torch.randn(2, 7, 2, 3)
    weight, forget = torch.randn(2, 3, 3, requires_grad=True), torch.rand(2, 7, 2)
    with torch.no_grad():
        y0, h0 = reference.m2rnn_recurrence_torch(q, k, v, weight, forget)
    y1, h1 = reference.m2rnn_recurrence_torch(q, k, v, weight, forget)
    assert calls == [False, True]
    torch.testing.assert_close(y0, y1.detach())
    torch.testing.assert_close(h0, h1.detach())
