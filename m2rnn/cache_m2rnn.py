"""The caches of M2RNN models and the check that a cache fits a model.

Hybrids with attention use transformers' own `DynamicCache` or `StaticCache` (built with `config=`, they hold a conv
state and a recurrent state for each recurrent layer and keys/values for each attention layer). transformers asks
the first attention layer of a cache for its length; an attention-free model has none, so `generate` gives it an
`M2RNNCache` or `M2RNNStaticCache`, which count the tokens the model feeds them.
"""

from __future__ import annotations

from typing import Any

from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, LinearAttentionCacheLayerMixin, StaticCache

from .configuration_m2rnn import M2RNNConfig


class TokenCounterMixin:
    """Cache mixin that counts the tokens it has seen: the model calls `advance(n)` after each chunk of n tokens,
    and `get_seq_length` answers from that count when the cache has no attention layer to ask."""

    seen_tokens: int = 0

    def advance(self, num_tokens: int) -> None:
        """Record that the model has fed `num_tokens` more tokens (per row) through every layer."""
        self.seen_tokens += num_tokens

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if any(isinstance(layer, CacheLayerMixin) for layer in self.layers):
            return super().get_seq_length(layer_idx)
        return self.seen_tokens

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = 0


class M2RNNCache(TokenCounterMixin, DynamicCache):
    """`DynamicCache` that also counts the tokens it has seen.

    Hybrids with attention use a plain `DynamicCache` or `StaticCache`; `generate` switches to this class only for
    attention-free models.
    """

    def __init__(self, config: M2RNNConfig, **kwargs: Any):
        super().__init__(config=config, **kwargs)
        self.seen_tokens = 0


class M2RNNStaticCache(TokenCounterMixin, StaticCache):
    """`StaticCache` that also counts the tokens it has seen: what `generate(cache_implementation="static")` gives
    an attention-free model (preallocated conv and recurrent states updated in place, so decode can be compiled)."""

    def __init__(self, config: M2RNNConfig, max_cache_len: int, **kwargs: Any):
        super().__init__(config=config, max_cache_len=max_cache_len, **kwargs)
        self.seen_tokens = 0


def check_cache(cache: Cache, config: M2RNNConfig) -> None:
    """Refuse a cache whose layers do not match the model's: a recurrent layer needs a conv/recurrent-state layer
    (`LinearAttentionLayer`), an attention layer a key/value layer. `DynamicCache()` without `config=` has neither."""
    if not isinstance(cache, Cache):
        raise TypeError(
            f"M2RNNModel: the cache must be a transformers `Cache`, got {type(cache).__name__} (tuples of past key "
            "values are not supported)"
        )
    expected = {"linear_attention": LinearAttentionCacheLayerMixin, "full_attention": CacheLayerMixin}
    layer_types = config.layer_types
    wrong = [
        i for i, layer_type in enumerate(layer_types)
        if i >= len(cache.layers) or not isinstance(cache.layers[i], expected[layer_type])
    ]
    if wrong or len(cache.layers) != len(layer_types):
        kinds = [type(layer).__name__ for layer in cache.layers]
        raise ValueError(
            f"M2RNNModel: the cache passed has layers {kinds or '[] (none yet)'}, but this model's layers are "
            f"{layer_types}. Build it with `DynamicCache(config=model.config)` (or `StaticCache(config=model.config, "
            "max_cache_len=...)`), or pass no cache and `use_cache=True`."
        )


def cached_length(cache: Cache | None) -> int | None:
    """Tokens already in `cache` where the host knows it without a sync (None for static attention caches)."""
    if cache is None:
        return 0
    if not any(isinstance(layer, CacheLayerMixin) for layer in cache.layers):
        return cache.seen_tokens if isinstance(cache, TokenCounterMixin) else None
    past = cache.get_seq_length()
    return past if isinstance(past, int) else None


__all__ = ["M2RNNCache", "M2RNNStaticCache"]
