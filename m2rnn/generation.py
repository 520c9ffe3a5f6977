"""Fast decoding: a static cache and one decode step that is captured in a CUDA graph (or compiled).

Eager `generate` pays Python and kernel-launch overhead on every layer of every token; for a recurrent model at
batch 1 that overhead, not the arithmetic, sets the speed. `StaticDecoder` removes it:

1. It preallocates every state once: transformers' `StaticCache` gives each recurrent layer a conv state and a
   recurrent state (`LinearAttentionLayer`) and each attention layer a key/value buffer of `max_length` slots
   (`StaticLayer`); all are updated in place, so their addresses never change.
2. The decode step reads its inputs from fixed buffers (token, per-row position, next cache slot, padding mask
   over the slots), builds the 4-D attention mask itself and calls the model with no host synchronisation (with
   `dense_moe_dispatch=True`, so the MoE blocks use their sync-free `experts_dense`).
3. On CUDA that step is captured once in a CUDA graph (after a short warm-up) and replayed for every token; with
   `compile=True` it is first compiled with `torch.compile(fullgraph=True)`. On CPU it runs eagerly or compiled.

Prefill always runs eagerly with the sequence kernels, into the same buffers.

    from m2rnn.generation import fast_generate
    out = fast_generate(model, input_ids, max_new_tokens=128)          # one call

    decoder = StaticDecoder(model, batch_size=8, max_length=4096)      # reuse the capture across calls
    out = decoder.generate(input_ids, max_new_tokens=128, attention_mask=mask)
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import nn
from transformers import StaticCache

from .modeling_m2rnn import M2RNNSparseMoeBlock

SUPPORTED_ATTENTION = ("sdpa", "eager")


@contextlib.contextmanager
def dense_moe_dispatch(model: nn.Module) -> Iterator[None]:
    """Deprecated, and does nothing: the dispatch is an argument of the call, `model(..., dense_moe_dispatch=True)`.

    The MoE blocks already take the dense path by themselves while compiling or capturing a CUDA graph; in eager
    calls both paths give the same sum.
    """
    warnings.warn(
        "m2rnn.generation.dense_moe_dispatch(model) is deprecated and has no effect: pass `dense_moe_dispatch=True` "
        "to the model call instead (compiled and CUDA-graph-captured calls use the dense path by themselves)",
        FutureWarning,
        stacklevel=3,
    )
    yield


def _attention_implementation(model: nn.Module) -> str | None:
    """The attention backend the decode step must build a mask for, or None for an attention-free model."""
    config = model.config
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    if "full_attention" not in layer_types:
        return None
    implementation = config._attn_implementation or "eager"
    if implementation not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"StaticDecoder: attn_implementation={implementation!r} is not supported by the static decode step; "
            f"load the model with attn_implementation in {SUPPORTED_ATTENTION}"
        )
    return implementation


class StaticDecoder:
    """A model bound to a preallocated cache for `batch_size` rows and `max_length` tokens, with a replayable step.

    Args:
        model: an `M2RNNForCausalLM` (any mixer mix, dense or MoE), in eval mode. Any transformers decoder whose
            forward takes `position_ids` and a 4-D `attention_mask` (e.g. `LlamaForCausalLM`) works too.
        batch_size: rows per call; `generate` requires exactly this many.
        max_length: prompt plus generated tokens, the number of key/value slots of the attention layers.
        cuda_graph: capture the decode step in a CUDA graph; default True on CUDA. Needs CUDA.
        compile: wrap the decode step in `torch.compile(fullgraph=True)` (before the capture on CUDA).
        compile_kwargs: extra arguments for `torch.compile` (e.g. `{"backend": "aot_eager"}` or a `mode`).
        warmup_steps: eager steps run before the capture (lazy initialisation, compilation, autotuning).
    """

    def __init__(
        self,
        model: nn.Module,
        batch_size: int,
        max_length: int,
        *,
        cuda_graph: bool | None = None,
        compile: bool = False,
        compile_kwargs: dict | None = None,
        warmup_steps: int = 2,
    ):
        if batch_size <= 0 or max_length <= 1:
            raise ValueError(f"StaticDecoder: batch_size={batch_size} and max_length={max_length} must be positive (> 1)")
        self.model = model
        self.device = model.device
        self.batch_size = batch_size
        self.max_length = max_length
        self.attention = _attention_implementation(model)
        self.cuda_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        if self.cuda_graph and self.device.type != "cuda":
            raise ValueError(f"StaticDecoder: cuda_graph=True needs the model on CUDA, it is on {self.device}")
        self.compiled = compile
        self.warmup_steps = warmup_steps

        self.cache = StaticCache(config=model.config, max_cache_len=max_length)
        # transformers 5.24 models take the cache as `cache` (`past_key_values` is deprecated there)
        self._cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        # the step must not read the routing on the host: MoE blocks take their dense path (warm-up included)
        has_moe = any(isinstance(module, M2RNNSparseMoeBlock) for module in model.modules())
        self._step_kwargs = {"dense_moe_dispatch": True} if has_moe else {}
        long = dict(dtype=torch.long, device=self.device)
        self.tokens = torch.zeros(batch_size, 1, **long)  # the token fed to the next step
        self.positions = torch.zeros(batch_size, 1, **long)  # its position per row (left padding shifts rows)
        self.slot = torch.zeros((), **long)  # the cache slot it is written to
        self.slot_mask = torch.ones(batch_size, max_length, dtype=torch.bool, device=self.device)  # False = padding
        self._slot_ids = torch.arange(max_length, **long)

        step: Callable[..., torch.Tensor] = self._decode_step
        if compile:
            step = torch.compile(step, fullgraph=True, dynamic=False, **(compile_kwargs or {}))
        self._step = step
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_logits: torch.Tensor | None = None
        self._allocate()

    # ------------------------------------------------------------------ the step
    def _attention_mask(self, slot: torch.Tensor, slot_mask: torch.Tensor) -> torch.Tensor | None:
        """(B, 1, 1, L) mask of the slots the new token may attend to: written so far and not padding."""
        if self.attention is None:
            return None
        allowed = (slot_mask & (self._slot_ids <= slot))[:, None, None, :]
        if self.attention == "sdpa":
            return allowed
        dtype = self.model.dtype
        return torch.zeros((), dtype=dtype, device=self.device).masked_fill(~allowed, torch.finfo(dtype).min)

    def _decode_step(
        self, tokens: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor, slot_mask: torch.Tensor
    ) -> torch.Tensor:
        """One token for every row: updates the cache in place, advances `positions` and `slot`, returns (B, vocab)."""
        # a 4-D mask reaches the attention layers as it is (transformers' mask functions pass 4-D masks through)
        out = self.model(
            input_ids=tokens, position_ids=positions, attention_mask=self._attention_mask(slot, slot_mask),
            use_cache=True, logits_to_keep=1, **{self._cache_argument: self.cache}, **self._step_kwargs,
        )
        positions.add_(1)
        slot.add_(1)
        return out.logits[:, -1]

    def step(self) -> torch.Tensor:
        """Run the decode step on the token in `self.tokens`: a graph replay on CUDA, else the (compiled) function."""
        if self._graph is not None:
            self._graph.replay()
            return self._graph_logits
        with torch.no_grad():
            return self._step(self.tokens, self.positions, self.slot, self.slot_mask)

    # ------------------------------------------------------------------ allocation and capture
    @torch.no_grad()
    def _allocate(self) -> None:
        """Create every state buffer with a 1-token forward, then warm up and capture the step, then reset."""
        self.model(
            input_ids=self.tokens, position_ids=self.positions, use_cache=True, logits_to_keep=1,
            **{self._cache_argument: self.cache},
        )
        self.slot.fill_(1)
        self.positions.fill_(1)
        if self.cuda_graph:
            self._capture()
        elif self.compiled:  # compile now, so that the first generate is not the one paying for it
            self.step()
        self.reset()

    def _capture(self) -> None:
        stream = torch.cuda.Stream(device=self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(max(self.warmup_steps, 1)):
                self._step(self.tokens, self.positions, self.slot, self.slot_mask)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self._step(self.tokens, self.positions, self.slot, self.slot_mask)
        torch.cuda.synchronize(self.device)
        self._graph, self._graph_logits = graph, logits

    def reset(self) -> None:
        """Zero every state and rewind to an empty cache (the buffers, and so the captured graph, stay valid)."""
        self.cache.reset()
        self.tokens.zero_()
        self.positions.zero_()
        self.slot.zero_()
        self.slot_mask.fill_(True)

    # ------------------------------------------------------------------ prefill and generate
    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Reset, run the prompt (B, P) through the sequence kernels into the cache; returns the last logits (B, V)."""
        batch, length = input_ids.shape
        if batch != self.batch_size:
            raise ValueError(f"StaticDecoder: input_ids has batch {batch}, this decoder was built for {self.batch_size}")
        if length >= self.max_length:
            raise ValueError(f"StaticDecoder: a prompt of {length} tokens leaves no room in max_length={self.max_length}")
        self.reset()
        input_ids = input_ids.to(self.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(self.device)
        positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
            logits_to_keep=1, **{self._cache_argument: self.cache},
        )
        self.slot_mask[:, :length].copy_(attention_mask.bool())
        self.slot.fill_(length)
        self.positions.copy_(positions[:, -1:] + 1)
        return out.logits[:, -1]

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        attention_mask: torch.Tensor | None = None,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        stop_check_interval: int = 16,
        generator: torch.Generator | None = None,
    ) -> torch.LongTensor:
        """Prompt plus up to `max_new_tokens` tokens, (B, P + n), as `model.generate` returns them.

        Greedy by default; `do_sample` draws from softmax(logits / temperature) restricted to the `top_k` best.
        Rows that emitted `eos_token_id` continue with `pad_token_id`; generation stops once every row has
        finished. Whether all rows finished is read on the host only every `stop_check_interval` tokens, so the
        loop never waits on the GPU in between; the output is trimmed to where `generate` would have stopped.
        """
        if input_ids.shape[1] + max_new_tokens > self.max_length:
            raise ValueError(
                f"StaticDecoder: prompt ({input_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds "
                f"max_length={self.max_length}"
            )
        eos = _token_list(eos_token_id)
        if pad_token_id is None and eos:
            pad_token_id = eos[0]
        eos_ids = torch.tensor(eos, dtype=torch.long, device=self.device) if eos else None
        unfinished = torch.ones(self.batch_size, dtype=torch.bool, device=self.device)

        logits = self.prefill(input_ids, attention_mask)
        new_tokens: list[torch.Tensor] = []
        for i in range(max_new_tokens):
            if i > 0:
                logits = self.step()
            token = _select(logits, do_sample, temperature, top_k, generator)
            if eos_ids is not None:
                token = torch.where(unfinished, token, torch.full_like(token, pad_token_id))
                unfinished = unfinished & ~torch.isin(token, eos_ids)
            new_tokens.append(token)
            self.tokens.copy_(token[:, None])
            if eos_ids is not None and (i + 1) % stop_check_interval == 0 and not bool(unfinished.any()):
                break
        generated = torch.stack(new_tokens, dim=1)
        if eos_ids is not None:  # generate stops after the step at which the last row finished
            last_step = _last_finishing_step(generated, eos_ids)
            if last_step is not None:
                generated = generated[:, : last_step + 1]
        return torch.cat([input_ids.to(self.device), generated], dim=1)


