"""Shared evaluation plumbing: loading any causal LM and its tokenizer with clear errors, the one-quick-try Hub
rule, progress bars, run plans with time estimates, batched greedy generation and reports."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from ..options import parse_dtype

# (prompts, max_new_tokens, stop_at_newline) -> completions: what the LongBench and NIAH runners call.
GenerateFn = Callable[[Sequence[str], int, bool], list[str]]


# ---------------------------------------------------------------------------------------------------- models

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json",
                   "vocab.txt", "tiktoken.model")
"""Files of which a folder needs one for `AutoTokenizer` to find a tokenizer in it."""

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


class HubUnavailableError(ConnectionError):
    """Something had to come from the Hub, which is unreachable or switched off, and it is not in the cache."""


def resolve_device(device: str | None) -> torch.device:
    """`device` as given (checked: a torch device that exists here), else CUDA when available, else CPU."""
    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {device!r}: no CUDA device is available here; use --device cpu")
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"--device {device!r}: only {count} CUDA device(s) here (cuda:0 to cuda:{count - 1})")
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device!r}: MPS is not available here; use --device cpu")
    return resolved


def is_local_model(name_or_path: str, what: str = "model") -> bool:
    """True for a local model folder, False for a Hub id; a clear error for a path that is not a model folder.

    A name that can only be a path (absolute, starting with `.` or `~`, more than one `/`) and does not exist is
    refused as "no such folder" (transformers would report it as a malformed Hub id).
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() and what == "model":
            raise ValueError(f"{what} {name_or_path!r} has no config.json: not a transformers model folder")
        return True
    if path.exists():
        raise ValueError(f"{what} {name_or_path!r} is a file; give the {what}'s folder (or a Hub id)")
    if not _HUB_ID.fullmatch(name_or_path) or name_or_path.startswith(("~", ".")):
        raise FileNotFoundError(f"{what} {name_or_path!r}: no such folder (give a local folder or a Hub id org/name)")
    return False


def load_tokenizer(source: str, *, model: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer in `source` (a folder or Hub id; `model` when `--tokenizer` is not given), left padded.

    A local folder without tokenizer files is refused in one line naming the folder and `--tokenizer` (inside
    transformers it becomes a sentencepiece/tiktoken conversion error).
    """
    from transformers import AutoTokenizer

    local = is_local_model(source, "model" if source == model else "--tokenizer")
    if local and not any((Path(source).expanduser() / name).is_file() for name in TOKENIZER_FILES):
        given = "" if source == model else " (--tokenizer)"
        raise ValueError(
            f"{source!r}{given} holds no tokenizer (no tokenizer.json or tokenizer_config.json); pass --tokenizer "
            "NAME_OR_PATH, a folder or Hub id with the tokenizer the model was trained with"
        )
    with hub_access(needed=not local, what=f"the tokenizer {source!r}", hint="pass --tokenizer with a local folder"):
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        except (OSError, ValueError, ImportError) as error:
            if not local:
                raise
            raise ValueError(f"could not load the tokenizer in {source!r} ({_short(error)}); pass --tokenizer "
                             "NAME_OR_PATH with a tokenizer that loads") from None
    return prepare_tokenizer(tokenizer)


def check_vocabulary(tokenizer: Any, config: Any, model: str, tokenizer_source: str) -> None:
    """Refuse a tokenizer whose ids do not fit the model's embedding (they would fail as an index error)."""
    vocab_size = getattr(config, "vocab_size", None)
    if isinstance(vocab_size, int) and len(tokenizer) > vocab_size:
        raise ValueError(
            f"the tokenizer of {tokenizer_source!r} has {len(tokenizer)} tokens, more than the vocabulary of "
            f"{model!r} (vocab_size {vocab_size}); pass --tokenizer with the tokenizer the model was trained with"
        )


def load_config(model: str, trust_remote_code: bool = False) -> Any:
    """The model's config (local folder or Hub id), with the offline rule of `hub_access`."""
    import m2rnn  # noqa: F401  (registers "m2rnn" with the Auto classes)
    from transformers import AutoConfig

    local = is_local_model(model)
    with hub_access(needed=not local, what=f"the model {model!r}", hint="pass a local model folder"):
        return AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)


def load_model(model: str, *, device: str | None = None, dtype: str | None = "auto",
               trust_remote_code: bool = False) -> torch.nn.Module:
    """Any causal LM in eval mode on `device` (our `m2rnn` type is registered, so it needs no remote code)."""
    import m2rnn  # noqa: F401
    from transformers import AutoModelForCausalLM

    torch_dtype, torch_device = parse_dtype(dtype, "--dtype", auto=True), resolve_device(device)
    local = is_local_model(model)
    with hub_access(needed=not local, what=f"the model {model!r}", hint="pass a local model folder"):
        loaded = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    return loaded.to(torch_device).eval()


def load_checked_tokenizer(model: str, tokenizer: str | None = None, trust_remote_code: bool = False) -> Any:
    """The tokenizer for `model` (`tokenizer`, else the model's own), checked to fit the model's vocabulary.

    Only the model's config is read, so a wrong tokenizer is refused before the weights are loaded.
    """
    source = tokenizer or model
    config = load_config(model, trust_remote_code)
    loaded = load_tokenizer(source, model=model, trust_remote_code=trust_remote_code)
    check_vocabulary(loaded, config, model, source)
    return loaded


