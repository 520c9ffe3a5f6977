"""Generation across the supported transformers range: 5.24 passes the cache as `cache=` and reads `outputs.cache`,
older releases use `past_key_values`. The model takes either, returns what the installed `generate` reads back, and
neither path prints a deprecation warning. CI runs this file with the pinned and with the newest transformers."""

import logging

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache

from m2rnn import M2RNNCache, M2RNNStaticCache
from m2rnn.modeling_m2rnn import _CACHE_FIELD
from test_modeling import make_model, random_ids, returned_cache

# Our own code must not trigger transformers' deprecations (FutureWarning from `deprecate_kwarg`).
pytestmark = pytest.mark.filterwarnings("error::FutureWarning")
NEW_CACHE_NAME = "cache" in transformers.modeling_outputs.MoeModelOutputWithPast.__dataclass_fields__


@pytest.fixture(autouse=True)
def no_deprecation_log():
    """transformers also logs renamed-argument deprecations once per process; fail on any logged while the test runs."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logging.Logger.warning_once.cache_clear()
    logger.addHandler(handler)
    yield
    logger.removeHandler(handler)
    deprecations = [r.getMessage() for r in records if "deprecated" in r.getMessage()]
    assert not deprecations, deprecations


def test_the_output_field_is_the_one_generate_reads():
    assert _CACHE_FIELD == ("cache" if NEW_CACHE_NAME else "past_key_values")
    model = make_model("tiny")
    out = model(random_ids(1, 4, model.config.vocab_size), use_cache=True)
    assert isinstance(returned_cache(out), DynamicCache)
    assert _CACHE_FIELD in out.keys()


@pytest.mark.parametrize("name", ["tiny", "m2rnn"])
@pytest.mark.parametrize("argument", ["cache", "past_key_values"])
def test_forward_takes_the_cache_under_either_name(name, argument):
    model = make_model(name)
    ids = random_ids(2, 7, model.config.vocab_size)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache, steps = None, []
        for t in range(ids.shape[1]):
            out = model(ids[:, t : t + 1], use_cache=True, **{argument: cache})
            assert cache is None or returned_cache(out) is cache  # the same object, updated in place
            cache = returned_cache(out)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)


def test_two_different_caches_are_refused():
    model = make_model("m2rnn")
    ids = random_ids(1, 3, model.config.vocab_size)
    with pytest.raises(ValueError, match="`cache` or as `past_key_values`"):
        model(ids, cache=M2RNNCache(model.config), past_key_values=M2RNNCache(model.config))


@pytest.mark.parametrize("name", ["tiny", "m2rnn"])
def test_greedy_with_cache_equals_recomputation(name):
    model = make_model(name)
    ids = random_ids(2, 6, model.config.vocab_size)
    cached = model.generate(ids, max_new_tokens=10, do_sample=False)
    recomputed = model.generate(ids, max_new_tokens=10, do_sample=False, use_cache=False)
    assert cached.tolist() == recomputed.tolist()


@pytest.mark.parametrize("name", ["tiny", "m2rnn"])
def test_a_user_cache_passed_to_generate_is_used(name):
    model = make_model(name)
    ids = random_ids(1, 5, model.config.vocab_size)
    cache = M2RNNCache(model.config)
    kwargs = {"cache" if NEW_CACHE_NAME else "past_key_values": cache}
    out = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True, **kwargs)
    assert returned_cache(out) is cache and cache.get_seq_length() == 8
    assert out.sequences.tolist() == model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False).tolist()


@pytest.mark.parametrize("name", ["tiny", "hybrid_nope", "m2rnn"])
@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_left_padded_row_equals_the_row_alone(name, cache_implementation):
    model = make_model(name)
    vocab = model.config.vocab_size
    rows = [random_ids(1, 9, vocab, seed=2)[0], random_ids(1, 5, vocab, seed=3)[0]]
    batch = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for i, row in enumerate(rows):
        batch[i, -len(row) :] = row
        mask[i, -len(row) :] = 1
    kwargs = dict(max_new_tokens=6, do_sample=False, cache_implementation=cache_implementation)
    padded = model.generate(batch, attention_mask=mask, **kwargs)
    for i, row in enumerate(rows):
        assert padded[i, -6:].tolist() == model.generate(row[None], **kwargs)[0, -6:].tolist()


def test_static_cache_on_an_attention_free_model_is_static():
    """Before, `cache_implementation="static"` silently kept a dynamic cache on a model without attention."""
    model = make_model("m2rnn")
    ids = random_ids(2, 5, model.config.vocab_size)
    out = model.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="static",
                         return_dict_in_generate=True)
    cache = returned_cache(out)
    assert isinstance(cache, M2RNNStaticCache) and cache.is_compileable
    assert cache.get_seq_length() == 10  # prompt + 5 tokens fed back; the last one never is
    dynamic = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.sequences.tolist() == dynamic.tolist()
    cache.reset()
    assert cache.get_seq_length() == 0


def test_offloaded_cache_on_an_attention_free_model_keeps_offloading():
    model = make_model("m2rnn")
    ids = random_ids(1, 4, model.config.vocab_size)
    out = model.generate(ids, max_new_tokens=4, do_sample=False, cache_implementation="offloaded",
                         return_dict_in_generate=True)
    assert isinstance(returned_cache(out), M2RNNCache) and returned_cache(out).offloading
    assert out.sequences.tolist() == model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False).tolist()


@pytest.mark.parametrize("name", ["tiny", "m2rnn"])
def test_beam_search_with_cache_equals_recomputation(name):
    model = make_model(name)
    ids = random_ids(2, 5, model.config.vocab_size)
    kwargs = dict(max_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=False)
    assert model.generate(ids, **kwargs).tolist() == model.generate(ids, use_cache=False, **kwargs).tolist()


@pytest.mark.parametrize("name", ["tiny", "m2rnn"])
def test_packed_sequences_equal_separate_forwards(name):
    model = make_model(name)
    lengths = [5, 3, 6]
    docs = [random_ids(1, n, model.config.vocab_size, seed=10 + i) for i, n in enumerate(lengths)]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed = model(torch.cat(docs, dim=1), position_ids=position_ids).logits  # config.use_cache is True
        separate = torch.cat([model(d, use_cache=False).logits for d in docs], dim=1)
    torch.testing.assert_close(packed, separate, rtol=1e-4, atol=1e-5)


def test_save_load_round_trip_then_cached_generation(tmp_path):
    model = make_model("tiny")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = random_ids(2, 6, model.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-6)
    expected = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    assert loaded.generate(ids, max_new_tokens=8, do_sample=False).tolist() == expected.tolist()


@pytest.mark.parametrize("name", ["tiny", "m2rnn"])
def test_nan_in_padded_embeddings_stays_out_of_the_real_tokens(name):
    """Attention gives padded keys weight exactly 0, but 0 · NaN is NaN: padded positions are zeroed before every
    layer, so whatever they hold never reaches the row's tokens (left padding, as batched generation uses)."""
    model = make_model(name)
    ids = random_ids(1, 6, model.config.vocab_size)
    batch = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        embeds = model.get_input_embeddings()(batch)
        embeds[0, :3] = float("nan")
        padded = model(inputs_embeds=embeds, attention_mask=mask).logits
        alone = model(ids).logits
    assert torch.isfinite(padded[0, 3:]).all()
    torch.testing.assert_close(padded[0, 3:], alone[0], rtol=1e-4, atol=1e-5)


