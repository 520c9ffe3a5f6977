"""`m2rnn eval {lm-eval,longbench,niah,s3} MODEL --output-dir DIR [...]`: the evaluation command group.

Every command writes `results.json` and `results.md` (plus its plots and predictions) into a temporary folder
that becomes `--output-dir` only when the run succeeds (`m2rnn.apps.output.staged_output`: an existing folder is
replaced only with `--overwrite` and only when m2rnn wrote it, never an input or a folder holding one). Options
are checked before anything is loaded; downloads get one quick try (see `common.hub_access`).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Callable

from ..options import parse_dtype, parse_float_list, parse_int_list

DEFAULT_S3_LENGTHS = "4,8,16,32,64,128,256,512"
NIAH_DEFAULTS = {  # (lengths, depths, samples per cell): a few minutes for a tiny model on a 2-core CPU
    "cpu": ("1K,2K", "0,0.5,1", 1),
    "gpu": ("1K,2K,4K,8K,16K,32K,64K", "0,0.25,0.5,0.75,1", 2),
}
MAX_LENGTH_TOKENS = 1 << 20  # 1M tokens: the longest --lengths value accepted by niah and s3
MAX_SAMPLES = {"niah": 1000, "s3": 100_000}  # --limit above these is refused (synthetic data never runs out)
OFFLINE_LM_EVAL = ("pass local task YAMLs with --include-path, e.g. --include-path examples/lm_eval_tasks "
                   "--tasks m2rnn_example_choice (a folder of the m2rnn repository)")
OFFLINE_LONGBENCH = ("pass --data-dir with the official <task>.jsonl files or THUDM/LongBench's data.zip "
                     "(e.g. copied from a machine that has them)")


# ---------------------------------------------------------------------------------------------------- option types


def _limit(text: str) -> int | float:
    """`--limit`: a whole count ≥ 1, or (lm-eval only) a fraction in (0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive, finite number")
    if value >= 1 and not value.is_integer():
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number (or a fraction below 1 for lm-eval)")
    return int(value) if value >= 1 else value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 or more")
    return value


def _samples(args: argparse.Namespace, default: int) -> int:
    """`--limit` as a count of generated samples for the synthetic benchmarks (capped: their data never ends)."""
    if args.limit is None:
        return default
    if not isinstance(args.limit, int):
        raise ValueError(f"--limit {args.limit}: `m2rnn eval {args.eval_command}` takes a whole number of samples")
    cap = MAX_SAMPLES[args.eval_command]
    if args.limit > cap:
        raise ValueError(f"--limit {args.limit} is refused: `m2rnn eval {args.eval_command}` generates its data, "
                         f"so at most {cap} samples are allowed")
    return args.limit


def _check_paths(**paths: str | None) -> None:
    """Refuse a local folder option that does not exist (named in the error)."""
    for option, path in paths.items():
        if path is not None and not Path(path).expanduser().exists():
            raise FileNotFoundError(f"--{option.replace('_', '-')} {path!r}: no such folder")


# ---------------------------------------------------------------------------------------------------- parsers


def _add_common(parser: argparse.ArgumentParser, limit_help: str, batch_size: int = 1,
                tokenizer: bool = True) -> None:
    parser.add_argument("model", help="a local checkpoint folder or a Hub model id (any transformers causal LM)")
    parser.add_argument("--output-dir", required=True, help="folder for results.json, results.md and plots "
                        "(required; written only when the run succeeds)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output-dir if m2rnn wrote it (never "
                        "an input or a folder holding one; default: refuse an existing folder)")
    if tokenizer:
        parser.add_argument("--tokenizer", default=None, metavar="NAME_OR_PATH",
                            help="tokenizer folder or Hub id (default: the model's own)")
    parser.add_argument("--limit", type=_limit, default=None, help=limit_help)
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="auto", help="model dtype: auto (the checkpoint's), float32/fp32, "
                        "bfloat16/bf16, float16/fp16 (default: %(default)s)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow Hub code for non-m2rnn models (default: off)")
    parser.add_argument("--batch-size", type=_positive_int, default=batch_size,
                        help="prompts per generate call (default: %(default)s)" if tokenizer else
                        "sequences per forward pass (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true",
                        help="hide every progress bar, also those of transformers and lm-eval (default: shown)")


