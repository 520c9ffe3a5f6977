"""`m2rnn convert SRC OUT [--swap-layers 0,11] [--init fresh|transplant] [--dtype bf16] [--verify]`."""

from __future__ import annotations

import argparse
import math

from ..options import DTYPE_NAMES, argument, parse_dtype, parse_int_list


def add_convert_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add the `convert` subcommand to the `m2rnn` console script."""
    p = subparsers.add_parser(
        "convert",
        help="import a GDN-hybrid checkpoint (fla, Qwen3.5, Qwen3.5-MoE, Qwen3-Next, OLMo-hybrid, lm-engine) "
        "exactly, optionally swapping layers to M2RNN",
        description="Convert a local checkpoint folder (config.json + safetensors) into an M2RNN-family checkpoint, "
        "tensor by tensor. OUT is written through a temporary folder next to it; SRC is only read. The saved "
        "config records the source, the swapped layers and their init (`conversion`), which `m2rnn card` shows.",
    )
    p.add_argument("source", metavar="SRC", help="source checkpoint folder (a Hub model: `hf download` it first)")
    p.add_argument("output", metavar="OUT",
                   help="output folder; must not exist, or with --overwrite be one that m2rnn wrote")
    p.add_argument("--source-id", default=None, metavar="REPO_ID",
                   help="the Hub repo id SRC was downloaded from, recorded as the source in the config and model card "
                   "(default: the repo id of a Hugging Face cache snapshot, else SRC as given)")
    p.add_argument("--swap-layers", type=argument(parse_int_list, None, low=None, what="layer indices", example="0,11"),
                   default=None, metavar="I,J,...",
                   help="comma-separated GDN layer indices to replace by M2RNN, e.g. 0,11 (default: none)")
    p.add_argument("--init", choices=("fresh", "transplant"), default="fresh",
                   help="init of swapped layers: the paper's (fresh) or reusing the GDN layer's weights (transplant) "
                   "(default: %(default)s)")
    p.add_argument("--dtype", type=argument(parse_dtype), default=None, metavar="DTYPE",
                   help=f"output weight dtype, one of {', '.join(DTYPE_NAMES)} (default: the source's)")
    p.add_argument("--verify", action="store_true",
                   help="compare logits of the source (its own library) and the conversion before any swap "
                   "(default: off)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT if it exists and m2rnn wrote it (default: off)")
    p.add_argument("--max-shard-size", type=_shard_size, default=5.0, metavar="GB",
                   help="GB per safetensors shard (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of fresh M2RNN layers (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="hide every progress bar (default: shown)")
    p.set_defaults(func=run_convert)


def _shard_size(text: str) -> float:
    try:
        size = float(text)
    except ValueError:
        size = math.nan
    if not (math.isfinite(size) and size * 1e9 >= 1):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive, finite number of GB, e.g. 5 or 0.5")
    return size


def run_convert(args: argparse.Namespace) -> int:
    from .convert import convert_checkpoint
    from .io import ConversionError

    if args.init != "fresh" and not args.swap_layers:
        raise ConversionError(f"--init {args.init} sets up swapped layers: give --swap-layers too (e.g. 0,11)")
    result = convert_checkpoint(
        args.source, args.output, swap_layers=args.swap_layers, init=args.init, dtype=args.dtype,
        overwrite=args.overwrite, verify=args.verify, max_shard_size=int(args.max_shard_size * 1e9),
        seed=args.seed, progress=not args.no_progress, source_id=args.source_id,
    )
    print(f"wrote {result.output} ({len(result.files)} weight file(s); copied: {', '.join(result.side_files) or 'none'})")
    print(f"mixer_types: {result.config.mixer_types}")
    for note in result.notes:
        print(note)
    if result.max_logit_difference is not None:
        print(f"max |logit difference| = {result.max_logit_difference:.3e} (source vs converted, fp32, before any swap)")
    return 0
