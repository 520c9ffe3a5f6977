"""Shared evaluation plumbing: loading any causal LM, batched greedy generation, output folders, reports."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from ..utils import staged_folder

# (prompts, max_new_tokens, stop_at_newline) -> completions: what the LongBench and NIAH runners call.
GenerateFn = Callable[[Sequence[str], int, bool], list[str]]


# ---------------------------------------------------------------------------------------------------- models


def resolve_device(device: str | None) -> torch.device:
    """`device` as given, else CUDA when available, else CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str | None) -> torch.dtype | str:
    """`"auto"`/None -> "auto"; else a torch dtype name such as bfloat16 (error names `--dtype`)."""
    if dtype in (None, "auto"):
        return "auto"
    value = getattr(torch, dtype, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"--dtype {dtype!r} is not a torch dtype (use auto, float32, bfloat16 or float16)")
    return value


def load_model_and_tokenizer(
    model_name_or_path: str,
    *,
    device: str | None = None,
    dtype: str | None = "auto",
    trust_remote_code: bool = False,
) -> tuple[torch.nn.Module, Any]:
    """Load any causal LM and its tokenizer (our `m2rnn` type is registered first, so no remote code is needed).

    The tokenizer pads on the left (for batched generation); a tokenizer without a pad token pads with EOS.
    """
    import m2rnn  # noqa: F401  (registers "m2rnn" with the Auto classes)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    prepare_tokenizer(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(
        model_name_or_path, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code
    )
    model.to(resolve_device(device)).eval()
    return model, tokenizer


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Left padding, and EOS as pad token when the tokenizer has none."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token; batched generation needs one")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def context_window(model: torch.nn.Module) -> int | None:
    """The model's declared context (`max_position_embeddings`, `n_positions` or `n_ctx`), if any."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(model.config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def newline_token_id(tokenizer: Any) -> int | None:
    """The id of the token a lone newline ends in (None when the tokenizer cannot encode one)."""
    ids = tokenizer.encode("\n", add_special_tokens=False)
    return ids[-1] if ids else None


class HFGenerator:
    """Greedy batched generation with a transformers causal LM: a `GenerateFn`.

    Prompts are tokenized with the tokenizer's special tokens, left padded, generated with the model's cache,
    and the new tokens decoded with special tokens skipped. `stop_at_newline` also stops at the newline token
    and forces at least one new token (LongBench's samsum rule).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = prepare_tokenizer(tokenizer)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], max_new_tokens: int, stop_at_newline: bool = False) -> list[str]:
        device = next(self.model.parameters()).device
        batch = self.tokenizer(list(prompts), return_tensors="pt", padding=True).to(device)
        eos = self.model.generation_config.eos_token_id
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in eos_ids:
            eos_ids.append(self.tokenizer.eos_token_id)
        extra: dict[str, Any] = {}
        if stop_at_newline:
            newline = newline_token_id(self.tokenizer)
            if newline is not None:
                eos_ids.append(newline)
            extra["min_new_tokens"] = 1
        out = self.model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
            eos_token_id=eos_ids or None, pad_token_id=self.tokenizer.pad_token_id, **extra,
        )
        new_tokens = out[:, batch["input_ids"].shape[1]:]
        return self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------------- options


def parse_int_list(text: str, option: str) -> list[int]:
    """`"1024,2048,4K"` -> [1024, 2048, 4096]; the error names `option`."""
    values = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        scale = 1024 if item[-1] in "kK" else 1
        try:
            value = int(item[:-1] if scale > 1 else item) * scale
        except ValueError:
            raise ValueError(f"{option}: {item!r} is not an integer (expected e.g. 1024,2048 or 1K,2K)") from None
        if value <= 0:
            raise ValueError(f"{option}: {item!r} must be positive")
        values.append(value)
    if not values:
        raise ValueError(f"{option}: empty list")
    return values


def parse_float_list(text: str, option: str, low: float = 0.0, high: float = 1.0) -> list[float]:
    """`"0,0.5,1"` -> [0.0, 0.5, 1.0], each within [low, high]; the error names `option`."""
    values = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"{option}: {item!r} is not a number") from None
        if not low <= value <= high:
            raise ValueError(f"{option}: {value} is outside [{low}, {high}]")
        values.append(value)
    if not values:
        raise ValueError(f"{option}: empty list")
    return values


# ---------------------------------------------------------------------------------------------------- outputs


@contextlib.contextmanager
def output_folder(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; on success it replaces `path`, on error it is removed.

    Refuses (before any work) when `path` exists and `overwrite` is False.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"--output-dir {str(path)!r} already exists; pass --overwrite to replace it")
    with staged_folder(path) as staging:
        yield staging


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats are shown with 2 decimals, None as "–"."""

    def cell(value: Any) -> str:
        if value is None:
            return "–"
        if isinstance(value, float):
            return f"{value:.2f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(folder: Path, results: dict[str, Any], markdown: str) -> None:
    """`results.json` (non-JSON values written as strings) and `results.md` into `folder`."""
    (folder / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False, default=str) + "\n")
    (folder / "results.md").write_text(markdown.rstrip() + "\n")


def environment() -> dict[str, str]:
    """Versions worth recording next to results."""
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def byte_level_tokenizer() -> Any:
    """`m2rnn.tokenization.byte_level_tokenizer` padded on the left, as batched generation needs (smoke tests)."""
    from ..tokenization import byte_level_tokenizer as build

    return build(padding_side="left")
