"""The model on CUDA (Triton M2RNN kernels, fla's GDN when installed) against the CPU reference. Skipped without CUDA."""

import copy

import pytest
import torch

from m2rnn import M2RNNConfig, M2RNNForCausalLM

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

HYBRID = dict(
    vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
    mixer_types=["m2rnn", "gated_deltanet", "full_attention", "m2rnn"],
    m2rnn_key_head_dim=64, m2rnn_value_head_dim=16, m2rnn_num_v_heads=8, m2rnn_num_forget_heads=8,
    m2rnn_num_weight_heads=8, m2rnn_num_gate_heads=8,
    linear_num_key_heads=1, linear_num_value_heads=2, linear_key_head_dim=64, linear_value_head_dim=64,
    num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_parameters={"rope_theta": 10000.0},
)


def make_model(mixers=None, seed=0) -> M2RNNForCausalLM:
    torch.manual_seed(seed)
    kwargs = dict(HYBRID)
    if mixers is not None:
        kwargs.update(mixer_types=mixers, num_hidden_layers=len(mixers))
    model = M2RNNForCausalLM(M2RNNConfig(**kwargs)).eval()
    with torch.no_grad():  # a non-trivial but contractive W (‖W‖ < 1): an expansive one is chaotic, and then
        for name, p in model.named_parameters():  # CPU and GPU rounding differences grow over the sequence
            if name.endswith("state_weight"):
                p.copy_(0.5 * torch.eye(p.shape[-1]) + 0.05 * torch.randn_like(p))
    return model


def ids(batch=2, length=96, seed=1):
    return torch.randint(3, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


MIXER_SETS = {  # each layer type alone first, so that a failure names the path that differs
    "m2rnn": ["m2rnn", "m2rnn"],
    "gated_deltanet": ["gated_deltanet", "gated_deltanet"],
    "attention": ["full_attention", "full_attention"],
    "hybrid": None,
}


@pytest.mark.parametrize("mixers", list(MIXER_SETS))
def test_cuda_logits_match_the_cpu_reference(mixers):
    cpu = make_model(MIXER_SETS[mixers])
    gpu = copy.deepcopy(cpu).cuda()
    x = ids()
    with torch.no_grad():
        expected = cpu(x).logits
        got = gpu(x.cuda()).logits.cpu()
    torch.testing.assert_close(got, expected, rtol=5e-3, atol=5e-3)


def test_cuda_cached_decode_equals_full_forward():
    model = make_model().cuda()
    x = ids(length=40).cuda()
    with torch.no_grad():
        full = model(x).logits
        out = model(x[:, :31], use_cache=True)
        cache, steps = out.past_key_values, [out.logits]
        for t in range(31, 40):
            out = model(x[:, t : t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("mixers", list(MIXER_SETS))
def test_cuda_training_gradients_match_cpu(mixers):
    cpu = make_model(MIXER_SETS[mixers]).train()
    gpu = copy.deepcopy(cpu).cuda()
    x = ids(length=64)
    cpu(x, labels=x).loss.backward()
    gpu(x.cuda(), labels=x.cuda()).loss.backward()
    for (name, p_cpu), p_gpu in zip(cpu.named_parameters(), gpu.parameters()):
        torch.testing.assert_close(p_gpu.grad.cpu(), p_cpu.grad, rtol=2e-2, atol=2e-4, msg=name)


def test_bf16_generation_on_cuda():
    model = make_model().cuda().to(torch.bfloat16)
    x = ids(length=32).cuda()
    out = model.generate(x, max_new_tokens=16, do_sample=False)
    assert out.shape == (2, 48)
    with torch.no_grad():
        assert torch.isfinite(model(out).logits.float()).all()


def test_attention_free_decode_step_is_cuda_graph_capturable():
    model = make_model(["m2rnn", "gated_deltanet", "m2rnn"]).cuda()
    x = ids(batch=4, length=24).cuda()
    with torch.no_grad():
        eager_cache = model(x, use_cache=True).past_key_values
        graph_cache = model(x, use_cache=True).past_key_values
        token = torch.full((4, 1), 7, device="cuda")
        for _ in range(3):  # warm-up: autotuning and lazy initialisation happen outside the capture
            model(token, past_key_values=copy.deepcopy(graph_cache), use_cache=True)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_logits = model(token, past_key_values=graph_cache, use_cache=True).logits
        # capturing records the kernels without running them: both caches still hold the prefill state
        for step in range(5):
            token.fill_(11 + step)
            graph.replay()
            expected = model(token, past_key_values=eager_cache, use_cache=True).logits
            torch.testing.assert_close(static_logits, expected, rtol=1e-4, atol=1e-4)
