"""Fine-tuning helpers: PEFT target names per layer type, default LoRA targets registered with PEFT, the recipe for
the recurrent parameters LoRA cannot wrap, a packing collator whose row lengths repeat, and a text loader for
offline examples.

Nothing here is needed to train with `Trainer`: the model computes its causal-LM loss from `labels`, honours
`num_items_in_batch`, supports gradient checkpointing and reads padding-free batches from
`DataCollatorWithFlattening` by itself. On a GPU, `PackedCollator` (the same rows, rounded up to a multiple of
256 tokens) keeps the host from building new attention and matmul plans at every step. See `docs/finetuning.md`.

PEFT is optional and never imported by `import m2rnn`. `LoraConfig()` without `target_modules` finds our defaults
in PEFT's per-model-type table (`register_peft_defaults`): `import m2rnn` fills it in when PEFT is already
imported, and building a model does where PEFT is installed (importing it then), so the import order does not
matter. A model loaded from a Hub folder without this package needs `target_modules=list(DEFAULT_LORA_TARGET_MODULES)`.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from transformers import DataCollatorWithFlattening

from .configuration_m2rnn import M2RNNConfig

# ---------------------------------------------------------------------------------------------------------------
# PEFT target names
# ---------------------------------------------------------------------------------------------------------------
LORA_TARGET_MODULES: dict[str, tuple[str, ...]] = {
    "m2rnn": ("in_proj", "out_proj"),
    "gated_deltanet": ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj"),
    "full_attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    "moe": ("gate_proj", "up_proj", "down_proj", "shared_expert_gate"),
}
"""The `nn.Linear` modules of each block kind, by the names PEFT matches (suffixes of module names).

Every one is called as a module, so a LoRA delta on it reaches the output. `"all-linear"` selects all of them (and
not `lm_head`). Not LoRA targets: each mixer's depthwise `conv1d` (its weight goes straight into the conv kernel, so
a LoRA on it would be bypassed), and the MoE router `mlp.gate` (a bare parameter)."""

MIXER_MAIN_PROJECTIONS: dict[str, tuple[str, ...]] = {
    "full_attention": LORA_TARGET_MODULES["full_attention"],
    "m2rnn": ("in_proj", "out_proj"),
    "gated_deltanet": ("in_proj_qkv", "in_proj_z", "out_proj"),
}
"""Each mixer's main input and output projections: the default LoRA targets. The GDN gate projections `in_proj_a` /
`in_proj_b` (one output per head) are left out."""

DEFAULT_LORA_TARGET_MODULES: tuple[str, ...] = (
    "q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "in_proj_qkv", "in_proj_z", "out_proj",
)
"""What `LoraConfig()` without `target_modules` adapts on an m2rnn model: every mixer's main input and output
projections (`MIXER_MAIN_PROJECTIONS`: attention q/k/v/o, M2RNN `in_proj`/`out_proj`, GDN `in_proj_qkv`/`in_proj_z`/
`out_proj`)."""

STATE_WEIGHT_TARGET = "mixer.state_weight"
"""`LoraConfig(target_parameters=[STATE_WEIGHT_TARGET])` gives each M2RNN head's (V, V) recurrent weight W its own
rank-r delta. PEFT then wraps the whole mixer in a `ParamWrapper`; the model dispatches on the stored
`mixer_type`, not on the mixer's class, so this works, and `merge_and_unload()` folds the delta into W."""

RECURRENT_PARAMETERS: tuple[str, ...] = ("A_log", "dt_bias", "D", "conv1d.weight", "norm.weight")
"""Per-mixer parameters LoRA cannot adapt (1-D, or read directly by a kernel). Train them with
`modules_to_save=recurrent_modules_to_save(model)` (a full trainable copy of each recurrent mixer)."""


def lora_target_modules(config: M2RNNConfig) -> list[str]:
    """Every LoRA-able module name present in a model of this config (the same set `"all-linear"` finds)."""
    register_peft_defaults_if_imported()
    kinds = set(config.mixer_types)
    kinds.add("moe" if config.num_experts else "mlp")
    if config.num_experts and len(config.mlp_only_layers) > 0:
        kinds.add("mlp")
    names: list[str] = []
    for kind in ("full_attention", "m2rnn", "gated_deltanet", "mlp", "moe"):
        if kind in kinds:
            names += [name for name in LORA_TARGET_MODULES[kind] if name not in names]
    if not config.shared_expert_intermediate_size or not config.shared_expert_gated:
        names = [name for name in names if name != "shared_expert_gate"]
    return names


