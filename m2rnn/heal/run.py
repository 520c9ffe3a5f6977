"""Heal checkpoint folders end to end: load teacher and student, tokenize the text, heal, write the output folder.

The output folder (written through a temporary folder and renamed into place) holds the healed model
(`save_pretrained`), the tokenizer, results.json, results.md and loss_curves.png.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..modeling_m2rnn import M2RNNForCausalLM
from ..utils import staged_folder
from .data import HealError, TextSource, load_text_blocks
from .healing import HealResult, HealSettings, heal, swapped_layers
from .report import write_results

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise HealError(f"dtype={name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


def _model_type(folder: str | os.PathLike, role: str) -> str | None:
    config = Path(folder) / "config.json"
    if not config.is_file():
        raise HealError(f"{role} {str(folder)!r} is not a model folder (no config.json)")
    return json.loads(config.read_text()).get("model_type")


def load_teacher(folder: str | os.PathLike, dtype: torch.dtype = torch.float32) -> M2RNNForCausalLM:
    """An M2RNN-family folder as it is, or any GDN-hybrid checkpoint `m2rnn convert` reads, imported in memory
    (exact, nothing written), so the original checkpoint can be the teacher directly."""
    from transformers import AutoModelForCausalLM

    if _model_type(folder, "teacher") == "m2rnn":
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    from ..conversion import ConversionError, import_checkpoint

    try:
        return import_checkpoint(folder, dtype)
    except ConversionError as error:
        raise HealError(f"teacher: {error}") from error


def load_student(folder: str | os.PathLike, dtype: torch.dtype = torch.float32) -> M2RNNForCausalLM:
    """A swapped M2RNN-family folder (as written by `m2rnn convert --swap-layers`)."""
    from transformers import AutoModelForCausalLM

    model_type = _model_type(folder, "student")
    if model_type != "m2rnn":
        raise HealError(f"student {str(folder)!r} has model_type={model_type!r}; expected 'm2rnn' (m2rnn convert)")
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)


def resolve_tokenizer(explicit: str | None, model_folders: Sequence[str | os.PathLike], vocab_size: int) -> Any:
    """`explicit` (a folder or hub name) if given, else the first model folder that holds tokenizer files."""
    from transformers import AutoTokenizer

    source = explicit
    if source is None:
        source = next(
            (str(f) for f in model_folders if any((Path(f) / name).is_file() for name in TOKENIZER_FILES)), None
        )
        if source is None:
            raise HealError(
                f"no tokenizer files in {[str(f) for f in model_folders]}; pass --tokenizer (a folder or hub name)"
            )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise HealError(f"tokenizer {source!r} could not be loaded: {error}") from error
    if len(tokenizer) > vocab_size:
        raise HealError(f"tokenizer {source!r} has {len(tokenizer)} tokens but the model's vocab_size={vocab_size}")
    return tokenizer


def heal_checkpoint(
    teacher: str | os.PathLike,
    output: str | os.PathLike,
    text: TextSource,
    *,
    student: str | os.PathLike | None = None,
    swap_layers: Sequence[int] | None = None,
    init: str = "fresh",
    tokenizer: str | None = None,
    settings: HealSettings | None = None,
    block_size: int = 256,
    eval_fraction: float = 0.1,
    dtype: str = "float32",
    device: str | None = None,
    overwrite: bool = False,
) -> HealResult:
    """Heal `student` (a swapped folder) or the teacher with `swap_layers` swapped here (`init` as in
    `m2rnn.conversion.swap_layers`) against `teacher`, on `text`, and write the healed model to `output`."""
    settings = settings or HealSettings()
    output = Path(output)
    if output.exists() and not overwrite:
        raise HealError(f"output {str(output)!r} exists; pass overwrite (--overwrite) to replace it")
    if (student is None) == (swap_layers is None):
        raise HealError("give exactly one of student (--student, a swapped folder) and swap_layers (--swap-layers)")
    if swap_layers is not None and settings.layers is not None:
        raise HealError(
            "layers (--layers) and swap_layers (--swap-layers) exclude each other: the swapped layers are healed"
        )
    torch_dtype = _dtype(dtype)
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    teacher_model = load_teacher(teacher, torch_dtype)
    if student is not None:
        student_model = load_student(student, torch_dtype)
    else:
        from ..conversion import ConversionError
        from ..conversion import swap_layers as swap

        try:
            student_model = swap(copy.deepcopy(teacher_model), list(swap_layers), init=init, seed=settings.seed)
        except ConversionError as error:
            raise HealError(str(error)) from error
    swapped_layers(teacher_model.config, student_model.config, settings.layers)  # fail before reading any text
    folders = [student, teacher] if student is not None else [teacher]
    tokenizer_model = resolve_tokenizer(tokenizer, folders, teacher_model.config.vocab_size)
    blocks = load_text_blocks(text, tokenizer_model, block_size, eval_fraction)

    healed, result = heal(teacher_model.to(target), student_model.to(target), blocks, settings)
    extra = {
        "teacher": str(teacher),
        "student": str(student) if student is not None else f"teacher with layers {list(swap_layers)} swapped ({init})",
        "text": text.dataset or [str(f) for f in text.files],
    }
    with staged_folder(output) as folder:
        healed.save_pretrained(folder)
        tokenizer_model.save_pretrained(folder)
        write_results(folder, result, extra)
    return result