def add_eval_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `eval` command group to the `m2rnn` console script's subparsers."""
    group = subparsers.add_parser(
        "eval", help="evaluate a causal LM: lm-eval, LongBench, needle-in-a-haystack, S3 state tracking",
        description="Evaluate an m2rnn model or any transformers causal LM. Each command writes results.json and "
        "results.md into --output-dir (refusing to replace it without --overwrite).",
    )
    commands = group.add_subparsers(dest="eval_command", metavar="BENCHMARK", required=True)

    p = commands.add_parser("lm-eval", help="lm-evaluation-harness tasks through its HF backend",
                            description="Run lm-eval tasks (lm_eval.simple_evaluate, HF backend). Offline: "
                            "--include-path examples/lm_eval_tasks --tasks m2rnn_example_choice runs a shipped "
                            "local task; Hub tasks need the network or a cache (HF_HUB_OFFLINE=1).")
    _add_common(p, "examples per task; a fraction below 1 takes that share; a count above a task's size takes "
                "all of it (default: all)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval tasks or groups (required)")
    p.add_argument("--num-fewshot", type=_non_negative_int, default=None,
                   help="few-shot examples (default: the task's)")
    p.add_argument("--include-path", default=None, help="folder of extra task YAMLs, e.g. examples/lm_eval_tasks "
                   "(local data, offline runs; default: none)")
    p.add_argument("--max-length", type=_positive_int, default=None,
                   help="context length lm-eval assumes (default: the model config's)")
    p.add_argument("--apply-chat-template", action="store_true",
                   help="wrap prompts in the tokenizer's chat template (default: off)")
    p.add_argument("--log-samples", action="store_true", help="keep per-example outputs in results.json "
                   "(default: off)")
    p.add_argument("--seed", type=int, default=0, help="seed for few-shot sampling and torch (default: %(default)s)")
    p.set_defaults(func=_run_lm_eval)

    p = commands.add_parser("longbench", help="LongBench v1 with the original prompts, truncation and metrics",
                            description="LongBench v1: official prompts, middle truncation to --max-length, "
                            "per-task generation lengths and metrics; per-task and average scores (×100). "
                            "Offline: --data-dir with the official JSONL files or data.zip.")
    _add_common(p, "examples per task; a count above a task's size takes all of it (default: all)")
    p.add_argument("--tasks", default="paper", help="comma-separated tasks or groups: paper (the 8 English tasks "
                   "the M2RNN paper reports), all, en, zh, single-doc-qa, multi-doc-qa, summarization, few-shot, "
                   "synthetic, code (default: %(default)s)")
    p.add_argument("--data-dir", default=None, help="folder of official <task>.jsonl files or data.zip "
                   "(default: download THUDM/LongBench's data.zip from the Hub)")
    p.add_argument("--max-length", type=_positive_int, default=None, help="prompt budget in tokens (default: the "
                   "model's context window minus 500, as the original's model2maxlen)")
    p.add_argument("--chat-template", action="store_true", help="use the tokenizer's chat template (chat models; "
                   "never for trec, triviaqa, samsum, lsht, lcc, repobench-p; default: off)")
    p.set_defaults(func=_run_longbench)

    cpu, gpu = NIAH_DEFAULTS["cpu"], NIAH_DEFAULTS["gpu"]
    p = commands.add_parser("niah", help="RULER-style needle-in-a-haystack by context length and depth",
                            description="Synthetic needles (single, multi-key, multi-value, multi-query) in "
                            "generated haystacks; score table and a length × depth heatmap. Defaults are small on "
                            "a CPU and the full grid on a GPU; the run prints its size and a time estimate first.")
    _add_common(p, f"samples per (task, length, depth) cell, at most {MAX_SAMPLES['niah']} "
                f"(default: {cpu[2]} on CPU, {gpu[2]} on GPU)")
    p.add_argument("--tasks", default="all", help="comma-separated: single_1, single_2, single_3, multikey, "
                   "multivalue, multiquery, or all (default: %(default)s)")
    p.add_argument("--lengths", default=None, help=f"context lengths in tokens, e.g. 1024,2048 or 1K,2K "
                   f"(default: {cpu[0]} on CPU, {gpu[0]} on GPU)")
    p.add_argument("--depths", default=None, help=f"needle depths in [0, 1] (default: {cpu[1]} on CPU, "
                   f"{gpu[1]} on GPU)")
    p.add_argument("--seed", type=int, default=0, help="seed for keys, values and haystacks (default: %(default)s)")
    p.set_defaults(func=_run_niah)

    p = commands.add_parser("s3", help="S3 state-tracking accuracy by sequence length",
                            description="Accuracy of a model trained on S3 running products (token ids 0-5 are "
                            "the group elements) by sequence length: table, plot and JSON. Needs no tokenizer.")
    _add_common(p, f"sequences per length, at most {MAX_SAMPLES['s3']} (default: 256)", batch_size=64,
                tokenizer=False)
    p.add_argument("--lengths", default=DEFAULT_S3_LENGTHS, help="sequence lengths (default: %(default)s)")
    p.add_argument("--train-length", type=_positive_int, default=None,
                   help="mark the training length in the table and plot (default: none)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the evaluation sequences (default: %(default)s)")
    p.set_defaults(func=_run_s3)
    return group


