"""Fast decoding and compilation: `StaticDecoder` equals `generate`, the MoE sync-free path equals the original,
the decode and training steps compile with `fullgraph=True`, and the model benchmark's CPU smoke mode runs.

Tests marked `gpu` (CUDA-graph capture) skip without CUDA; the lead runs them with `pytest -m gpu`.
"""

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from m2rnn import M2RNNConfig, M2RNNForCausalLM
from m2rnn.generation import StaticDecoder, dense_moe_dispatch, fast_generate
from m2rnn.modeling_m2rnn import M2RNNSparseMoeBlock
from test_modeling import returned_cache

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
ROOT = Path(__file__).resolve().parents[1]

SMALL = dict(
    vocab_size=96, hidden_size=32, intermediate_size=48,
    m2rnn_key_head_dim=8, m2rnn_value_head_dim=4, m2rnn_num_v_heads=4, m2rnn_num_forget_heads=4,
    m2rnn_num_weight_heads=4, m2rnn_num_gate_heads=4,
    linear_num_key_heads=1, linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16,
           shared_expert_gated=True)
CONFIGS = {
    "attention_free": lambda: M2RNNConfig(num_hidden_layers=3, mixer_types=["m2rnn", "gated_deltanet", "m2rnn"], **SMALL),
    "hybrid": lambda: M2RNNConfig(
        num_hidden_layers=3, mixer_types=["m2rnn", "gated_deltanet", "full_attention"],
        rope_parameters={"rope_theta": 100.0}, **SMALL,
    ),
    "hybrid_moe": lambda: M2RNNConfig(
        num_hidden_layers=3, mixer_types=["m2rnn", "full_attention", "gated_deltanet"], mlp_only_layers=[0],
        **SMALL, **MOE,
    ),
}


def make_model(name: str, attn_implementation: str = "sdpa", seed: int = 0) -> M2RNNForCausalLM:
    torch.manual_seed(seed)
    config = CONFIGS[name]()
    config._attn_implementation = attn_implementation
    model = M2RNNForCausalLM(config).eval()
    with torch.no_grad():  # move W and D off their identity/ones init so that they matter
        for param_name, p in model.named_parameters():
            if param_name.endswith(("state_weight", ".D")):
                p.add_(0.3 * torch.randn_like(p))
    return model


def prompt(batch: int = 3, length: int = 7, vocab: int = 96, left_pad: bool = True):
    ids = torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    if left_pad:
        mask[0, :3] = 0
        mask[-1, :1] = 0
        ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


@pytest.mark.parametrize("name,attn", [("attention_free", "sdpa"), ("hybrid", "sdpa"), ("hybrid", "eager"),
                                       ("hybrid_moe", "sdpa")])
def test_static_decoder_equals_greedy_generate(name, attn):
    model = make_model(name, attn)
    ids, mask = prompt()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=9, do_sample=False, eos_token_id=None)
    got = fast_generate(model, ids, 9, mask, eos_token_id=None)
    assert got.tolist() == expected.tolist()
    # a decoder is reusable: a second, unpadded call starts from a clean cache
    decoder = StaticDecoder(model, batch_size=3, max_length=20)
    decoder.generate(ids, 9, mask, eos_token_id=None)
    plain = torch.randint(3, 96, (3, 5), generator=torch.Generator().manual_seed(9))
    again = decoder.generate(plain, 6, eos_token_id=None)
    assert again.tolist() == model.generate(plain, max_new_tokens=6, do_sample=False, eos_token_id=None).tolist()


def test_static_decoder_steps_equal_cached_forward_logits():
    """The decode step's logits, not just the argmax, equal the eager cached forward."""
    model = make_model("hybrid_moe")
    ids, mask = prompt(batch=2, left_pad=False)
    decoder = StaticDecoder(model, batch_size=2, max_length=16)
    logits = decoder.prefill(ids)
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache = returned_cache(out)
        torch.testing.assert_close(logits, out.logits[:, -1], rtol=1e-5, atol=1e-5)
        for t in range(4):
            token = torch.full((2, 1), 10 + t)
            decoder.tokens.copy_(token)
            expected = model(token, past_key_values=cache, use_cache=True).logits[:, -1]
            torch.testing.assert_close(decoder.step(), expected, rtol=1e-5, atol=1e-5)


