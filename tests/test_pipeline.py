"""transformers' user-facing entry points on our model: pipeline and streaming, with an in-memory tokenizer."""

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, TextStreamer, pipeline

from m2rnn import M2RNNConfig, M2RNNForCausalLM


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(len(specials), vocab_size)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_model() -> M2RNNForCausalLM:
    torch.manual_seed(0)
    return M2RNNForCausalLM(M2RNNConfig.from_preset("tiny", eos_token_id=2, pad_token_id=0)).eval()


def test_text_generation_pipeline():
    model = tiny_model()
    tokenizer = word_tokenizer(model.config.vocab_size)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    out = generator("w10 w11 w12", max_new_tokens=5, do_sample=False, return_full_text=False)
    new_text = out[0]["generated_text"]
    direct = model.generate(tokenizer("w10 w11 w12", return_tensors="pt").input_ids, max_new_tokens=5, do_sample=False)
    assert new_text == tokenizer.decode(direct[0, 3:], skip_special_tokens=True)
    assert len(new_text.split()) == 5


def test_text_streamer_prints_the_generated_words(capsys):
    model = tiny_model()
    tokenizer = word_tokenizer(model.config.vocab_size)
    inputs = tokenizer("w20 w21", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False, streamer=TextStreamer(tokenizer, skip_prompt=True))
    printed = capsys.readouterr().out.split()
    expected = tokenizer.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True).split()
    assert printed == expected and printed