def test_static_decode_of_an_attention_free_model_compiles_without_breaks():
    """On CUDA `generate` compiles the decode step of a compilable cache; the input checks and the token count must
    trace with `fullgraph=True` (here with dynamo's eager backend, on any device) and recompile at most once."""
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    model = make_model("m2rnn")
    ids = random_ids(2, 5, model.config.vocab_size)
    compile_config = CompileConfig(backend="eager", fullgraph=True, mode=None)
    compile_config._compile_all_devices = True  # what `generate` does on CUDA, here on the CPU
    torch._dynamo.reset()
    counters.clear()
    out = model.generate(ids, max_new_tokens=8, do_sample=False, cache_implementation="static",
                         compile_config=compile_config)
    assert counters["stats"]["unique_graphs"] <= 2
    assert out.tolist() == model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False).tolist()
    torch._dynamo.reset()


def test_trainer_predictions_leave_the_cache_out(tmp_path):
    """Trainer drops `config.keys_to_ignore_at_inference` from outputs; from 5.24 the cache is called `cache`."""
    from transformers import Trainer, TrainingArguments

    model = make_model("tiny")
    rows = [{"input_ids": ids} for ids in random_ids(4, 6, model.config.vocab_size).tolist()]
    args = TrainingArguments(tmp_path, per_device_eval_batch_size=2, report_to=[], use_cpu=True, use_cache=True)
    predictions = Trainer(model=model, args=args).predict(rows).predictions
    assert predictions.shape == (4, 6, model.config.vocab_size)
