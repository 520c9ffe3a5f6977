"""Convert a GDN-hybrid checkpoint folder into an M2RNN-family checkpoint, streaming, with optional layer swaps."""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..modeling_m2rnn import M2RNNForCausalLM
from .common import ImportPlan, check_plan, expected_tensors
from .io import CheckpointReader, ConversionError, copy_side_files, read_config, staged_output, write_sharded_safetensors
from .swap import FP32_PARAMS, swap_plan

# model_type → importer module (each has `build_plan(folder, raw, reader)` and `load_reference(folder, dtype)`).
FAMILIES = {
    "qwen3_5": "qwen3_5",
    "qwen3_5_text": "qwen3_5",
    "qwen3_5_moe": "qwen3_5_moe",
    "qwen3_5_moe_text": "qwen3_5_moe",
    "qwen3_next": "qwen3_next",
    "olmo_hybrid": "olmo_hybrid",
    "gated_deltanet": "fla",
    "gpt_base": "lm_engine",
}
REFUSED = {
    "qwen4_exp": "qwen4_exp (Qwen3.8-Flash-Next) replaces every norm and residual by hyper-connections and adds QSA "
    "sparse attention and n-gram embeddings, none of which the M2RNN family has",
    "qwen4_exp_text": "see qwen4_exp",
    "hybrid_gated_deltanet": "a custom (Idiap) model_type whose code is not part of fla",
}
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def family_of(raw: dict[str, Any], folder: str | os.PathLike = "") -> Any:
    """The importer module for a raw config (by `model_type`), or a `ConversionError` saying why not."""
    model_type = raw.get("model_type")
    if model_type in REFUSED:
        raise ConversionError(f"{folder}: model_type={model_type!r} is not supported: {REFUSED[model_type]}")
    if model_type not in FAMILIES:
        raise ConversionError(
            f"{folder}: unknown model_type={model_type!r}; supported: {sorted(set(FAMILIES))}"
        )
    return importlib.import_module(f"{__package__}.{FAMILIES[model_type]}")


def plan_import(source: str | os.PathLike) -> tuple[ImportPlan, CheckpointReader, Any]:
    """Read a source folder's config and tensor list (no tensor data) and check that it converts exactly."""
    raw = read_config(source)
    family = family_of(raw, source)
    reader = CheckpointReader(source)
    plan = family.build_plan(Path(source), raw, reader)
    check_plan(plan, reader)
    return plan, reader, family


def materialize(plan: ImportPlan, reader: CheckpointReader, dtype: torch.dtype = torch.float32) -> M2RNNForCausalLM:
    """The planned model in memory (for verification and tests; a streaming conversion never does this)."""
    model = M2RNNForCausalLM(plan.config)
    state = {name: spec.build(reader.get).to(dtype) for name, spec in plan.tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise ConversionError(f"internal: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(dtype).eval()


def import_checkpoint(source: str | os.PathLike, dtype: torch.dtype = torch.float32) -> M2RNNForCausalLM:
    """Load a GDN-hybrid checkpoint folder directly as an `M2RNNForCausalLM` (in memory, no files written)."""
    plan, reader, _ = plan_import(source)
    return materialize(plan, reader, dtype)


@dataclass
class ConversionResult:
    output: Path
    config: Any
    files: list[str]
    side_files: list[str]
    max_logit_difference: float | None = None
    notes: list[str] = field(default_factory=list)


def verify_plan(plan: ImportPlan, reader: CheckpointReader, family: Any, source: str | os.PathLike) -> tuple[float, float]:
    """(max |Δ logits|, relative) between the source (its own library) and our import, fp32, before any swap."""
    from .reference import max_logit_difference

    ours = materialize(plan, reader, torch.float32)
    reference = family.load_reference(source, torch.float32)
    return max_logit_difference(ours, reference, plan.config.vocab_size)


def convert_checkpoint(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    swap_layers: Sequence[int] | None = None,
    init: str = "fresh",
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    verify: bool = False,
    max_shard_size: int = 5 * 1024**3,
    seed: int = 0,
    progress: bool = True,
    m2rnn_overrides: dict[str, Any] | None = None,
) -> ConversionResult:
    """Convert `source` into an M2RNN-family checkpoint at `output`.

    Tensors stream one at a time into sharded safetensors (`max_shard_size` bytes per file) inside a temporary
    folder next to `output`, renamed into place at the end, so a failure leaves nothing behind and the source
    is only read. `dtype` (`"bf16"`, `"fp32"`, ... or a torch dtype) casts the weights, default: the source's
    embedding dtype; `A_log`/`dt_bias` stay float32. `verify` compares logits with the source model (in its
    own library, fp32, before any swap) and records the max difference. Tokenizer files and
    `generation_config.json` are copied.
    """
    out_dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if isinstance(dtype, str) and dtype not in DTYPES:
        raise ConversionError(f"dtype={dtype!r} must be one of {sorted(DTYPES)}")
    plan, reader, family = plan_import(source)
    with staged_output(source, output, overwrite) as staging:  # refuses a bad `output` before any work
        difference = verify_plan(plan, reader, family, source)[0] if verify else None
        if swap_layers:
            plan = swap_plan(plan, swap_layers, init, seed, **(m2rnn_overrides or {}))
        if out_dtype is None:
            out_dtype = reader.dtype(plan.tensors["model.embed_tokens.weight"].sources[0])
        shapes = expected_tensors(plan.config)
        specs = {name: (shape, torch.float32 if name.endswith(FP32_PARAMS) else out_dtype) for name, shape in shapes.items()}
        files = write_sharded_safetensors(
            staging, specs, lambda name: _build(plan, reader, name), max_shard_size, _progress_bar(progress, len(specs))
        )
        plan.config.architectures = ["M2RNNForCausalLM"]
        plan.config.dtype = out_dtype
        plan.config.save_pretrained(staging)
        side_files = copy_side_files(Path(source), staging)
    return ConversionResult(Path(output), plan.config, files, side_files, difference, plan.notes)


def _build(plan: ImportPlan, reader: CheckpointReader, name: str) -> torch.Tensor:
    spec = plan.tensors[name]
    try:
        return spec.build(reader.get)
    except ConversionError:
        raise
    except (RuntimeError, ValueError, IndexError) as error:
        raise ConversionError(f"tensor {name!r} (from {list(spec.sources)}): {error}") from error


def _progress_bar(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return lambda names: tqdm(names, total=total, desc="Converting tensors", unit="tensor")