def default_lora_targets(mixer_types: Iterable[str] | None = None, mlp: bool = False) -> list[str]:
    """The default LoRA target names (`DEFAULT_LORA_TARGET_MODULES`, in that order), only those of `mixer_types`
    when given, then the MLP's (`gate_proj`, `up_proj`, `down_proj`, MoE experts included) with `mlp=True`."""
    kinds = MIXER_MAIN_PROJECTIONS if mixer_types is None else set(mixer_types)
    present = {name for kind in kinds for name in MIXER_MAIN_PROJECTIONS[kind]}
    names = [name for name in DEFAULT_LORA_TARGET_MODULES if name in present]
    return names + list(LORA_TARGET_MODULES["mlp"]) if mlp else names


def recurrent_modules_to_save(model: Any, mixer_types: Iterable[str] = ("m2rnn", "gated_deltanet")) -> list[str]:
    """Names of the recurrent mixers of `model` for PEFT's `modules_to_save`, so that `A_log`, `dt_bias`, `D`, W,
    the conv and the mixer norm train in full and are saved with the adapter.

    `model` is an `M2RNNForCausalLM` or an `M2RNNModel`. Names carry the `layers.<i>.` prefix because PEFT matches
    `modules_to_save` as plain suffixes (a bare "mixer" would also copy every attention layer).
    """
    register_peft_defaults_if_imported()
    mixer_types = tuple(mixer_types)
    for kind in mixer_types:
        if kind not in ("m2rnn", "gated_deltanet"):
            raise ValueError(f"recurrent_modules_to_save: mixer_types has {kind!r}; expected 'm2rnn' or 'gated_deltanet'")
    config = model.config
    prefix = f"{model.base_model_prefix}.layers" if hasattr(model, model.base_model_prefix) else "layers"
    return [f"{prefix}.{i}.mixer" for i, kind in enumerate(config.mixer_types) if kind in mixer_types]


def merge_and_unload(peft_model: Any) -> Any:
    """`peft_model.merge_and_unload()`, then merge the LoRA layers PEFT left behind inside a `target_parameters`
    wrapper, and return the plain model.

    With W adapted through `target_parameters` and the same mixer's projections through `target_modules`, PEFT
    0.21 merges W and unwraps the mixer but skips the modules under the wrapper: `in_proj`/`out_proj` stay LoRA
    layers (still correct, but their adapter weights would be saved into the "merged" checkpoint).
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = peft_model.merge_and_unload()
    while True:
        leftover = next(((n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)), None)
        if leftover is None:
            return model
        name, layer = leftover
        layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.get_base_layer())


def register_peft_defaults(model_type: str = M2RNNConfig.model_type) -> None:
    """Add our default LoRA targets to PEFT's `model_type → target_modules` mapping (imports PEFT)."""
    from peft.utils import constants

    constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.setdefault(model_type, list(DEFAULT_LORA_TARGET_MODULES))


def register_peft_defaults_if_imported() -> None:
    """`register_peft_defaults()` when PEFT is already imported; nothing otherwise (PEFT costs hundreds of modules)."""
    if "peft.utils.constants" in sys.modules:
        register_peft_defaults()


def register_peft_defaults_where_installed() -> None:
    """`register_peft_defaults()` when PEFT is installed. Runs when a model is built (`MODEL_BUILT_HOOKS`), so
    `LoraConfig()` finds our defaults whatever the import order; it imports PEFT then, once per process. A PEFT
    that fails to import only warns: building a model never fails over an optional integration."""
    if importlib.util.find_spec("peft") is None:
        return
    try:
        register_peft_defaults()
    except Exception as error:
        warnings.warn(f"m2rnn: could not register the default LoRA targets with PEFT ({error!r}); pass "
                      "LoraConfig(target_modules=...) yourself", stacklevel=2)


# ---------------------------------------------------------------------------------------------------------------
# Packed rows whose lengths repeat
# ---------------------------------------------------------------------------------------------------------------
PACKED_ROW_MULTIPLE = 256
"""Default rounding of a packed row's length: at most 255 padding tokens per row, at most ⌈max row / 256⌉ shapes."""


