"""Source models as their own library runs them, for `--verify` and the tests.

transformers binds fla's Triton GDN kernels (and causal-conv1d's) into its Qwen3-Next, Qwen3.5(-MoE) and
OLMo-hybrid modules at import time when those packages import, with no device check, so they fail on CPU
(docs/checkpoint-formats.md, "Verifying against the source library"). `torch_gdn_path()` swaps the module-level
functions back to transformers' own torch versions (kept by `functools.wraps` as `__wrapped__`) for as long as it
is active.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

GDN_MODULES = (
    "transformers.models.qwen3_next.modeling_qwen3_next",
    "transformers.models.qwen3_5.modeling_qwen3_5",
    "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe",
    "transformers.models.olmo_hybrid.modeling_olmo_hybrid",
)
KERNEL_FUNCTIONS = (
    "torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule", "causal_conv1d_fn", "causal_conv1d_update",
)


@contextmanager
def torch_gdn_path() -> Iterator[None]:
    """Run transformers' GDN hybrids on their pure-torch kernels inside the block (restored afterwards)."""
    saved = []
    for module_name in GDN_MODULES:
        module = importlib.import_module(module_name)
        for name in KERNEL_FUNCTIONS:
            function = getattr(module, name, None)
            original = getattr(function, "__wrapped__", None)
            if original is not None:
                saved.append((module, name, function))
                setattr(module, name, original)
    try:
        yield
    finally:
        for module, name, function in saved:
            setattr(module, name, function)


def load_transformers_causal_lm(folder: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """`AutoModelForCausalLM` of a transformers checkpoint (text part of a VLM), eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


@torch.no_grad()
def max_logit_difference(
    ours: torch.nn.Module, reference: torch.nn.Module, vocab_size: int, num_sequences: int = 3, length: int = 24,
    seed: int = 0,
) -> tuple[float, float]:
    """(max |Δ logits|, max |Δ| / max |reference logits|) over a few random sequences, full forward, no cache."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (num_sequences, length), generator=generator)
    with torch_gdn_path():
        expected = reference(input_ids=ids.to(_device(reference)), use_cache=False).logits.float().cpu()
    actual = ours(input_ids=ids.to(_device(ours)), use_cache=False).logits.float().cpu()
    difference = (actual - expected).abs().max().item()
    return difference, difference / max(expected.abs().max().item(), 1e-30)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