# ---------------------------------------------------------------------------------------------------- handlers


def _check_model_options(args: argparse.Namespace) -> None:
    """Device, dtype and the model (and tokenizer) path, checked before anything is loaded or written."""
    from .common import is_local_model, resolve_device

    resolve_device(args.device)
    parse_dtype(args.dtype, "--dtype", auto=True)
    is_local_model(args.model)
    if getattr(args, "tokenizer", None):
        is_local_model(args.tokenizer, "--tokenizer")


def _run(args: argparse.Namespace, inputs: list[str | None], body: Callable[[Path], str]) -> int:
    """Run `body(folder)` in a staged --output-dir (every bar silenced with --no-progress); print the summary."""
    from ..options import progress_bars
    from ..output import check_output, staged_output
    from .distributed import init_data_parallel, run_on_every_rank

    _check_model_options(args)
    inputs = [args.model, getattr(args, "tokenizer", None), *inputs]
    check_output(args.output_dir, inputs, overwrite=args.overwrite, option="--output-dir")  # on every process
    init_data_parallel()  # under accelerate launch / torchrun: samples are split across the processes
    with progress_bars(not args.no_progress):
        summary = run_on_every_rank(body, lambda: staged_output(
            args.output_dir, inputs, overwrite=args.overwrite, option="--output-dir"))
        if summary is None:  # not rank 0: rank 0 alone writes and reports
            return 0
    print(summary.rstrip())
    print(f"\nresults: {Path(args.output_dir) / 'results.md'}")
    return 0


def _model_options(args: argparse.Namespace) -> dict[str, Any]:
    return dict(device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)


def _run_lm_eval(args: argparse.Namespace) -> int:
    from .lm_eval_runner import parse_tasks, write_evaluation

    parse_tasks(args.tasks)
    _check_paths(include_path=args.include_path)
    return _run(args, [args.include_path], lambda folder: write_evaluation(
        folder, args.model, args.tasks, tokenizer=args.tokenizer, batch_size=args.batch_size, limit=args.limit,
        num_fewshot=args.num_fewshot, include_path=args.include_path, max_length=args.max_length,
        apply_chat_template=args.apply_chat_template, log_samples=args.log_samples, seed=args.seed,
        offline_hint=OFFLINE_LM_EVAL, **_model_options(args),
    ))


def _run_longbench(args: argparse.Namespace) -> int:
    from .longbench import resolve_tasks, write_evaluation

    tasks = resolve_tasks(args.tasks)
    limit = args.limit
    if limit is not None and not isinstance(limit, int):
        raise ValueError(f"--limit {limit}: `m2rnn eval longbench` takes a whole number of examples per task")
    _check_paths(data_dir=args.data_dir)
    return _run(args, [args.data_dir], lambda folder: write_evaluation(
        folder, args.model, tasks, tokenizer=args.tokenizer, data_dir=args.data_dir, limit=limit,
        max_length=args.max_length, batch_size=args.batch_size, chat_template=args.chat_template,
        progress=not args.no_progress, offline_hint=OFFLINE_LONGBENCH, **_model_options(args),
    ))


def _run_niah(args: argparse.Namespace) -> int:
    from . import niah
    from .common import resolve_device

    tasks = list(niah.TASKS) if args.tasks == "all" else [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in niah.TASKS]
    if unknown or not tasks:
        raise ValueError(f"--tasks: unknown needle task(s) {unknown}; tasks: {', '.join(niah.TASKS)} or all")
    where = "gpu" if resolve_device(args.device).type == "cuda" else "cpu"
    default_lengths, default_depths, default_samples = NIAH_DEFAULTS[where]
    lengths = parse_int_list(args.lengths or default_lengths, "--lengths", high=MAX_LENGTH_TOKENS)
    depths = parse_float_list(args.depths or default_depths, "--depths")
    samples = _samples(args, default_samples)
    return _run(args, [], lambda folder: niah.write_evaluation(
        folder, args.model, tasks, lengths, depths, samples, tokenizer=args.tokenizer, where=where,
        batch_size=args.batch_size, seed=args.seed, progress=not args.no_progress, **_model_options(args),
    ))


def _run_s3(args: argparse.Namespace) -> int:
    from . import s3

    lengths = parse_int_list(args.lengths, "--lengths", high=MAX_LENGTH_TOKENS)
    num_samples = _samples(args, 256)
    return _run(args, [], lambda folder: s3.write_evaluation(
        folder, args.model, lengths, num_samples=num_samples, seed=args.seed, batch_size=args.batch_size,
        train_length=args.train_length, progress=not args.no_progress, **_model_options(args),
    ))
