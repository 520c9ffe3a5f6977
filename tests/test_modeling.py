"""The model: cached decode equals a full forward for every mixer, padding, packing, loading, training hooks."""

import ast
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import m2rnn
from m2rnn import M2RNNCache, M2RNNConfig, M2RNNForCausalLM, M2RNNModel
from m2rnn.modeling_m2rnn import _CACHE_FIELD

# transformers >= 5.24 deprecates `past_key_values` (FutureWarning): our code must never trigger it
pytestmark = pytest.mark.filterwarnings("error::FutureWarning")

SMALL = dict(
    vocab_size=64, hidden_size=32, intermediate_size=48,
    m2rnn_key_head_dim=8, m2rnn_value_head_dim=4, m2rnn_num_v_heads=4, m2rnn_num_forget_heads=4,
    m2rnn_num_weight_heads=4, m2rnn_num_gate_heads=4,
    linear_num_key_heads=1, linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
CONFIGS = {
    "tiny": lambda: M2RNNConfig.from_preset("tiny"),
    "m2rnn": lambda: M2RNNConfig(num_hidden_layers=2, mixer_types=["m2rnn"] * 2, **SMALL),
    "gated_deltanet": lambda: M2RNNConfig(num_hidden_layers=2, mixer_types=["gated_deltanet"] * 2, **SMALL),
    "attention_rope": lambda: M2RNNConfig(
        num_hidden_layers=2, mixer_types=["full_attention"] * 2, rope_parameters={"rope_theta": 100.0}, **SMALL
    ),
    "hybrid_nope": lambda: M2RNNConfig(
        num_hidden_layers=3, mixer_types=["m2rnn", "full_attention", "gated_deltanet"], **SMALL
    ),
}


def make_model(name: str, seed: int = 0) -> M2RNNForCausalLM:
    torch.manual_seed(seed)
    model = M2RNNForCausalLM(CONFIGS[name]()).eval()
    _perturb_recurrent_weights(model)
    return model


def _perturb_recurrent_weights(model: M2RNNForCausalLM) -> None:
    """Move W and D off their identity/ones init so that tests see them act."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("state_weight", ".D")):
                p.add_(0.2 * torch.randn_like(p))


def returned_cache(output):
    """The cache an output carries: `output.cache` from transformers 5.24 on, `output.past_key_values` before."""
    return getattr(output, _CACHE_FIELD)


def random_ids(batch: int, length: int, vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_decode_equals_full_forward(name):
    model = make_model(name)
    ids = random_ids(2, 11, model.config.vocab_size)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        # token by token
        cache, steps = None, []
        for t in range(ids.shape[1]):
            out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = returned_cache(out)
            steps.append(out.logits)
        torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)
        # chunked prefill (a chunk shorter than the conv kernel too), then decode
        cache, chunks = None, []
        for start, end in [(0, 2), (2, 7), (7, 9), (9, 10), (10, 11)]:
            out = model(ids[:, start:end], past_key_values=cache, use_cache=True)
            cache = returned_cache(out)
            chunks.append(out.logits)
        torch.testing.assert_close(torch.cat(chunks, 1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny", "m2rnn"])
def test_greedy_generation_with_cache_equals_recomputation(name):
    model = make_model(name)
    ids = random_ids(2, 6, model.config.vocab_size)
    with_cache = model.generate(ids, max_new_tokens=8, do_sample=False)
    without = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    assert with_cache.tolist() == without.tolist()
    assert with_cache.shape == (2, 14)


def test_attention_free_model_generates_with_its_own_cache():
    model = make_model("m2rnn")
    ids = random_ids(1, 5, model.config.vocab_size)
    out = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    assert isinstance(returned_cache(out), M2RNNCache)
    assert returned_cache(out).get_seq_length() == 8  # the last generated token is never fed back


def test_the_cache_keeps_its_own_count():
    """The model tells the cache how many tokens it fed (`advance`); only the cache writes its counter."""

    class Recorder(M2RNNCache):
        def advance(self, num_tokens: int) -> None:
            self.advanced = [*getattr(self, "advanced", []), num_tokens]
            super().advance(num_tokens)

    model = make_model("m2rnn")
    cache = Recorder(model.config)
    with torch.no_grad():
        model(random_ids(2, 5, model.config.vocab_size), past_key_values=cache, use_cache=True)
        model(random_ids(2, 1, model.config.vocab_size), past_key_values=cache, use_cache=True)
    assert cache.advanced == [5, 1] and cache.get_seq_length() == 6
    cache.reset()
    assert cache.get_seq_length() == 0


def test_beam_search_matches_the_no_cache_path():
    model = make_model("tiny")
    ids = random_ids(2, 5, model.config.vocab_size)
    kwargs = dict(max_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=False)
    assert model.generate(ids, **kwargs).tolist() == model.generate(ids, use_cache=False, **kwargs).tolist()


def test_sampling_and_generate_outputs():
    model = make_model("tiny")
    ids = random_ids(1, 4, model.config.vocab_size)
    torch.manual_seed(0)
    out = model.generate(
        ids, max_new_tokens=5, do_sample=True, top_k=10, num_return_sequences=3,
        return_dict_in_generate=True, output_scores=True,
    )
    assert out.sequences.shape == (3, 9) and len(out.scores) == 5


def test_static_cache_generation_equals_dynamic():
    model = make_model("tiny")
    ids = random_ids(2, 5, model.config.vocab_size)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    dynamic = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    static = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, cache_implementation="static")
    assert dynamic.tolist() == static.tolist()


def test_recurrent_state_does_not_grow_with_generated_tokens():
    model = make_model("m2rnn")
    ids = random_ids(1, 4, model.config.vocab_size)

    def state_bytes(new_tokens: int) -> int:
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True)
        cache = returned_cache(out)
        return sum(
            t.numel() * t.element_size()
            for layer in cache.layers
            for states in (layer.conv_states, layer.recurrent_states)
            for t in states.values()
        )

    assert state_bytes(3) == state_bytes(30) > 0
    config = model.config
    cache = returned_cache(model(ids, use_cache=True))
    assert tuple(cache.layers[0].recurrent_states[0].shape) == (
        1, config.m2rnn_num_heads, config.m2rnn_key_head_dim, config.m2rnn_value_head_dim
    )
    assert cache.layers[0].recurrent_states[0].dtype == torch.float32


def test_save_load_round_trip_in_safetensors(tmp_path):
    model = make_model("tiny")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is M2RNNForCausalLM
    ids = random_ids(2, 7, model.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    # non-persistent RoPE buffers are rebuilt in _init_weights, not left as garbage from the meta device
    torch.testing.assert_close(loaded.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)


def test_tied_embeddings_survive_loading(tmp_path):
    config = CONFIGS["hybrid_nope"]()
    config.tie_word_embeddings = True
    model = M2RNNForCausalLM(config)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(tmp_path)
    loaded = M2RNNForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)


def test_auto_classes():
    kwargs = {k: v for k, v in CONFIGS["hybrid_nope"]().to_dict().items() if k != "model_type"}
    config = AutoConfig.for_model("m2rnn", **kwargs)
    assert isinstance(config, M2RNNConfig)
    assert type(AutoModelForCausalLM.from_config(config)) is M2RNNForCausalLM
    assert type(AutoModel.from_config(config)) is M2RNNModel
    assert M2RNNForCausalLM.can_generate()


def test_initialisation_follows_the_paper():
    model = M2RNNForCausalLM(M2RNNConfig.from_preset("tiny"))
    mixer = model.model.layers[0].mixer
    torch.testing.assert_close(mixer.state_weight, torch.eye(8).expand(4, 8, 8))
    torch.testing.assert_close(mixer.D, torch.ones_like(mixer.D))
    a = mixer.A_log.exp()
    assert (a > 0).all() and (a <= 16).all()
    dt = torch.nn.functional.softplus(mixer.dt_bias)
    assert (dt >= 1e-4 * 0.999).all() and (dt <= 0.1 * 1.001).all()
    big = M2RNNForCausalLM(M2RNNConfig(num_hidden_layers=2, hidden_size=256, m2rnn_num_v_heads=64,
                                       m2rnn_num_forget_heads=64, m2rnn_num_weight_heads=64, m2rnn_num_gate_heads=64))
    out_std = big.model.layers[0].mixer.out_proj.weight.std().item()
    assert abs(out_std - 0.02 / (2 * 2) ** 0.5) < 0.001, out_std  # 0.02 / √(2L), L = 2


def test_loss_uses_num_items_in_batch():
    model = make_model("tiny")
    ids = random_ids(2, 6, model.config.vocab_size)
    labels = ids.clone()
    labels[0, :3] = -100
    mean_loss = model(ids, labels=labels).loss
    valid = (labels[:, 1:] != -100).sum()
    summed = model(ids, labels=labels, num_items_in_batch=torch.tensor(1)).loss
    torch.testing.assert_close(summed, mean_loss * valid, rtol=1e-5, atol=1e-5)


def test_stateful_model_refuses_assisted_generation():
    model = make_model("tiny")
    ids = random_ids(1, 4, model.config.vocab_size)
    with pytest.raises(ValueError, match="stateful"):
        model.generate(ids, max_new_tokens=2, prompt_lookup_num_tokens=2)


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = random_ids(2, 8, M2RNNConfig.from_preset("tiny").vocab_size)
    grads = []
    for checkpointing in (False, True):
        model = make_model("tiny").train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)


def test_every_parameter_gets_a_gradient():
    model = make_model("tiny").train()
    ids = random_ids(2, 8, model.config.vocab_size)
    model(ids, labels=ids).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    # an expert that received no token this step legitimately has no gradient
    assert all(".experts." in n for n in missing), missing


def test_hidden_states_and_router_logits():
    model = make_model("tiny")
    ids = random_ids(2, 5, model.config.vocab_size)
    out = model(ids, labels=ids, output_hidden_states=True, output_router_logits=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert len(out.router_logits) == 1 and out.router_logits[0].shape[-1] == model.config.num_experts
    plain = model(ids, labels=ids).loss
    torch.testing.assert_close(out.loss, plain + model.config.router_aux_loss_coef * out.aux_loss)


@pytest.mark.parametrize("name", ["tiny", "m2rnn"])
def test_packed_documents_equal_separate_forwards(name):
    model = make_model(name)
    lengths = [5, 3, 6]
    docs = [random_ids(1, n, model.config.vocab_size, seed=10 + i) for i, n in enumerate(lengths)]
    packed = torch.cat(docs, dim=1)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        logits = model(packed, position_ids=position_ids, use_cache=False).logits
        separate = torch.cat([model(d, use_cache=False).logits for d in docs], dim=1)
    torch.testing.assert_close(logits, separate, rtol=1e-4, atol=1e-5)


def test_bfloat16_forward_runs():
    model = make_model("tiny").to(torch.bfloat16)
    ids = random_ids(1, 6, model.config.vocab_size)
    with torch.no_grad():
        out = model(ids, use_cache=True)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()
    assert returned_cache(out).layers[0].recurrent_states[0].dtype == torch.float32


def test_the_library_reaches_the_kernels_only_through_their_package():
    """`m2rnn.kernels` (its `__init__`) is the one way in: no module outside kernels/ imports a kernels submodule."""
    root = Path(m2rnn.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[0] == "kernels":
            continue
        package = ("m2rnn", *parts[:-1])
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else ()
                targets = [".".join((*base, *([node.module] if node.module else [])))]
            else:
                continue
            offenders += [f"{path.name}:{node.lineno} {t}" for t in targets if t.startswith("m2rnn.kernels.")]
    assert not offenders, offenders
