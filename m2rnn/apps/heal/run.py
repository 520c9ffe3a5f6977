"""Heal checkpoint folders end to end: load teacher and student, tokenize the text, heal, write the output folder.

The output folder (written through `m2rnn.apps.output.staged_output`: a temporary folder renamed into place, never an
input, replaced only with overwrite and only when m2rnn wrote it) holds the healed model (`save_pretrained`, its
config's `conversion` recording where it came from and how it was healed), the tokenizer, results.json, results.md
and loss_curves.png.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from m2rnn.model_card import hub_repo_id
from m2rnn.modeling_m2rnn import M2RNNForCausalLM
from ..options import parse_dtype, progress_bars
from ..output import check_output, staged_output
from .data import HealError, TextBlocks, TextSource, check_hub_name, load_text_blocks
from .healing import HealResult, HealSettings, describe_plan, heal, swapped_layers
from .report import write_results

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
INIT_DESCRIPTIONS = {
    "fresh": "the paper's initialisation (N(0, 0.02) projections, out_proj scaled by 1/√(2L), W = I, D = 1)",
    "transplant": "transplanted from the replaced Gated DeltaNet layer (q/k/v, forget gate, conv, norm and out_proj "
    "copied; W = I)",
}


def _model_type(folder: str | os.PathLike, role: str) -> str | None:
    config = Path(folder) / "config.json"
    if not config.is_file():
        raise HealError(f"{role} {str(folder)!r} is not a model folder (no config.json)")
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, AttributeError) as error:
        raise HealError(f"{role} {str(config)!r} is not a JSON object ({error})") from error
    return model_type


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
    check_hub_name(source, "--tokenizer", "tokenizer folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise HealError(f"tokenizer {source!r} could not be loaded: {' '.join(str(error).split())}") from error
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
    `m2rnn.apps.conversion.swap_layers`) against `teacher`, on `text`, and write the healed model to `output`.

    `output` follows the project's output rule (`m2rnn.apps.output.staged_output`): it is checked before any work and
    never equals, contains or lies inside the teacher, the student, the text or the tokenizer. What the run will do
    and an estimate of its duration are printed to stderr before training starts."""
    settings = settings or HealSettings()
    if (student is None) == (swap_layers is None):
        raise HealError("give exactly one of student (--student, a swapped folder) and swap_layers (--swap-layers)")
    if swap_layers is not None and settings.layers is not None:
        raise HealError(
            "layers (--layers) and swap_layers (--swap-layers) exclude each other: the swapped layers are healed"
        )
    inputs = [teacher, student, tokenizer, text.dataset, *text.files]
    check_output(output, inputs, overwrite, option="OUT")  # before loading anything
    torch_dtype = parse_dtype(dtype, "--dtype")
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    with progress_bars(settings.progress):
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
        teacher_model, student_model = teacher_model.to(target), student_model.to(target)
        source = text.dataset or ", ".join(Path(f).name for f in text.files)
        for line in describe_plan(teacher_model, student_model, blocks, settings, source):
            print(f"m2rnn heal: {line}", file=sys.stderr, flush=True)

        healed, result = heal(teacher_model, student_model, blocks, settings)
        extra = {
            "teacher": str(teacher),
            "student": str(student) if student is not None else f"teacher with layers {list(swap_layers)} swapped ({init})",
            "text": text.dataset or [str(f) for f in text.files],
        }
        healed.config.conversion = provenance(teacher, teacher_model, student, student_model, swap_layers, init,
                                              text, blocks, result)
        with staged_output(output, inputs, overwrite, option="OUT") as folder:
            healed.save_pretrained(folder)
            tokenizer_model.save_pretrained(folder)
            write_results(folder, result, extra)
    return result


def provenance(
    teacher: str | os.PathLike, teacher_model: M2RNNForCausalLM, student: str | os.PathLike | None,
    student_model: M2RNNForCausalLM, swap_layers: Sequence[int] | None, init: str, text: TextSource,
    blocks: TextBlocks, result: HealResult,
) -> dict[str, Any]:
    """The healed model's `config.conversion` (the keys `m2rnn.model_card` reads): the conversion recorded by
    `m2rnn convert` in the student (or, with swap_layers, the teacher) kept, the layers swapped here and their init
    added, and `healing` saying against which teacher, with which stages and on which data. A teacher without a
    recorded source is named by its absolute path (a local folder, never mistaken for a Hub repo id)."""
    local = os.path.abspath(teacher)
    if student is not None:
        record = dict(getattr(student_model.config, "conversion", None) or {})
        record.setdefault("source", local)
        record.setdefault("swapped_layers", list(result.layers))
    else:
        record = dict(getattr(teacher_model.config, "conversion", None) or {})
        record.setdefault("source", local)
        record["swapped_layers"] = sorted({*record.get("swapped_layers", []), *swap_layers})
        record["init"] = INIT_DESCRIPTIONS.get(init, init)
    if "source_model_type" not in record:
        model_type = _model_type(teacher, "teacher")
        if model_type != "m2rnn":
            record["source_model_type"] = model_type
    data = text.dataset or [Path(f).name for f in text.files]
    if hub_repo_id(text.dataset) and not Path(text.dataset).exists() and text.dataset not in record.get("datasets", []):
        record["datasets"] = [*record.get("datasets", []), text.dataset]  # Hub datasets only: the card's metadata
    record["healing"] = {
        "teacher": str(teacher),
        "layers": list(result.layers),
        "stages": [f"{stage.name} ({len(stage.train)} steps)" for stage in result.stages] or ["none"],
        "data": f"{blocks.train.numel():,} training tokens from {_describe(data)}",
    }
    return record


def _describe(value: Any) -> str:
    return ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
