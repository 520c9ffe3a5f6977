"""A byte-level tokenizer built offline, for the examples and tests whose tiny models need one without network
access: every UTF-8 byte is one token, so any text round-trips and token counts are byte counts."""

from __future__ import annotations

from typing import Any

BYTE_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
BYTE_VOCAB_SIZE = len(BYTE_SPECIAL_TOKENS) + 256
"""Ids 0–3 are pad, bos, eos, unk; ids 4–259 are the 256 byte values (so any UTF-8 text round-trips)."""


def byte_level_tokenizer(model_max_length: int = 1_000_000_000, padding_side: str = "right") -> Any:
    """A `PreTrainedTokenizerFast` with one token per UTF-8 byte, built offline from the `tokenizers` library.

    For examples and tests with tiny models (pair it with `vocab_size=BYTE_VOCAB_SIZE`, `pad_token_id=0`,
    `bos_token_id=1`, `eos_token_id=2`); real work uses the checkpoint's own tokenizer. Batched generation wants
    `padding_side="left"`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = _byte_chars()
    if set(byte_chars) != set(pre_tokenizers.ByteLevel.alphabet()):  # a tokenizers release changed the table
        raise RuntimeError("byte_level_tokenizer: tokenizers' ByteLevel alphabet is not GPT-2's byte table")
    vocab = {token: i for i, token in enumerate(BYTE_SPECIAL_TOKENS)}
    vocab.update({char: len(BYTE_SPECIAL_TOKENS) + i for i, char in enumerate(byte_chars)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, model_max_length=model_max_length,
        pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>", padding_side=padding_side,
    )


def _byte_chars() -> list[str]:
    """GPT-2's byte → printable character table (the alphabet of `pre_tokenizers.ByteLevel`), indexed by byte."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)}
    chars, shifted = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + shifted))
            shifted += 1
    return chars


__all__ = ["BYTE_SPECIAL_TOKENS", "BYTE_VOCAB_SIZE", "byte_level_tokenizer"]
