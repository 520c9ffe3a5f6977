"""Convert a GDN-hybrid checkpoint folder into an M2RNN-family checkpoint, streaming, with optional layer swaps."""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError

from m2rnn.modeling_m2rnn import M2RNNForCausalLM
from ..options import parse_dtype, progress_bars
from ..output import check_output, staged_output
from m2rnn.meta import expected_tensors

from .common import ImportPlan, check_plan
from .io import CheckpointReader, ConversionError, copy_side_files, read_config, side_files, write_sharded_safetensors
from .swap import FP32_PARAMS, INITS, swap_plan

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
    "m2rnn": "it is already an M2RNN-family checkpoint: load it with AutoModelForCausalLM.from_pretrained "
    "(after `import m2rnn`), and swap more layers with m2rnn.apps.conversion.swap_layers(model, [...])",
}
OUTPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def family_of(raw: dict[str, Any], folder: str | os.PathLike = "") -> Any:
    """The importer module for a raw config (by `model_type`), or a `ConversionError` saying why not."""
    model_type = raw.get("model_type")
    if model_type is None:
        raise ConversionError(f"{folder}: config.json has no `model_type`; supported: {sorted(set(FAMILIES))}")
    if not isinstance(model_type, str):
        raise ConversionError(f"{folder}: config.json `model_type`={model_type!r} must be a string")
    if raw.get("quantization_config"):
        method = raw["quantization_config"].get("quant_method") if isinstance(raw["quantization_config"], dict) else None
        raise ConversionError(
            f"{folder}: a quantized checkpoint (quantization_config, quant_method={method!r}) cannot be converted "
            "exactly; convert the unquantized checkpoint"
        )
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
    try:
        plan = family.build_plan(Path(source), raw, reader)
        plan.source_model_type = raw["model_type"]
    except ConversionError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, StrictDataclassError) as error:
        # a config value of the wrong kind, found by the family's code or by transformers' config class
        detail = f"{type(error).__name__}: {error}" if isinstance(error, (KeyError, AttributeError)) else str(error)
        raise ConversionError(
            f"{Path(source) / 'config.json'}: not a valid {raw['model_type']!r} config ({detail})"
        ) from error
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
    source_id: str | None = None,
) -> ConversionResult:
    """Convert `source` into an M2RNN-family checkpoint at `output`.

    Every request is checked before any work (the output against `m2rnn.apps.output`' output-safety rule, with the
    source and its weight files as inputs). Tensors stream one at a time into sharded safetensors
    (`max_shard_size` bytes per file) inside a temporary folder next to `output`, renamed into place at the end, so
    a failure leaves nothing behind and the source is only read. `dtype` (`"bf16"`, `"float32"`, ... see
    `m2rnn.apps.options.parse_dtype`, or a torch dtype) casts the weights, default: the source's embedding dtype;
    `A_log`/`dt_bias` stay float32. `verify` compares logits with the source model (in its own library, fp32,
    before any swap) and records the max difference. Tokenizer files and `generation_config.json` are copied.
    The saved config records the provenance as `config.conversion` (`source_id`, the Hub repo id `source` was
    downloaded from, else the repo id of a Hugging Face cache snapshot, else `source` as given; its `model_type`;
    swapped layers and their init), which model cards show.
    """
    out_dtype = _output_dtype(dtype)
    _check_shard_size(max_shard_size)
    if init not in INITS:
        raise ConversionError(f"init={init!r} must be one of {INITS}")
    if source_id is not None:
        _check_repo_id(source_id)
    source, output = os.path.expanduser(source), os.path.expanduser(output)
    _check_output_parent(output)
    check_output(output, [source], overwrite, option="OUT")  # fail fast, before reading the source
    if verify:
        _check_verify_possible(family_of(read_config(source), source), source)
    imported, reader, family = plan_import(source)
    plan = swap_plan(imported, swap_layers, init, seed, **(m2rnn_overrides or {})) if swap_layers else imported
    if out_dtype is None:
        out_dtype = reader.dtype(plan.tensors["model.embed_tokens.weight"].sources[0])
    copied = side_files(Path(source))
    shapes = expected_tensors(plan.config)
    specs = {name: (shape, torch.float32 if name.endswith(FP32_PARAMS) else out_dtype) for name, shape in shapes.items()}
    with progress_bars(progress), staged_output(output, [source, *reader.files()], overwrite, option="OUT") as staging:
        difference = verify_plan(imported, reader, family, source)[0] if verify else None
        from tqdm.auto import tqdm

        with tqdm(total=len(specs), desc="Converting tensors", unit="tensor", disable=not progress) as bar:
            files = write_sharded_safetensors(
                staging, specs, lambda name: _build(plan, reader, name), int(max_shard_size), lambda name: bar.update()
            )
        plan.config.architectures = ["M2RNNForCausalLM"]
        plan.config.dtype = out_dtype
        plan.config.conversion = provenance(source_id or source, plan.source_model_type, swap_layers, init, seed)
        plan.config.save_pretrained(staging)
        copy_side_files(Path(source), staging, copied)
    return ConversionResult(Path(output), plan.config, files, copied, difference, plan.notes)