def test_eos_stops_like_generate():
    model = make_model("hybrid")
    ids, mask = prompt()
    free_run = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None)
    eos = int(free_run[1, ids.shape[1] + 3])  # a token row 1 emits at its 4th step
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=eos,
                              pad_token_id=0)
    got = fast_generate(model, ids, 12, mask, eos_token_id=eos, pad_token_id=0, stop_check_interval=2)
    assert got.tolist() == expected.tolist()


def test_sampling_is_reproducible_and_stays_in_top_k():
    model = make_model("attention_free")
    ids, _ = prompt(left_pad=False)
    runs = [fast_generate(model, ids, 6, do_sample=True, top_k=3, temperature=0.7, eos_token_id=None,
                          generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert runs[0].tolist() == runs[1].tolist()
    decoder = StaticDecoder(model, batch_size=3, max_length=8)
    top3 = decoder.prefill(ids).topk(3, dim=-1).indices
    assert all(int(runs[0][b, ids.shape[1]]) in top3[b].tolist() for b in range(3))


def test_decoder_refuses_bad_arguments():
    model = make_model("hybrid")
    decoder = StaticDecoder(model, batch_size=2, max_length=8)
    with pytest.raises(ValueError, match="batch"):
        decoder.prefill(torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="max_length=8"):
        decoder.generate(torch.ones(2, 4, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="needs the model on CUDA"):
        StaticDecoder(model, batch_size=2, max_length=8, cuda_graph=True)


def test_moe_dense_dispatch_equals_the_sparse_loop():
    model = make_model("hybrid_moe")
    block = next(m for m in model.modules() if isinstance(m, M2RNNSparseMoeBlock))
    tokens = torch.randn(13, 32)
    _, weights, experts = block.gate(tokens)
    with torch.no_grad():
        torch.testing.assert_close(block.experts_dense(tokens, weights, experts),
                                   block.experts_sparse(tokens, weights, experts), rtol=0, atol=1e-7)
        eager = block(tokens[None])
        dense = block(tokens[None], dense_moe_dispatch=True)
    torch.testing.assert_close(dense, eager, rtol=0, atol=1e-7)
    # the dense path traces without a graph break; the sparse loop's `.tolist()` would break it
    compiled = torch.compile(lambda x: block(x), fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(tokens[None]), eager, rtol=1e-6, atol=1e-6)


def _count_dispatch(monkeypatch) -> dict[str, int]:
    """Count the calls of each MoE path, over every block of every model."""
    calls = {"experts_dense": 0, "experts_sparse": 0}
    for name in calls:
        original = getattr(M2RNNSparseMoeBlock, name)

        def spy(self, *args, _name=name, _original=original):
            calls[_name] += 1
            return _original(self, *args)

        monkeypatch.setattr(M2RNNSparseMoeBlock, name, spy)
    return calls


def test_moe_dispatch_is_an_argument_of_each_call(monkeypatch):
    """The dispatch is chosen per call, with no flag on the class or the blocks: two models called alternately with
    different dispatches each take the path they were asked for, and give the same logits."""
    calls = _count_dispatch(monkeypatch)
    first, second = make_model("hybrid_moe"), make_model("hybrid_moe")
    ids = prompt(left_pad=False)[0]
    with torch.no_grad():
        dense = first(ids, dense_moe_dispatch=True).logits
        assert calls == {"experts_dense": 2, "experts_sparse": 0}  # two MoE layers
        sparse = second(ids).logits
        assert calls == {"experts_dense": 2, "experts_sparse": 2}
        again = first(ids).logits  # the earlier dense call left nothing behind
        assert calls == {"experts_dense": 2, "experts_sparse": 4}
    torch.testing.assert_close(dense, sparse, rtol=0, atol=1e-6)
    torch.testing.assert_close(again, sparse, rtol=0, atol=0)
    assert not any("dispatch" in name for name in vars(M2RNNSparseMoeBlock))
    assert not any("dispatch" in name for block in first.modules() for name in vars(block))


def test_static_decoder_steps_take_the_dense_dispatch(monkeypatch):
    """The decode step passes `dense_moe_dispatch=True`; the prompt is read through the sparse path."""
    model = make_model("hybrid_moe")
    ids, mask = prompt(batch=2)
    decoder = StaticDecoder(model, batch_size=2, max_length=12)
    calls = _count_dispatch(monkeypatch)
    decoder.prefill(ids, mask)
    assert calls == {"experts_dense": 0, "experts_sparse": 2}
    decoder.step()
    assert calls == {"experts_dense": 2, "experts_sparse": 2}


def test_dense_moe_dispatch_context_is_deprecated():
    model = make_model("hybrid_moe")
    ids = prompt(left_pad=False)[0]
    with torch.no_grad():
        expected = model(ids).logits
        with pytest.warns(FutureWarning, match="dense_moe_dispatch=True"), dense_moe_dispatch(model):
            got = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_decode_step_compiles_with_fullgraph():
    """MoE, M2RNN, Gated DeltaNet and attention in one decode step under torch.compile(fullgraph=True): no graph break."""
    model = make_model("hybrid_moe")
    ids, mask = prompt(batch=2)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, eos_token_id=None)
    got = fast_generate(model, ids, 5, mask, compile=True, compile_kwargs={"backend": "aot_eager"}, eos_token_id=None)
    assert got.tolist() == expected.tolist()


def test_training_step_compiles_with_fullgraph():
    """Forward + backward of every mixer, the MoE and the aux loss under fullgraph compile; gradients as eager."""
    model = make_model("hybrid_moe").train()
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(2))

    def loss_fn(model, ids):
        return model(input_ids=ids, labels=ids, use_cache=False, output_router_logits=True).loss

    loss_fn(model, ids).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    loss = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(model, ids)
    loss.backward()
    assert len(expected) > 20
    for name, p in model.named_parameters():
        if name in expected:
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (interpreter on CPU)")
def test_triton_ops_compile_as_custom_ops():
    """Under compile the Triton recurrence and decode step are opaque torch.library ops with working autograd."""
    from m2rnn.kernels import m2rnn_decode_step, m2rnn_recurrence

    if not torch.cuda.is_available() and __import__("os").environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton kernels need CUDA or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    batch, seqlen, heads, key_dim, value_dim = 2, 5, 4, 16, 8
    q = torch.randn(batch, seqlen, 1, key_dim, generator=gen)
    k = torch.randn(batch, seqlen, 1, key_dim, generator=gen) * 0.5
    v = torch.randn(batch, seqlen, heads, value_dim, generator=gen) * 0.5
    w = torch.eye(value_dim) + 0.1 * torch.randn(heads, value_dim, value_dim, generator=gen)
    f = torch.rand(batch, seqlen, heads, generator=gen) * 0.5 + 0.5
    h0 = torch.randn(batch, heads, key_dim, value_dim, generator=gen) * 0.1
    inputs = [x.to(device).requires_grad_() for x in (q, k, v, w, f, h0)]

    def loss(q, k, v, w, f, h0):
        y, h = m2rnn_recurrence(q, k, v, w, f, h0, gradient_clipping=1.0, backend="triton")
        return y.square().sum() + h.sum()

    expected = torch.autograd.grad(loss(*inputs), inputs)
    got = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend="aot_eager")(*inputs), inputs)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    def step(q, k, v, w, f, state):
        return m2rnn_decode_step(q, k, v, w, f, state, backend="triton")

    args = [x.detach()[:, 0] if x.dim() > 3 else x.detach() for x in (q, k, v)] + [w, f[:, 0]]
    args = [x.to(device) for x in args]
    state_eager, state_compiled = h0.to(device).clone(), h0.to(device).clone()
    with torch.no_grad():
        y_eager = step(*args, state_eager)
        y_compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(*args, state_compiled)
    torch.testing.assert_close(y_compiled, y_eager)
    torch.testing.assert_close(state_compiled, state_eager)


