"""Gated DeltaNet op: the chunked form against the token loop, packing, decode steps and shape errors (CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from m2rnn.kernels import gated_delta_rule, gated_delta_rule_step, gated_delta_rule_torch


def make_inputs(batch=2, seqlen=150, key_heads=1, value_heads=2, key_dim=16, value_dim=8, dtype=torch.float64, seed=0):
    """Random GDN inputs with realistic ranges: g = logsigmoid (≤ 0, mostly slow decay), beta in (0, 1)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    return dict(
        q=randn(batch, seqlen, key_heads, key_dim),
        k=randn(batch, seqlen, key_heads, key_dim),
        v=randn(batch, seqlen, value_heads, value_dim),
        g=F.logsigmoid(randn(batch, seqlen, value_heads) + 2.0),
        beta=torch.sigmoid(randn(batch, seqlen, value_heads)),
        initial_state=randn(batch, value_heads, key_dim, value_dim),
    )


def run(inputs, chunked=None, **kwargs):
    """The op (validated, dispatched), or with `chunked` given the torch reference's chunked / token-loop form."""
    tensors = [inputs[n] for n in ("q", "k", "v", "g", "beta")]
    if chunked is not None:
        return gated_delta_rule_torch(*tensors, inputs.get("initial_state"), chunked=chunked, **kwargs)
    return gated_delta_rule(*tensors, inputs.get("initial_state"), **kwargs)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
@pytest.mark.parametrize("seqlen", [1, 63, 150])
def test_chunked_matches_recurrent(dtype, tol, seqlen):
    inputs = make_inputs(seqlen=seqlen, key_heads=2, value_heads=4, dtype=dtype)
    o_ref, s_ref = run(inputs, chunked=False)
    o, s = run(inputs, chunked=True)
    assert o.shape == (2, seqlen, 4, 8) and o.dtype == dtype
    assert s.shape == (2, 4, 16, 8) and s.dtype == dtype
    torch.testing.assert_close(o, o_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(s, s_ref, atol=tol, rtol=tol)


def test_grouped_heads_equal_explicit_repeat():
    inputs = make_inputs(key_heads=1, value_heads=3)
    o, s = run(inputs)
    expanded = dict(inputs, q=inputs["q"].repeat_interleave(3, 2), k=inputs["k"].repeat_interleave(3, 2))
    o_ref, s_ref = run(expanded)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(s, s_ref)


def test_matches_the_canonical_math_written_out():
    """One head, plain loop over the formulas of docs/gdn-checkpoint-formats.md §1 step 7."""
    inputs = make_inputs(batch=1, seqlen=20, key_heads=1, value_heads=1)
    q, k, v = (inputs[n][0, :, 0] for n in ("q", "k", "v"))
    g, beta = inputs["g"][0, :, 0], inputs["beta"][0, :, 0]
    state = inputs["initial_state"][0, 0].clone()
    outputs = []
    for t in range(20):
        q_t = q[t] / torch.sqrt((q[t] ** 2).sum() + 1e-6) * 16**-0.5
        k_t = k[t] / torch.sqrt((k[t] ** 2).sum() + 1e-6)
        state = torch.exp(g[t]) * state
        u = beta[t] * (v[t] - state.T @ k_t)
        state = state + torch.outer(k_t, u)
        outputs.append(state.T @ q_t)
    o, s = run(inputs, chunked=True)
    torch.testing.assert_close(o[0, :, 0], torch.stack(outputs))
    torch.testing.assert_close(s[0, 0], state)


def test_without_qk_l2norm_and_custom_scale():
    inputs = make_inputs(seqlen=70)
    inputs["q"], inputs["k"] = F.normalize(inputs["q"], dim=-1), F.normalize(inputs["k"], dim=-1)
    o_ref, s_ref = run(inputs, chunked=False, use_qk_l2norm=False, scale=0.3)
    o, s = run(inputs, chunked=True, use_qk_l2norm=False, scale=0.3)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(s, s_ref)
    o_norm, _ = run(inputs, chunked=True, scale=0.3)  # already unit norm: only the 1e-6 eps differs
    torch.testing.assert_close(o_norm, o, atol=1e-5, rtol=1e-5)


def test_chunked_gradients_match_recurrent():
    inputs = make_inputs(batch=1, seqlen=70, key_heads=1, value_heads=2, key_dim=8, value_dim=4)
    grads = {}
    for chunked in (False, True):
        leaves = {n: x.clone().requires_grad_() for n, x in inputs.items()}
        o, s = run(leaves, chunked=chunked)
        weights = torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)
        ((o * weights).sum() + s.pow(2).sum()).backward()
        grads[chunked] = {n: x.grad for n, x in leaves.items()}
    for name in inputs:
        torch.testing.assert_close(grads[True][name], grads[False][name], msg=name)


