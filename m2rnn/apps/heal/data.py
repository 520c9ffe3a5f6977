"""Text for healing: a `datasets` dataset or local .txt / .jsonl files, tokenized and cut into fixed-length blocks.

Documents are tokenized one by one, joined with the tokenizer's EOS token (when it has one) into one token stream,
and cut into blocks of `block_size` tokens (the ragged tail is dropped). The held-out blocks are the *end* of the
stream, so held-out text is text the training blocks never contain (apart from the document a cut may split), or
a separate split of the dataset when `eval_split` is given.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


class HealError(ValueError):
    """A bad healing request: wrong paths, data, models that do not pair, settings out of range."""


@dataclass
class TextSource:
    """Where the text comes from: a `datasets` dataset (`dataset`, `dataset_config`, `split`) or local `files`.

    `text_column` names the text field of dataset rows and of .jsonl lines. `eval_split` (datasets only) takes the
    held-out blocks from another split instead of the end of the training text. `max_tokens` stops reading once
    that many tokens were collected (per split), so a large dataset is not tokenized whole.
    """

    dataset: str | None = None
    dataset_config: str | None = None
    split: str = "train"
    eval_split: str | None = None
    files: Sequence[str | os.PathLike] = ()
    text_column: str = "text"
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if (self.dataset is None) == (not self.files):
            raise HealError("give exactly one text source: a dataset name (--dataset) or local files (--text-files)")
        if self.eval_split is not None and self.dataset is None:
            raise HealError(f"eval_split={self.eval_split!r} needs a dataset; local files are split by eval_fraction")


@dataclass
class TextBlocks:
    """Token blocks `(num_blocks, block_size)` for training and for held-out evaluation."""

    train: torch.Tensor
    eval: torch.Tensor
    block_size: int

    def summary(self) -> dict[str, int]:
        return {"block_size": self.block_size, "train_blocks": len(self.train), "eval_blocks": len(self.eval)}


# ---------------------------------------------------------------------------------------------------------------
# Reading documents
# ---------------------------------------------------------------------------------------------------------------
def read_text_files(files: Sequence[str | os.PathLike], text_column: str = "text") -> Iterator[str]:
    """Documents from local files: a .txt file is one document, a .jsonl file one document per line (its
    `text_column` field)."""
    for file in files:
        path = Path(file)
        if not path.is_file():
            what = "is a folder, not a file" if path.is_dir() else "does not exist"
            raise HealError(f"text file {str(path)!r} {what} (--text-files takes .txt and .jsonl files)")
        try:
            if path.suffix == ".txt":
                yield path.read_text(encoding="utf-8")
            elif path.suffix == ".jsonl":
                yield from _read_jsonl(path, text_column)
            else:
                raise HealError(f"text file {str(path)!r}: unsupported suffix {path.suffix!r} (use .txt or .jsonl)")
        except UnicodeDecodeError as error:
            raise HealError(f"text file {str(path)!r} is not UTF-8 text ({error.reason} at byte {error.start})") from error


def _read_jsonl(path: Path, text_column: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise HealError(f"{path}:{number}: not a JSON line ({error.msg})") from error
            if not isinstance(row, dict) or text_column not in row:
                keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise HealError(f"{path}:{number}: no text field {text_column!r} (text_column); found {keys}")
            yield _as_text(row[text_column], f"{path}:{number}", text_column)


def read_dataset(name: str, config: str | None, split: str, text_column: str) -> Iterator[str]:
    """Documents from a `datasets` dataset (any hub name or local builder), one per row."""
    try:
        import datasets
    except ImportError as error:
        raise HealError("--dataset needs the `datasets` package (pip install datasets)") from error
    check_hub_name(name, "--dataset", "dataset folder or builder")
    try:
        rows = datasets.load_dataset(name, config, split=split)
    except Exception as error:  # unknown split or config (the message lists the valid ones), not found, offline
        reason = " ".join(str(error).split()) or type(error).__name__
        if "offline" in reason.lower() or "couldn't reach" in reason.lower():
            reason += "; offline, give local text with --text-files or a local dataset folder as --dataset"
        raise HealError(f"dataset {name!r} (config {config!r}, split {split!r}): {reason}") from error
    if text_column not in rows.column_names:
        raise HealError(
            f"dataset {name!r} split {split!r} has no text column {text_column!r} (text_column); "
            f"columns: {rows.column_names}"
        )
    for index, row in enumerate(rows):
        yield _as_text(row[text_column], f"dataset {name!r} row {index}", text_column)


def check_hub_name(name: str, option: str, local_kind: str) -> None:
    """Before a library looks `name` up on the Hub (with half a minute of retries when offline): refuse a path that
    does not exist, and a Hub name when the Hub does not answer one quick request, in one line saying what to do."""
    from ..hub import hub_unreachable

    if Path(name).expanduser().exists():
        return
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise HealError(f"{option} {name!r}: no such {local_kind}")
    reason = hub_unreachable()
    if reason:
        raise HealError(f"{option} {name!r} is not a local {local_kind} and the Hub cannot be reached ({reason}); "
                        f"give a local path, or set HF_HUB_OFFLINE=1 to use a cached copy")


def _as_text(value: Any, where: str, text_column: str) -> str:
    if not isinstance(value, str):
        raise HealError(f"{where}: field {text_column!r} is {type(value).__name__}, not text")
    return value


# ---------------------------------------------------------------------------------------------------------------
# Tokens and blocks
# ---------------------------------------------------------------------------------------------------------------
def token_stream(documents: Iterable[str], tokenizer: Any, max_tokens: int | None = None) -> list[int]:
    """All documents' tokens, each followed by EOS when the tokenizer has one; stops after `max_tokens`."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for text in documents:
        if not text.strip():
            continue
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        stream.extend(eos)
        if max_tokens is not None and len(stream) >= max_tokens:
            return stream[:max_tokens]
    return stream


