"""The `m2rnn` console script: `demo`, `eval`, `convert`, `heal`, `card` and `push`.

Every failure ends as one line on stderr, `m2rnn COMMAND: error: MESSAGE`, with exit code 1 (2 for usage errors,
as argparse does, 130 for Ctrl-C, 143 for SIGTERM); set `M2RNN_TRACEBACK=1` to see the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Sequence


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="S3 state tracking: tiny M2RNN vs Gated DeltaNet [-1,1] up to 4x the training length, save/reload/generate",
        description="Evaluate (default: the shipped GPU-trained checkpoints; --train: retrain from scratch) a tiny "
        "M2RNN and two Gated DeltaNet [-1,1] baselines on S3 permutation composition up to 4x the training length, "
        "measured as cumulative sequence accuracy; writes results.md, results.json, s3_accuracy.png and the saved "
        "M2RNN into --output-dir.",
    )
    p.add_argument("--output-dir", default="m2rnn-demo-output", help="where results go (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output-dir that m2rnn wrote (never anything else)")
    p.add_argument("--train", action="store_true", help="retrain the models from scratch instead of loading them")
    p.add_argument("--steps", type=int, default=None,
                   help="with --train: steps of each model's schedule (default: the recipe's)")
    p.add_argument("--train-seconds", type=float, default=100.0,
                   help="with --train: at most this many seconds of training per model, 0 for no cap "
                   "(default: %(default)s)")
    p.add_argument("--eval-samples", type=int, default=None,
                   help="random sequences of the longest length to evaluate on (default: 1000, the paper's)")
    p.add_argument("--seed", type=int, default=1, help="seed for training and evaluation data (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="a seconds-long run with tiny untuned models (for tests)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.output_dir, train=args.train, steps=args.steps, seed=args.seed, quick=args.quick,
             progress=not args.no_progress, threads=args.threads, train_seconds=args.train_seconds or None,
             eval_samples=args.eval_samples, overwrite=args.overwrite)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m2rnn", description="M2RNN hybrids for Hugging Face transformers.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo(subparsers)
    from .eval.cli import add_eval_commands

    add_eval_commands(subparsers)
    from .hub import add_hub_commands

    add_hub_commands(subparsers)
    from .conversion.cli import add_convert_commands

    add_convert_commands(subparsers)
    from .heal.cli import add_heal_command

    add_heal_command(subparsers)
    return parser


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds like an error, so staged outputs delete their partial folders


def _one_line(error: BaseException) -> str:
    message = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, (KeyError, AttributeError, TypeError, IndexError, RuntimeError, ImportError)):
        message = f"{type(error).__name__}: {message}"
    return message


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if os.environ.get("M2RNN_TRACEBACK"):
        return args.func(args)
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"m2rnn {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the CLI's promise: one line, never a traceback
        print(f"m2rnn {args.command}: error: {_one_line(error)} (M2RNN_TRACEBACK=1 shows where)", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