def load_model_and_tokenizer(
    model_name_or_path: str,
    *,
    tokenizer: str | None = None,
    device: str | None = None,
    dtype: str | None = "auto",
    trust_remote_code: bool = False,
) -> tuple[torch.nn.Module, Any]:
    """Load any causal LM and its tokenizer (`tokenizer`, else the model's own), checked against each other.

    The tokenizer pads on the left (for batched generation); a tokenizer without a pad token pads with EOS.
    """
    loaded_tokenizer = load_checked_tokenizer(model_name_or_path, tokenizer, trust_remote_code)
    model = load_model(model_name_or_path, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    return model, loaded_tokenizer


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Left padding, and EOS as pad token when the tokenizer has none."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token; batched generation needs one")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _short(error: BaseException) -> str:
    """A dependency's exception as one short phrase."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 160 else text[:157] + "..."


# ---------------------------------------------------------------------------------------------------- the Hub


@functools.lru_cache(maxsize=1)
def _probe_hub(endpoint: str, timeout: float = 5.0) -> str | None:
    """One HEAD request to the Hub, no retries: None when it answers, else why not (asked once per process)."""
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint, timeout=timeout)
    except Exception as error:  # noqa: BLE001 - any transport failure means the Hub cannot be used now
        return f"{endpoint} did not answer one quick try ({_short(error)})"
    return None


def hub_unavailable_reason() -> str | None:
    """Why the Hub cannot be used now (HF_HUB_OFFLINE is set, or it does not answer), or None when it can."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    return _probe_hub(constants.ENDPOINT)


@contextlib.contextmanager
def _offline_mode() -> Iterator[None]:
    """The Hub libraries' own offline mode (as HF_HUB_OFFLINE=1 sets it) for the body: cached files only.

    huggingface_hub and datasets read HF_HUB_OFFLINE once at import, so their module flags are switched.
    """
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        datasets_config.HF_HUB_OFFLINE = datasets_config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous
        datasets_config = sys.modules.get("datasets.config")  # datasets may have been imported in the body
        if datasets_config is not None:
            datasets_config.HF_HUB_OFFLINE = datasets_config.HF_DATASETS_OFFLINE = previous


def _is_download_failure(error: BaseException) -> bool:
    """An exception (or its cause) that means "not reachable and not cached", as the Hub libraries raise it."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    while error is not None:
        if isinstance(error, (ConnectionError, LocalEntryNotFoundError, OfflineModeIsEnabled)):
            return True
        if isinstance(error, OSError) and re.search(r"couldn't connect|offline mode|cached files", str(error)):
            return True  # transformers' wording for a Hub file that is neither reachable nor cached
        error = error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def hub_access(*, needed: bool, what: str, hint: str) -> Iterator[None]:
    """Run a body that may download `what` from the Hub: at most one quick try, then one clear error line.

    When `needed`, the Hub is asked once (a HEAD request of a few seconds at most). If it does not answer, or
    HF_HUB_OFFLINE is set, the body runs in offline mode: local and cached files still load, and a missing one
    fails at once (instead of after ~30 s of retries and a traceback) with a `HubUnavailableError` that says what
    was tried and how to run offline (`hint`).
    """
    reason = hub_unavailable_reason() if needed else None
    if reason is None:
        yield
        return
    with _offline_mode():
        try:
            yield
        except Exception as error:
            if isinstance(error, HubUnavailableError) or not _is_download_failure(error):
                raise
            raise HubUnavailableError(
                f"could not get {what}: {reason}, and it is not in the local cache; to run offline, {hint} "
                "(or download it once online; HF_HUB_OFFLINE=1 then uses the cache)"
            ) from None


# ---------------------------------------------------------------------------------------------------- progress


# ---------------------------------------------------------------------------------------------------- plans


def seconds_per_token(model: torch.nn.Module, prompt_tokens: int = 512, new_tokens: int = 8) -> tuple[float, float]:
    """(seconds per prompt token, seconds per generated token) of greedy generation, timed after a warm-up.

    A rough rate for announcing how long a run will take (a random prompt of `prompt_tokens` ids; the faster of
    two forward passes, since a first call at a new size often pays one-off costs).
    """
    device = next(model.parameters()).device
    vocab = max(2, min(int(getattr(model.config, "vocab_size", 2) or 2), 1000))
    prompt = torch.randint(1, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(0)).to(device)
    generation = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(prompt[:, :16], **{**generation, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
        prefill = math.inf
        for _ in range(2):
            start = time.perf_counter()
            model(prompt)
            prefill = min(prefill, time.perf_counter() - start)
        start = time.perf_counter()
        model.generate(prompt, **generation)
        generate = time.perf_counter() - start
    return prefill / prompt_tokens, max(generate - prefill, 0.0) / new_tokens


def announce(command: str, text: str) -> None:
    """One status line on stderr (results go to stdout and the output folder)."""
    print(f"m2rnn eval {command}: {text}", file=sys.stderr, flush=True)


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


# ---------------------------------------------------------------------------------------------------- outputs


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