def chunk(stream: Sequence[int], block_size: int) -> torch.Tensor:
    """`(len(stream) // block_size, block_size)` int64 blocks; the tail that does not fill a block is dropped."""
    count = len(stream) // block_size
    return torch.tensor(stream[: count * block_size], dtype=torch.long).view(count, block_size)


def load_text_blocks(
    source: TextSource, tokenizer: Any, block_size: int = 256, eval_fraction: float = 0.1, min_eval_blocks: int = 1
) -> TextBlocks:
    """Tokenize `source` and cut it into training and held-out blocks (see the module docstring)."""
    if block_size < 2:
        raise HealError(f"block_size={block_size} must be at least 2")
    if not 0.0 < eval_fraction < 1.0:
        raise HealError(f"eval_fraction={eval_fraction} must be between 0 and 1")
    if source.dataset is not None:
        documents = read_dataset(source.dataset, source.dataset_config, source.split, source.text_column)
    else:
        documents = read_text_files(source.files, source.text_column)
    blocks = chunk(token_stream(documents, tokenizer, source.max_tokens), block_size)
    where = source.dataset or ", ".join(str(f) for f in source.files)
    if source.eval_split is not None:
        held_out = read_dataset(source.dataset, source.dataset_config, source.eval_split, source.text_column)
        train, eval_blocks = blocks, chunk(token_stream(held_out, tokenizer, source.max_tokens), block_size)
    else:
        eval_count = max(min_eval_blocks, math.ceil(eval_fraction * len(blocks)))
        train, eval_blocks = blocks[: len(blocks) - eval_count], blocks[len(blocks) - eval_count :]
    if len(train) == 0 or len(eval_blocks) < min_eval_blocks:
        raise HealError(
            f"{where}: {len(blocks)} block(s) of block_size={block_size} tokens is too little text for training "
            f"and {min_eval_blocks} held-out block(s); give more text or a smaller block_size"
        )
    return TextBlocks(train=train, eval=eval_blocks, block_size=block_size)


def batches(blocks: torch.Tensor, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless shuffled training batches: each epoch visits every block once in a fresh order."""
    while True:
        order = torch.randperm(len(blocks), generator=generator)
        for start in range(0, len(order), batch_size):
            yield blocks[order[start : start + batch_size]]


def eval_batches(blocks: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """The held-out blocks in order, once."""
    for start in range(0, len(blocks), batch_size):
        yield blocks[start : start + batch_size]
