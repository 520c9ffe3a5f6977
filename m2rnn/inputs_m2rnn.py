"""What the model checks and derives from its inputs: packed-document boundaries from position ids (and back),
the cache under either of its argument names, and the shapes of ids, embeddings and the attention mask."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from .cache_m2rnn import cached_length


def cu_seqlens_from_position_ids(position_ids: torch.Tensor | None) -> torch.Tensor | None:
    """Boundaries of packed documents in a (1, T) row whose positions restart at 0 (padding-free batches)."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1:
        return None
    starts = torch.nonzero(position_ids[0] == 0).flatten()
    if starts.numel() <= 1 and (starts.numel() == 0 or starts[0].item() == 0):
        return None
    total = torch.tensor([position_ids.shape[1]], device=position_ids.device)
    if starts[0].item() != 0:
        starts = torch.cat([starts.new_zeros(1), starts])
    return torch.cat([starts, total]).to(torch.int32)


def position_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(1, T) positions restarting at 0 at every document start of `cu_seqlens` (padding-free batches)."""
    positions = torch.arange(total, device=cu_seqlens.device)
    document = torch.bucketize(positions, cu_seqlens[1:].long(), right=True)
    return (positions - cu_seqlens[:-1].long()[document]).unsqueeze(0)


def one_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The cache under either of its names (`cache` from transformers 5.24 on, `past_key_values` before)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("M2RNNModel: pass the cache as `cache` or as `past_key_values`, not two different caches")
    return cache if cache is not None else past_key_values


def check_inputs(input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> None:
    """(batch, seq_len) ids or (batch, seq_len, hidden) embeddings with at least one row and one token."""
    tensor, name, dims = (input_ids, "input_ids", 2) if input_ids is not None else (inputs_embeds, "inputs_embeds", 3)
    if tensor.dim() != dims:
        layout = "(batch, seq_len)" if dims == 2 else "(batch, seq_len, hidden_size)"
        hint = "; for one sequence pass `ids[None]`" if name == "input_ids" and tensor.dim() == 1 else ""
        raise ValueError(f"M2RNNModel: `{name}` must be {layout}, got shape {tuple(tensor.shape)}{hint}")
    if tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise ValueError(f"M2RNNModel: `{name}` is empty (shape {tuple(tensor.shape)}); pass at least one token per row")


def embed_ids(embedding: torch.nn.Embedding, input_ids: torch.Tensor) -> torch.Tensor:
    """`embedding(input_ids)`. Where torch raises its IndexError (ids outside the vocabulary, on CPU), a ValueError
    naming them instead; found after the fact, so valid ids cost no host sync (on CUDA such ids trip a device-side
    assert, which nothing can catch)."""
    if torch.compiler.is_compiling():
        return embedding(input_ids)
    try:
        return embedding(input_ids)
    except IndexError as error:
        size = embedding.num_embeddings
        bad = input_ids[(input_ids < 0) | (input_ids >= size)].unique().tolist()
        if not bad:
            raise
        shown = ", ".join(map(str, bad[:8])) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise ValueError(
            f"M2RNNModel: `input_ids` holds {shown}, outside the vocabulary [0, {size}) (vocab_size {size}): a "
            "tokenizer of another model, or added tokens without `model.resize_token_embeddings(len(tokenizer))`"
        ) from error


def check_attention_mask(
    attention_mask: torch.Tensor, batch: int, seq_len: int, cache: Cache | None
) -> None:
    """A 2-D mask covers the cached tokens and the new ones of every row; 4-D masks are passed through as given."""
    if attention_mask.dim() == 4:
        return
    past = cached_length(cache)
    expected = "past + new tokens" if past is None else f"{past + seq_len} (past {past} + new {seq_len})"
    if (
        attention_mask.dim() != 2
        or attention_mask.shape[0] != batch
        or attention_mask.shape[1] < seq_len
        or (past is not None and attention_mask.shape[1] != past + seq_len)
    ):
        raise ValueError(
            f"M2RNNModel: `attention_mask` has shape {tuple(attention_mask.shape)}; expected (batch={batch}, "
            f"{expected}), 1 for tokens and 0 for padding"
        )