def test_benchmark_cpu_smoke_mode(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_model
    finally:
        sys.path.pop(0)
    results = bench_model.main([
        "--device", "cpu", "--preset-scale", "tiny", "--output-dir", str(tmp_path),
        "--models", "hybrid-gdn-m2rnn-1l,llama", "--train-contexts", "16", "--prefill-lengths", "16",
        "--decode-contexts", "24", "--decode-batches", "2", "--warmup", "0", "--repeats", "1",
        "--train-repeats", "1", "--decode-warmup", "1", "--decode-steps", "2",
    ])
    statuses = {(r["model"], r["kind"]): r["status"] for r in results["measurements"]}
    assert set(statuses.values()) == {"ok"}, statuses
    assert len(statuses) == 8
    # the Llama baseline is sized to the GDN hybrid's parameter count
    gdn_hybrid = bench_model.count_parameters(
        lambda: M2RNNForCausalLM(bench_model.m2rnn_config("hybrid-gdn-400m", "tiny"))
    )
    assert abs(results["parameters"]["llama"] - gdn_hybrid) / gdn_hybrid < 0.02
    text = (tmp_path / "model_results.md").read_text()
    assert "## Decode" in text and "torch" in text and "llama" in text
    assert (tmp_path / "model_results.json").exists()
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "model_results.png").stat().st_size > 0


