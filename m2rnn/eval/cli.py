"""`m2rnn eval {lm-eval,longbench,niah,s3} MODEL --output-dir DIR [...]`: the evaluation command group.

Every command writes `results.json` and `results.md` (plus its plots and predictions) into a temporary folder
that replaces `--output-dir` only when the run succeeds; an existing folder is kept unless `--overwrite`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

from .common import output_folder, parse_float_list, parse_int_list

DEFAULT_S3_LENGTHS = "4,8,16,32,64,128,256,512"


def _limit(text: str) -> int | float:
    """`--limit`: a positive count (lm-eval also takes a fraction below 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--limit: {text!r} is not a number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"--limit: {text!r} must be positive")
    return int(value) if value.is_integer() else value


def _int_limit(args: argparse.Namespace, default: int | None) -> int | None:
    if args.limit is None:
        return default
    if not isinstance(args.limit, int):
        raise ValueError(f"--limit {args.limit} must be a whole number for `m2rnn eval {args.eval_command}`")
    return args.limit


def _add_common(parser: argparse.ArgumentParser, limit_help: str, batch_size: bool = True) -> None:
    parser.add_argument("model", help="a local checkpoint folder or a Hub model id (any transformers causal LM)")
    parser.add_argument("--output-dir", required=True, help="folder for results.json, results.md and plots")
    parser.add_argument("--overwrite", action="store_true", help="replace --output-dir if it exists")
    parser.add_argument("--limit", type=_limit, default=None, help=limit_help)
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="auto", help="model dtype: auto, bfloat16, float16, float32 (default: auto)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow Hub code for non-m2rnn models")
    if batch_size:
        parser.add_argument("--batch-size", type=int, default=1, help="prompts per generate call (default: 1)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_eval_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `eval` command group to the `m2rnn` console script's subparsers."""
    group = subparsers.add_parser(
        "eval", help="evaluate a causal LM: lm-eval, LongBench, needle-in-a-haystack, S3 state tracking",
        description="Evaluate an m2rnn model or any transformers causal LM. Each command writes results.json and "
        "results.md into --output-dir (refusing to replace it without --overwrite).",
    )
    commands = group.add_subparsers(dest="eval_command", metavar="BENCHMARK", required=True)

    p = commands.add_parser("lm-eval", help="lm-evaluation-harness tasks through its HF backend",
                            description="Run lm-eval tasks (lm_eval.simple_evaluate, HF backend).")
    _add_common(p, "examples per task (a fraction below 1 takes that share)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval tasks or groups")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    p.add_argument("--include-path", default=None, help="folder of extra task YAMLs (local data, offline runs)")
    p.add_argument("--max-length", type=int, default=None, help="context length lm-eval assumes (default: config)")
    p.add_argument("--apply-chat-template", action="store_true", help="wrap prompts in the tokenizer's chat template")
    p.add_argument("--log-samples", action="store_true", help="keep per-example outputs in results.json")
    p.add_argument("--seed", type=int, default=0, help="seed for few-shot sampling and torch (default: 0)")
    p.set_defaults(func=_run_lm_eval)

    p = commands.add_parser("longbench", help="LongBench v1 with the original prompts, truncation and metrics",
                            description="LongBench v1: official prompts, middle truncation to --max-length, "
                            "per-task generation lengths and metrics; per-task and average scores (×100).")
    _add_common(p, "examples per task")
    p.add_argument("--tasks", default="paper", help="comma-separated tasks or groups: paper (default: the 8 "
                   "English tasks the M2RNN paper reports), all, en, zh, single-doc-qa, multi-doc-qa, "
                   "summarization, few-shot, synthetic, code")
    p.add_argument("--data-dir", default=None, help="folder of official <task>.jsonl files or data.zip "
                   "(default: download THUDM/LongBench's data.zip from the Hub)")
    p.add_argument("--max-length", type=int, default=None, help="prompt budget in tokens (default: the model's "
                   "context window minus 500, as the original's model2maxlen)")
    p.add_argument("--chat-template", action="store_true", help="use the tokenizer's chat template (chat models; "
                   "never for trec, triviaqa, samsum, lsht, lcc, repobench-p)")
    p.set_defaults(func=_run_longbench)

    p = commands.add_parser("niah", help="RULER-style needle-in-a-haystack by context length and depth",
                            description="Synthetic needles (single, multi-key, multi-value, multi-query) in "
                            "generated haystacks; score table and a length × depth heatmap.")
    _add_common(p, "samples per (task, length, depth) cell (default: 2)")
    p.add_argument("--tasks", default="all", help="comma-separated: single_1, single_2, single_3, multikey, "
                   "multivalue, multiquery, or all (default)")
    p.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768,65536",
                   help="context lengths in tokens, e.g. 1024,2048 or 1K,2K (default: 1K…64K)")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths in [0, 1] (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed for keys, values and haystacks (default: 0)")
    p.set_defaults(func=_run_niah)

    p = commands.add_parser("s3", help="S3 state-tracking accuracy by sequence length",
                            description="Accuracy of a model trained on S3 running products (token ids 0-5 are "
                            "the group elements) by sequence length: table, plot and JSON.")
    _add_common(p, "sequences per length (default: 256)")
    p.add_argument("--lengths", default=DEFAULT_S3_LENGTHS, help="sequence lengths (default: %(default)s)")
    p.add_argument("--train-length", type=int, default=None, help="mark the training length in the table and plot")
    p.add_argument("--seed", type=int, default=1234, help="seed of the evaluation sequences (default: %(default)s)")
    p.set_defaults(func=_run_s3)
    return group


# ---------------------------------------------------------------------------------------------------- handlers


def _in_output_folder(args: argparse.Namespace, body: Callable[[Path], str]) -> int:
    """Run `body(tmp_folder)` inside the output-folder transaction and print where the results went."""
    with output_folder(args.output_dir, args.overwrite) as folder:
        summary = body(folder)
    print(summary.rstrip())
    print(f"\nresults: {Path(args.output_dir) / 'results.md'}")
    return 0


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    from .common import load_model_and_tokenizer

    return load_model_and_tokenizer(args.model, device=args.device, dtype=args.dtype,
                                    trust_remote_code=args.trust_remote_code)


def _run_lm_eval(args: argparse.Namespace) -> int:
    from .common import write_results
    from .lm_eval_runner import parse_tasks, results_markdown, run_lm_eval

    parse_tasks(args.tasks)

    def body(folder: Path) -> str:
        results = run_lm_eval(
            args.model, args.tasks, batch_size=args.batch_size, limit=args.limit, num_fewshot=args.num_fewshot,
            include_path=args.include_path, device=args.device, dtype=args.dtype, max_length=args.max_length,
            trust_remote_code=args.trust_remote_code, apply_chat_template=args.apply_chat_template,
            log_samples=args.log_samples, seed=args.seed,
        )
        markdown = results_markdown(results)
        write_results(folder, results, markdown)
        return markdown

    return _in_output_folder(args, body)


def _run_longbench(args: argparse.Namespace) -> int:
    from .common import HFGenerator, context_window, environment, write_results
    from .longbench import resolve_tasks, results_markdown, run_longbench, write_predictions

    tasks = resolve_tasks(args.tasks)
    limit = _int_limit(args, None)

    def body(folder: Path) -> str:
        model, tokenizer = _load(args)
        max_length = args.max_length
        if max_length is None:
            window = context_window(model)
            if window is None or window <= 500:
                raise ValueError(f"--max-length: the model declares no usable context window ({window}); pass one")
            max_length = window - 500
        results = run_longbench(
            HFGenerator(model, tokenizer), tokenizer, tasks, max_length=max_length, data_dir=args.data_dir,
            limit=limit, batch_size=args.batch_size, chat_template=args.chat_template, progress=not args.no_progress,
        )
        write_predictions(folder, results.pop("predictions"))
        results.update(model=args.model, **environment())
        markdown = results_markdown(results, f"LongBench v1: {args.model}")
        write_results(folder, results, markdown)
        return markdown

    return _in_output_folder(args, body)


def _run_niah(args: argparse.Namespace) -> int:
    from . import niah
    from .common import HFGenerator, environment, write_results

    tasks = list(niah.TASKS) if args.tasks == "all" else [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in niah.TASKS]
    if unknown or not tasks:
        raise ValueError(f"--tasks: unknown needle task(s) {unknown}; tasks: {', '.join(niah.TASKS)} or all")
    lengths = parse_int_list(args.lengths, "--lengths")
    depths = parse_float_list(args.depths, "--depths")
    samples = _int_limit(args, 2)

    def body(folder: Path) -> str:
        model, tokenizer = _load(args)
        results = niah.run_niah(
            HFGenerator(model, tokenizer), tokenizer, tasks=tasks, lengths=lengths, depths=depths, samples=samples,
            batch_size=args.batch_size, seed=args.seed, progress=not args.no_progress,
        )
        results.update(model=args.model, **environment())
        markdown = niah.results_markdown(results, f"Needle in a haystack: {args.model}")
        niah.plot_heatmap(results, folder / "niah_heatmap.png", f"Needle in a haystack: {Path(args.model).name}")
        write_results(folder, results, markdown + "\n![heatmap](niah_heatmap.png)\n")
        return markdown

    return _in_output_folder(args, body)


def _run_s3(args: argparse.Namespace) -> int:
    from . import s3
    from .common import environment, write_results

    lengths = parse_int_list(args.lengths, "--lengths")
    num_samples = _int_limit(args, 256)

    def body(folder: Path) -> str:
        model, _ = _load_s3_model(args)
        results = s3.evaluate_s3(model, lengths, num_samples=num_samples, seed=args.seed,
                                 batch_size=max(1, args.batch_size), progress=not args.no_progress)
        name = Path(args.model).name or args.model
        by_model = {name: results}
        markdown = f"# S3 state tracking: {args.model}\n\n" + s3.results_table(by_model, args.train_length)
        s3.plot_s3(by_model, folder / "s3_accuracy.png", train_length=args.train_length)
        payload = {"results": {name: {str(n): r for n, r in results.items()}}, "model": args.model,
                   "num_samples": num_samples, "seed": args.seed, "train_length": args.train_length, **environment()}
        write_results(folder, payload, markdown + "\n\n![accuracy](s3_accuracy.png)\n")
        return markdown

    return _in_output_folder(args, body)


def _load_s3_model(args: argparse.Namespace) -> tuple[Any, None]:
    """S3 models need no tokenizer (token ids are group elements), so only the model is loaded."""
    import m2rnn  # noqa: F401
    from transformers import AutoModelForCausalLM

    from .common import resolve_device, resolve_dtype

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=resolve_dtype(args.dtype),
                                                 trust_remote_code=args.trust_remote_code)
    return model.to(resolve_device(args.device)).eval(), None