@pytest.mark.parametrize("chunked", [True, False, None])
def test_cu_seqlens_equals_separate_calls(chunked):
    lengths = [5, 70, 0, 33]
    parts = [make_inputs(batch=1, seqlen=n, seed=i) for i, n in enumerate(lengths)]
    packed = {n: torch.cat([p[n] for p in parts], dim=0 if n == "initial_state" else 1) for n in parts[0]}
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    o, s = run(packed, cu_seqlens=cu_seqlens, chunked=chunked)
    o_ref = torch.cat([run(p, chunked=chunked)[0] for p in parts], dim=1)
    s_ref = torch.cat([run(p, chunked=chunked)[1] for p in parts], dim=0)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(s, s_ref)


def test_step_token_by_token_equals_full_call():
    inputs = make_inputs(seqlen=12, key_heads=1, value_heads=2, dtype=torch.float32)
    o_full, s_full = run(inputs)
    state = inputs["initial_state"].clone()
    outputs = [
        gated_delta_rule_step(*(inputs[n][:, t] for n in ("q", "k", "v", "g", "beta")), state) for t in range(12)
    ]
    torch.testing.assert_close(torch.stack(outputs, 1), o_full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, s_full, atol=1e-5, rtol=1e-5)


def test_low_precision_inputs_keep_a_float32_state():
    inputs = make_inputs(seqlen=20, dtype=torch.float32)
    low = {n: (x if n in ("g", "initial_state") else x.bfloat16()) for n, x in inputs.items()}
    o, s = run(low)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    o_ref, _ = run(inputs)
    torch.testing.assert_close(o.float(), o_ref, atol=5e-2, rtol=5e-2)


def test_default_backend_on_cpu_picks_torch():
    inputs = make_inputs(seqlen=1)
    torch.testing.assert_close(run(inputs)[0], run(inputs, chunked=False)[0])
    with pytest.raises(RuntimeError, match="fla"):
        run(inputs, backend="fla")
    with pytest.raises(ValueError, match="backend"):
        run(inputs, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        run(inputs, backend="torch_chunked")  # the old names are gone: one vocabulary for every op
    torch.testing.assert_close(run(inputs, backend="torch")[0], run(inputs)[0])


@pytest.mark.parametrize(
    "name, bad, match",
    [
        ("q", torch.zeros(2, 10, 16), "q must be 4-D"),
        ("k", torch.zeros(2, 10, 1, 8), "k must have q's shape"),
        ("v", torch.zeros(2, 10, 3, 8), "v has 3 heads"),
        ("v", torch.zeros(2, 9, 2, 8), "v must share"),
        ("g", torch.zeros(2, 10, 1), "g must be"),
        ("beta", torch.zeros(2, 10), "beta must be"),
        ("initial_state", torch.zeros(2, 2, 8, 16), "initial_state must be"),
    ],
)
def test_bad_shapes_name_the_argument(name, bad, match):
    inputs = make_inputs(seqlen=10, key_heads=2, value_heads=2)
    inputs[name] = bad.to(torch.float64)
    with pytest.raises(ValueError, match=match):
        run(inputs)


def test_bad_cu_seqlens_and_step_state():
    inputs = make_inputs(seqlen=10)
    with pytest.raises(ValueError, match="batch size 1"):
        run(inputs, cu_seqlens=torch.tensor([0, 10], dtype=torch.int32))
    one = make_inputs(batch=1, seqlen=10)
    with pytest.raises(ValueError, match="cu_seqlens must start at 0, never decrease and end at T=10"):
        run(one, cu_seqlens=torch.tensor([0, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"never decrease.*\[0, 6, 4, 10\]"):
        run(one, cu_seqlens=torch.tensor([0, 6, 4, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="1-D int32"):
        run(one, cu_seqlens=torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="initial_state must be"):
        run(one, cu_seqlens=torch.tensor([0, 4, 10], dtype=torch.int32))
    token = [inputs[n][:, 0] for n in ("q", "k", "v", "g", "beta")]
    with pytest.raises(ValueError, match="state must be"):
        gated_delta_rule_step(*token, torch.zeros(2, 2, 16, 4))
    with pytest.raises(ValueError, match="float32"):
        gated_delta_rule_step(*token, torch.zeros(2, 2, 16, 8, dtype=torch.bfloat16))