# ---------------------------------------------------------------------------------------------------------------
# CUDA graphs (run by the lead on the device: pytest -m gpu tests/test_fast_decode.py)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", ["attention_free", "hybrid_moe"])
def test_cuda_graph_decoder_equals_generate(name):
    model = make_model(name).cuda()
    ids, mask = prompt()
    ids, mask = ids.cuda(), mask.cuda()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None)
    decoder = StaticDecoder(model, batch_size=3, max_length=24)
    assert decoder._graph is not None
    got = decoder.generate(ids, 12, mask, eos_token_id=None)
    assert got.tolist() == expected.tolist()
    # a second call replays the same graph on a fresh cache
    again = decoder.generate(ids, 12, mask, eos_token_id=None)
    assert again.tolist() == expected.tolist()


@pytest.mark.gpu
@gpu
def test_cuda_graph_replay_logits_equal_eager_steps_in_bf16():
    model = make_model("hybrid_moe").cuda().to(torch.bfloat16)
    ids, _ = prompt(batch=2, left_pad=False)
    ids = ids.cuda()
    decoder = StaticDecoder(model, batch_size=2, max_length=20)
    logits = decoder.prefill(ids)
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache = returned_cache(out)
        torch.testing.assert_close(logits.float(), out.logits[:, -1].float(), rtol=2e-2, atol=2e-2)
        for t in range(6):
            token = torch.full((2, 1), 10 + t, device="cuda")
            decoder.tokens.copy_(token)
            expected = model(token, past_key_values=cache, use_cache=True).logits[:, -1]
            torch.testing.assert_close(decoder.step().float(), expected.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@gpu
def test_compiled_cuda_graph_decoder_equals_generate():
    model = make_model("hybrid_moe").cuda()
    ids, mask = prompt()
    ids, mask = ids.cuda(), mask.cuda()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None)
    got = fast_generate(copy.deepcopy(model), ids, 8, mask, compile=True, eos_token_id=None)
    assert got.tolist() == expected.tolist()
