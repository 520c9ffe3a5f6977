"""A byte-level tokenizer built offline: 256 byte tokens plus `<pad>` and `<eos>`, no merges, no downloads.

Any text round-trips exactly (every byte is a token). Used by the healing example and tests, whose tiny models need
a tokenizer but must run without network access.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<eos>")


def _byte_level_characters() -> list[str]:
    """The character the `ByteLevel` pre-tokenizer writes for each byte 0..255: printable Latin-1 bytes stand for
    themselves, the others for the next unused code points from 256 on."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    characters, next_free = [], 256
    for byte in range(256):
        if byte in printable:
            characters.append(chr(byte))
        else:
            characters.append(chr(next_free))
            next_free += 1
    assert set(characters) == set(pre_tokenizers.ByteLevel.alphabet())
    return characters


def byte_level_tokenizer(model_max_length: int = 1_000_000_000) -> PreTrainedTokenizerFast:
    """A `PreTrainedTokenizerFast` with ids 0 = `<pad>`, 1 = `<eos>`, 2 + b = byte b (vocab size 258)."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({char: len(SPECIAL_TOKENS) + byte for byte, char in enumerate(_byte_level_characters())})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", model_max_length=model_max_length
    )
