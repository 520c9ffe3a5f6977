"""`m2rnn convert SRC OUT [--swap-layers 0,11] [--init fresh|transplant] [--dtype bf16] [--verify]`."""

from __future__ import annotations

import argparse
import sys

from .io import ConversionError


def add_convert_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add the `convert` subcommand to the `m2rnn` console script."""
    p = subparsers.add_parser(
        "convert",
        help="import a GDN-hybrid checkpoint (fla, Qwen3.5, Qwen3.5-MoE, Qwen3-Next, OLMo-hybrid, lm-engine) "
        "exactly, optionally swapping layers to M2RNN",
        description="Convert a local checkpoint folder (config.json + safetensors) into an M2RNN-family checkpoint, "
        "tensor by tensor. OUT is written through a temporary folder next to it; SRC is only read.",
    )
    p.add_argument("source", metavar="SRC", help="source checkpoint folder")
    p.add_argument("output", metavar="OUT", help="output folder (must not exist unless --overwrite)")
    p.add_argument("--swap-layers", default=None, help="comma-separated GDN layer indices to replace by M2RNN, e.g. 0,11")
    p.add_argument("--init", choices=("fresh", "transplant"), default="fresh",
                   help="init of swapped layers: the paper's (fresh) or reusing the GDN layer's weights (transplant)")
    p.add_argument("--dtype", default=None, help="output weight dtype: bf16, fp16 or fp32 (default: the source's)")
    p.add_argument("--verify", action="store_true",
                   help="compare logits of the source (its own library) and the conversion before any swap")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--max-shard-size", type=float, default=5.0, help="GB per safetensors shard (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of fresh M2RNN layers (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run_convert)


def _parse_layers(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise ConversionError(f"--swap-layers={text!r} must be comma-separated integers") from error


def run_convert(args: argparse.Namespace) -> int:
    from .convert import convert_checkpoint

    try:
        result = convert_checkpoint(
            args.source, args.output, swap_layers=_parse_layers(args.swap_layers), init=args.init, dtype=args.dtype,
            overwrite=args.overwrite, verify=args.verify, max_shard_size=int(args.max_shard_size * 1e9),
            seed=args.seed, progress=not args.no_progress,
        )
    except ConversionError as error:
        print(f"m2rnn convert: error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {result.output} ({len(result.files)} weight file(s); copied: {', '.join(result.side_files) or 'none'})")
    print(f"mixer_types: {result.config.mixer_types}")
    for note in result.notes:
        print(note)
    if result.max_logit_difference is not None:
        print(f"max |logit difference| = {result.max_logit_difference:.3e} (source vs converted, fp32, before any swap)")
    return 0