def provenance(
    source: str | os.PathLike, source_model_type: str, swap_layers: Sequence[int] | None, init: str, seed: int
) -> dict[str, Any]:
    """`config.conversion` of a converted checkpoint (keys of `m2rnn.model_card.CONVERSION_KEYS`)."""
    record: dict[str, Any] = {"source": _source_name(source), "source_model_type": source_model_type,
                              "swapped_layers": sorted(swap_layers or [])}
    if swap_layers:
        record["init"] = f"fresh (the paper's init, seed {seed})" if init == "fresh" else (
            "transplant (the GDN layer's projections, conv, decay gate and norm reused; W = I)"
        )
    return record


def _source_name(source: str | os.PathLike) -> str:
    """The Hub repo id of a Hugging Face cache snapshot (`.../models--ORG--NAME/snapshots/REV`), else `source` as given."""
    snapshot = Path(source).resolve()
    repo_folder = snapshot.parent.parent.name
    if snapshot.parent.name == "snapshots" and repo_folder.startswith("models--") and "--" in repo_folder[8:]:
        return repo_folder[len("models--"):].replace("--", "/", 1)
    return str(source)


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ConversionError(f"source_id={repo_id!r} is not a Hub repo id like 'Qwen/Qwen3.5-0.8B' ({error})") from None


def _output_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if dtype not in OUTPUT_DTYPES:
            raise ConversionError(f"dtype={dtype} must be one of {[str(d) for d in OUTPUT_DTYPES]}")
        return dtype
    return parse_dtype(dtype)


def _check_shard_size(max_shard_size: int | float) -> None:
    if isinstance(max_shard_size, bool) or not isinstance(max_shard_size, (int, float)) or not (
        math.isfinite(max_shard_size) and max_shard_size >= 1
    ):
        raise ConversionError(f"max_shard_size={max_shard_size!r} must be a finite number of bytes, at least 1")


def _check_output_parent(output: str | os.PathLike) -> None:
    """Refuse an `output` below a file (its nearest existing ancestor must be a folder)."""
    ancestor = Path(output).absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConversionError(f"OUT {str(output)!r} cannot be created: {str(ancestor)!r} is a file, not a folder")


def _check_verify_possible(family: Any, source: str | os.PathLike) -> None:
    """Refuse `verify` up front when the source's own library cannot run here (the family says why)."""
    problem = getattr(family, "reference_unavailable", lambda: None)()
    if problem:
        raise ConversionError(f"--verify for {source}: {problem}")


def _build(plan: ImportPlan, reader: CheckpointReader, name: str) -> torch.Tensor:
    spec = plan.tensors[name]
    try:
        return spec.build(reader.get)
    except ConversionError:
        raise
    except (RuntimeError, ValueError, IndexError) as error:
        raise ConversionError(f"tensor {name!r} (from {list(spec.sources)}): {error}") from error
