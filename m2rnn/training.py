"""Fine-tuning helpers: PEFT target names per layer type, default LoRA targets registered with PEFT, the recipe for
the recurrent parameters LoRA cannot wrap, and a text loader for offline examples.

Nothing here is needed to train with `Trainer`: the model computes its causal-LM loss from `labels`, honours
`num_items_in_batch`, supports gradient checkpointing and reads padding-free batches from
`DataCollatorWithFlattening` by itself. See `docs/finetuning.md`.

PEFT is optional and never imported by `import m2rnn`. `LoraConfig()` without `target_modules` finds our defaults
in PEFT's per-model-type table (`register_peft_defaults`): `import m2rnn` fills it in when PEFT is already
imported, and so do the helpers here that come before `get_peft_model` (`lora_target_modules`,
`recurrent_modules_to_save`); otherwise pass `target_modules=list(DEFAULT_LORA_TARGET_MODULES)` or call `register_peft_defaults()`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

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
    "RECURRENT_PARAMETERS",
    "STATE_WEIGHT_TARGET",
    "lora_target_modules",
    "default_lora_targets",
    "merge_and_unload",
    "recurrent_modules_to_save",
    "register_peft_defaults",
    "register_peft_defaults_if_imported",
    "text_documents",
]
