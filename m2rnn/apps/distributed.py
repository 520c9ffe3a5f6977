"""Training checkpoints written by `accelerate`'s `save_state`, turned into the Hub folder format.

`Accelerator.save_state(folder)` writes the model as one `model.safetensors` (one process, DDP) or, under FSDP2 with
`fsdp_state_dict_type: SHARDED_STATE_DICT`, as a `torch.distributed.checkpoint` folder `pytorch_model_fsdp_0/` in
which every process wrote its own shards (no process ever holds the whole model). `examples/finetune.py` adds
`config.json` and the tokenizer beside it. `consolidate_checkpoint` reads either form on one CPU process and saves
the folder that `AutoModelForCausalLM.from_pretrained` loads, with the package or with `trust_remote_code=True`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..configuration_m2rnn import M2RNNConfig
from ..modeling_m2rnn import M2RNNForCausalLM
from .output import staged_output

SHARDED_MODEL_FOLDER = "pytorch_model_fsdp_0"  # accelerate's name for the first model's sharded state
SHARDED_MODEL_KEY = "model"  # accelerate saves {"model": state_dict}


def load_checkpoint_model(checkpoint: str | os.PathLike) -> M2RNNForCausalLM:
    """The model of an `accelerate` training checkpoint (sharded FSDP2 or `model.safetensors`), on the CPU."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint}: no config.json (not a training checkpoint of examples/finetune.py)")
    model = M2RNNForCausalLM(M2RNNConfig.from_pretrained(checkpoint))
    if (checkpoint / SHARDED_MODEL_FOLDER).is_dir():
        _load_sharded(model, checkpoint / SHARDED_MODEL_FOLDER)
    elif (checkpoint / "model.safetensors").is_file():
        from safetensors.torch import load_file

        weights = load_file(checkpoint / "model.safetensors")
        missing, unexpected = model.load_state_dict(weights, strict=False)
        _check_names(checkpoint / "model.safetensors", model, set(missing), set(unexpected))
    else:
        raise FileNotFoundError(f"{checkpoint}: neither {SHARDED_MODEL_FOLDER}/ nor model.safetensors")
    model.tie_weights()
    return model.eval()


def consolidate_checkpoint(
    checkpoint: str | os.PathLike, output_dir: str | os.PathLike, overwrite: bool = False, option: str = "--output-dir"
) -> Path:
    """Save the model (and tokenizer, when present) of a training checkpoint as a Hub folder in `output_dir`:
    safetensors weights, config, the flat code files and `auto_map` (written through the one output-safety rule)."""
    model = load_checkpoint_model(checkpoint)
    tokenizer = None
    if (Path(checkpoint) / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    with staged_output(output_dir, [checkpoint], overwrite, option=option) as staging:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    return Path(output_dir)


def _load_sharded(model: M2RNNForCausalLM, folder: Path) -> None:
    import torch.distributed.checkpoint as dcp

    stored = {
        name.removeprefix(f"{SHARDED_MODEL_KEY}.")
        for name in dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
    }
    expected = model.state_dict()
    missing = {name for name in expected if name not in stored}
    _check_names(folder, model, missing, stored - set(expected))
    state = {name: tensor for name, tensor in expected.items() if name in stored}
    with torch.no_grad():
        dcp.load({SHARDED_MODEL_KEY: state}, storage_reader=dcp.FileSystemReader(folder), no_dist=True)


def _check_names(source: Path, model: M2RNNForCausalLM, missing: set[str], unexpected: set[str]) -> None:
    """Refuse a checkpoint whose tensors do not match the config (a tied `lm_head.weight` may be absent)."""
    if model.config.tie_word_embeddings:
        missing -= {"lm_head.weight"}
    if missing or unexpected:
        raise ValueError(
            f"{source}: weights do not match config.json: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )


__all__ = ["consolidate_checkpoint", "load_checkpoint_model"]
