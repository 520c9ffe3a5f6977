"""Command-line values and console helpers shared by the commands: one parser per kind of option value (dtype,
comma-separated integers or numbers), the adapter that turns their errors into argparse's, `--no-progress` and a
rough duration for time estimates."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}
"""Every dtype spelling the commands accept (`--dtype`), mapped to torch's name."""


def parse_dtype(name: str, option: str | None = None, auto: bool = False) -> torch.dtype | str:
    """The torch dtype for a command-line spelling (`bf16` or `bfloat16`, `fp16`/`float16`/`half`, `fp32`/`float32`/
    `float`), case-insensitive; with `auto=True` also `"auto"`/None (returned as "auto": the checkpoint's dtype).
    A ValueError naming `option`, the value and the accepted spellings otherwise."""
    import torch

    if auto and (name is None or str(name).strip().lower() == "auto"):
        return "auto"
    canonical = DTYPE_NAMES.get(str(name).strip().lower().removeprefix("torch."))
    if canonical is None:
        prefix = f"{option}: " if option else ""
        raise ValueError(f"{prefix}dtype {name!r} is not supported; choose one of: {', '.join(DTYPE_NAMES)}"
                         + (", or auto" if auto else ""))
    return getattr(torch, canonical)


def parse_int_list(text: str, option: str | None, low: int | None = 1, high: int | None = None, what: str = "integers",
                   example: str = "1024,2048 or 1K,2K") -> list[int]:
    """`"1024,2048,4K"` -> [1024, 2048, 4096] (K = 1024), each in [low, high] (None: unbounded); the error names
    `option`."""
    prefix = f"{option}: " if option else ""
    values = []
    for item in filter(None, (part.strip() for part in str(text).split(","))):
        scale = 1024 if item[-1] in "kK" else 1
        try:
            value = int(item[:-1] if scale > 1 else item) * scale
        except ValueError:
            raise ValueError(f"{prefix}{item!r} is not an integer; expected comma-separated {what}, e.g. {example}") from None
        if low is not None and value < low:
            raise ValueError(f"{prefix}{item!r} must be at least {low}")
        if high is not None and value > high:
            raise ValueError(f"{prefix}{item!r} is more than the {high} allowed")
        values.append(value)
    if not values:
        raise ValueError(f"{prefix}empty list; expected comma-separated {what}, e.g. {example}")
    return values


def parse_float_list(text: str, option: str, low: float = 0.0, high: float = 1.0) -> list[float]:
    """`"0,0.5,1"` -> [0.0, 0.5, 1.0], each within [low, high]; the error names `option`."""
    values = []
    for item in filter(None, (part.strip() for part in str(text).split(","))):
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


def argument(parse: Callable[..., Any], *args: Any, **kwargs: Any) -> Callable[[str], Any]:
    """An argparse `type=` from one of the parsers above: its ValueError becomes a usage error (exit 2)."""

    def parse_argument(text: str) -> Any:
        try:
            return parse(text, *args, **kwargs)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse_argument


@contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """With `enabled=False` (`--no-progress`), every progress bar made inside the block stays hidden: transformers'
    and huggingface_hub's through their switches (restored afterwards), and those of libraries without one
    (datasets' loaders, lm-eval) by telling tqdm itself."""
    if enabled:
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from tqdm import std
    from transformers.utils import logging

    was_transformers, was_hub = logging.is_progress_bar_enabled(), not are_progress_bars_disabled()
    logging.disable_progress_bar()
    disable_progress_bars()
    original_init = std.tqdm.__dict__["__init__"]

    def quiet_init(self, *args, **kwargs) -> None:
        kwargs["disable"] = True
        original_init.__get__(self, type(self))(*args, **kwargs)  # a function or a partialmethod (lm-eval's patch)

    std.tqdm.__init__ = quiet_init
    try:
        yield
    finally:
        std.tqdm.__init__ = original_init
        if was_transformers:
            logging.enable_progress_bar()
        if was_hub:
            enable_progress_bars()


def format_duration(seconds: float) -> str:
    """`seconds` as a rough human duration for time estimates: "40 s", "7 min", "3.2 h"."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"