def pad_packed_row(batch: dict[str, Any], multiple: int, pad_token_id: int) -> dict[str, Any]:
    """Round a packed row (`DataCollatorWithFlattening` output, batch of one) up to a multiple of `multiple` tokens.

    Why: every new row length is a new shape, and on a GPU a new shape costs host time at every step: cuDNN's
    attention builds a plan (~20 ms per call on an H100) and cuBLAS picks its kernels again. With lengths rounded, the
    shapes repeat and those plans are reused. The padding is one more document (positions restart at 0, one more
    `cu_seq_lens` boundary, labels -100), so no real token attends to it or carries its state, and the loss is
    unchanged. Returns a new dict; `batch` is not modified.
    """
    if multiple < 1:
        raise ValueError(f"pad_packed_row: multiple must be >= 1, got {multiple}")
    input_ids = batch["input_ids"]
    if not torch.is_tensor(input_ids) or input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError("pad_packed_row: expects one packed row of torch tensors (input_ids of shape (1, T)), got "
                         f"{type(input_ids).__name__} {tuple(getattr(input_ids, 'shape', ()))}")
    length = input_ids.shape[1]
    padding = -length % multiple
    if padding == 0:
        return dict(batch)

    def extend(row: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
        return torch.cat([row, tail.to(device=row.device, dtype=row.dtype)[None]], dim=1)

    padded = dict(batch)
    padded["input_ids"] = extend(input_ids, torch.full((padding,), pad_token_id))
    if "labels" in batch:
        padded["labels"] = extend(batch["labels"], torch.full((padding,), -100))
    if "position_ids" in batch:
        padded["position_ids"] = extend(batch["position_ids"], torch.arange(padding))
    if "seq_idx" in batch:
        padded["seq_idx"] = extend(batch["seq_idx"], torch.full((padding,), int(batch["seq_idx"][0, -1]) + 1))
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        if key in batch:
            bounds = batch[key]
            padded[key] = torch.cat([bounds, bounds.new_tensor([length + padding])])
    for key in ("max_length_q", "max_length_k"):
        if key in batch:
            padded[key] = max(batch[key], padding)
    return padded


class PackedCollator(DataCollatorWithFlattening):
    """`DataCollatorWithFlattening` whose row length is rounded up to a multiple of `pad_to_multiple_of` tokens by
    a padding document (`pad_packed_row`): the same loss, shapes that repeat from step to step.

    `pad_to_multiple_of=None` (or 1) gives `DataCollatorWithFlattening`'s rows unchanged. The other arguments are
    `DataCollatorWithFlattening`'s; tensors only (`return_tensors="pt"`).
    """

    def __init__(self, *args: Any, pad_to_multiple_of: int | None = PACKED_ROW_MULTIPLE, pad_token_id: int = 0,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"PackedCollator: pad_to_multiple_of must be >= 1 or None, got {pad_to_multiple_of}")
        if self.return_tensors != "pt":
            raise ValueError(f"PackedCollator: return_tensors must be 'pt', got {self.return_tensors!r}")
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, Any]], return_tensors: str | None = None,
                 separator_id: int | None = None) -> dict[str, Any]:
        batch = super().__call__(features, return_tensors, separator_id)
        if not self.pad_to_multiple_of or self.pad_to_multiple_of == 1:
            return batch
        return pad_packed_row(batch, self.pad_to_multiple_of, self.pad_token_id)


# ---------------------------------------------------------------------------------------------------------------
# Local text for offline examples (tokenize it with `m2rnn.tokenization.byte_level_tokenizer`)
# ---------------------------------------------------------------------------------------------------------------
def text_documents(path: str | os.PathLike, tokenizer: Any, max_length: int = 256) -> list[dict[str, list[int]]]:
    """Documents from a local text file, one per blank-line-separated paragraph: `<s> text </s>` token ids,
    split into pieces of at most `max_length` tokens. Returns `[{"input_ids": [...]}, ...]` (a map-style dataset)."""
    if max_length < 2:
        raise ValueError(f"text_documents: max_length must be >= 2, got {max_length}")
    with open(path, encoding="utf-8") as handle:
        paragraphs = [p.strip() for p in handle.read().split("\n\n") if p.strip()]
    if not paragraphs:
        raise ValueError(f"text_documents: {os.fspath(path)!r} has no text")
    documents = []
    for paragraph in paragraphs:
        ids = [tokenizer.bos_token_id] + tokenizer(paragraph, add_special_tokens=False)["input_ids"]
        ids.append(tokenizer.eos_token_id)
        documents += [{"input_ids": ids[i : i + max_length]} for i in range(0, len(ids), max_length)]
    return [doc for doc in documents if len(doc["input_ids"]) >= 2]


__all__ = [
    "DEFAULT_LORA_TARGET_MODULES",
    "LORA_TARGET_MODULES",
    "MIXER_MAIN_PROJECTIONS",
    "PACKED_ROW_MULTIPLE",
    "PackedCollator",
    "RECURRENT_PARAMETERS",
    "STATE_WEIGHT_TARGET",
    "lora_target_modules",
    "default_lora_targets",
    "merge_and_unload",
    "pad_packed_row",
    "recurrent_modules_to_save",
    "register_peft_defaults",
    "register_peft_defaults_if_imported",
    "text_documents",
]