def _token_list(token_ids: int | list[int] | torch.Tensor | None) -> list[int]:
    if token_ids is None:
        return []
    if isinstance(token_ids, torch.Tensor):
        return token_ids.flatten().tolist()
    return [token_ids] if isinstance(token_ids, int) else list(token_ids)


def _last_finishing_step(generated: torch.Tensor, eos_ids: torch.Tensor) -> int | None:
    """Index of the step at which the last row emitted its first EOS, or None if some row never did."""
    is_eos = torch.isin(generated, eos_ids)
    if not bool(is_eos.any(dim=1).all()):
        return None
    return int(is_eos.int().argmax(dim=1).max())


def _select(
    logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> torch.Tensor:
    """The next token per row: argmax, or a sample from the tempered (top-k) distribution."""
    if not do_sample:
        return logits.argmax(dim=-1)
    if temperature <= 0:
        raise ValueError(f"fast_generate: temperature={temperature} must be positive when do_sample=True")
    scores = logits.float() / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        threshold = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < threshold, float("-inf"))
    return torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator)[:, 0]


def fast_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    attention_mask: torch.Tensor | None = None,
    *,
    cuda_graph: bool | None = None,
    compile: bool = False,
    compile_kwargs: dict | None = None,
    **generate_kwargs,
) -> torch.LongTensor:
    """`model.generate`-style decoding through a one-off `StaticDecoder` (captured in a CUDA graph on CUDA).

    `eos_token_id` and `pad_token_id` default to the model's generation config. Building the decoder allocates the
    cache and captures the step (tens of milliseconds on a GPU, plus compilation with `compile=True`); to generate
    many times with the same batch size, build a `StaticDecoder` once and call its `generate`.
    """
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generate_kwargs.setdefault("eos_token_id", generation_config.eos_token_id)
        generate_kwargs.setdefault("pad_token_id", generation_config.pad_token_id)
    decoder = StaticDecoder(
        model, input_ids.shape[0], input_ids.shape[1] + max_new_tokens,
        cuda_graph=cuda_graph, compile=compile, compile_kwargs=compile_kwargs,
    )
    return decoder.generate(input_ids, max_new_tokens, attention_mask, **generate_kwargs)


__all__ = ["StaticDecoder", "dense_moe_dispatch", "fast_generate"]
