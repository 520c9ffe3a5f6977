"""Bad model input gets a clear error naming what is wrong, instead of a reshape or IndexError from deep inside."""

import pytest
import torch
from transformers import DynamicCache, StaticCache

from m2rnn import M2RNNCache
from test_modeling import make_model, random_ids, returned_cache


@pytest.mark.parametrize(
    "ids, message",
    [
        (torch.zeros(2, 0, dtype=torch.long), r"`input_ids` is empty \(shape \(2, 0\)\)"),
        (torch.zeros(0, 5, dtype=torch.long), r"`input_ids` is empty \(shape \(0, 5\)\)"),
        (torch.arange(3, 8), r"`input_ids` must be \(batch, seq_len\), got shape \(5,\); for one sequence pass `ids\[None\]`"),
        (torch.zeros(1, 2, 3, dtype=torch.long), r"`input_ids` must be \(batch, seq_len\), got shape \(1, 2, 3\)"),
    ],
)
def test_badly_shaped_input_ids(ids, message):
    model = make_model("tiny")
    with pytest.raises(ValueError, match=message):
        model(ids)


def test_badly_shaped_inputs_embeds():
    model = make_model("tiny")
    with pytest.raises(ValueError, match=r"`inputs_embeds` must be \(batch, seq_len, hidden_size\), got shape \(4, 64\)"):
        model(inputs_embeds=torch.zeros(4, 64))


def test_ids_outside_the_vocabulary_are_named():
    model = make_model("tiny")
    size = model.config.vocab_size
    ids = torch.tensor([[1, size + 3, 2, -1, size + 3]])
    with pytest.raises(ValueError, match=rf"`input_ids` holds -1, {size + 3}, outside the vocabulary \[0, {size}\)"):
        model(ids)
    with pytest.raises(ValueError, match="outside the vocabulary"):  # the user path: generate
        model.generate(ids, max_new_tokens=2)
    assert model(ids.clamp(0, size - 1)).logits.shape == (1, 5, size)  # valid ids are unaffected


@pytest.mark.parametrize("name", ["tiny", "m2rnn"])
def test_a_cache_without_our_layer_kinds_is_refused(name):
    model = make_model(name)
    ids = random_ids(1, 4, model.config.vocab_size)
    with pytest.raises(ValueError, match=r"the cache passed has layers \[\] \(none yet\).*DynamicCache\(config=model.config\)"):
        model(ids, past_key_values=DynamicCache(), use_cache=True)
    with pytest.raises(TypeError, match="must be a transformers `Cache`"):
        model(ids, past_key_values=((torch.zeros(1), torch.zeros(1)),), use_cache=True)


def test_a_cache_of_another_model_is_refused():
    model, other = make_model("tiny"), make_model("m2rnn")
    ids = random_ids(1, 4, other.config.vocab_size)
    with pytest.raises(ValueError, match="this model's layers are"):
        model(ids, past_key_values=DynamicCache(config=other.config), use_cache=True)
    with pytest.raises(ValueError, match="this model's layers are"):
        other(ids, past_key_values=StaticCache(config=model.config, max_cache_len=8), use_cache=True)


@pytest.mark.parametrize("name", ["tiny", "m2rnn"])
def test_attention_mask_of_the_wrong_shape(name):
    model = make_model(name)
    ids = random_ids(2, 5, model.config.vocab_size)
    for mask in (torch.ones(2, 4), torch.ones(2, 7), torch.ones(3, 5), torch.ones(5)):
        with pytest.raises(ValueError, match=rf"`attention_mask` has shape {tuple(mask.shape)}".replace("(", r"\(").replace(")", r"\)")):
            model(ids, attention_mask=mask)
    # with a cache, a 2-D mask covers the cached tokens and the new ones
    out = model(ids, use_cache=True)
    cache = returned_cache(out)
    step = random_ids(2, 1, model.config.vocab_size)
    with pytest.raises(ValueError, match=r"expected \(batch=2, 6 \(past 5 \+ new 1\)\)"):
        model(step, attention_mask=torch.ones(2, 1), past_key_values=cache)
    model(step, attention_mask=torch.ones(2, 6), past_key_values=cache)  # the right length works


def test_the_model_cache_counts_tokens_for_the_mask_check():
    model = make_model("m2rnn")
    cache = M2RNNCache(model.config)
    model(random_ids(1, 3, model.config.vocab_size), past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == 3
