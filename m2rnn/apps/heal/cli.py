"""`m2rnn heal TEACHER OUT (--student DIR | --swap-layers 1,3) (--dataset NAME | --text-files F ...) [options]`."""

from __future__ import annotations

import argparse
import sys

import torch

from ..options import parse_int_list
from .data import HealError, TextSource
from .healing import DEFAULT_LORA_TARGETS, DEVICE_DEFAULTS, NEW_LAYER_MODES, STAGE2_MODES, HealSettings, device_kind

DEFAULTS = HealSettings()


def _by_device(key: str) -> str:
    """The help text's default of a setting that depends on the device."""
    return f"(default: {DEVICE_DEFAULTS['cpu'][key]} on CPU, {DEVICE_DEFAULTS['gpu'][key]} on GPU)"


def add_heal_command(subparsers: argparse._SubParsersAction) -> None:
    """Add the `heal` subcommand to the `m2rnn` console script."""
    p = subparsers.add_parser(
        "heal",
        help="train swapped-in M2RNN layers to stand in for the layers they replaced (layer matching, then "
        "distillation)",
        description="Stage 1 trains only the new M2RNN mixers to reproduce the replaced mixers' outputs on the "
        "teacher's hidden states (MSE); stage 2 distils the teacher into the whole student (KL on logits) with LoRA "
        "or full fine-tuning. Writes the healed model, tokenizer, results.json, results.md and loss_curves.png "
        "into OUT (through a temporary folder).",
    )
    p.add_argument("teacher", metavar="TEACHER",
                   help="the model before the swap: an m2rnn folder, or any checkpoint `m2rnn convert` reads")
    p.add_argument("output", metavar="OUT", help="output folder (must not exist unless --overwrite)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--student", help="the swapped model folder (e.g. from m2rnn convert --swap-layers)")
    which.add_argument("--swap-layers", help="swap these GDN layers of the teacher here instead, e.g. 1,3")
    p.add_argument("--init", choices=("fresh", "transplant"), default="fresh",
                   help="with --swap-layers: init of the new layers (default: %(default)s)")
    p.add_argument("--layers", default=None,
                   help="with --student: layers to heal (default: those whose mixer type changed to m2rnn)")

    data = p.add_argument_group("text")
    source = data.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", help="a `datasets` dataset name or local builder path")
    source.add_argument("--text-files", nargs="+", metavar="FILE", help=".txt (one document each) or .jsonl files")
    data.add_argument("--dataset-config", default=None, help="dataset configuration name (default: the dataset's default)")
    data.add_argument("--split", default="train", help="dataset split to train on (default: %(default)s)")
    data.add_argument("--eval-split", default=None,
                      help="dataset split for held-out blocks (default: the end of the training text)")
    data.add_argument("--text-column", default="text", help="text field of rows / JSON lines (default: %(default)s)")
    data.add_argument("--max-tokens", type=int, default=None,
                      help="read at most this many tokens per split (default: all)")
    data.add_argument("--block-size", type=int, default=None, help=f"tokens per block {_by_device('block_size')}")
    data.add_argument("--eval-fraction", type=float, default=0.1,
                      help="share of blocks held out (default: %(default)s)")
    data.add_argument("--max-eval-blocks", type=int, default=None,
                      help=f"held-out blocks measured at each evaluation {_by_device('max_eval_blocks')}")
    data.add_argument("--tokenizer", default=None,
                      help="tokenizer folder or hub name (default: the one saved with the student or teacher)")

    train = p.add_argument_group("training")
    train.add_argument("--stage1-steps", type=int, default=None, help=f"layer-matching steps {_by_device('stage1_steps')}")
    train.add_argument("--stage1-lr", type=float, default=DEFAULTS.stage1_lr, help="peak learning rate of stage 1 (default: %(default)s)")
    train.add_argument("--stage2", choices=STAGE2_MODES, default=DEFAULTS.stage2,
                       help="distillation with LoRA adapters, all parameters, or no stage 2 (default: %(default)s)")
    train.add_argument("--stage2-steps", type=int, default=None, help=f"distillation steps {_by_device('stage2_steps')}")
    train.add_argument("--stage2-lr", type=float, default=DEFAULTS.stage2_lr, help="peak learning rate of stage 2 (default: %(default)s)")
    train.add_argument("--temperature", type=float, default=DEFAULTS.temperature,
                       help="distillation temperature (default: %(default)s)")
    train.add_argument("--ce-weight", type=float, default=DEFAULTS.ce_weight,
                       help="weight of the LM loss added to the KL in stage 2 (default: %(default)s)")
    train.add_argument("--lora-rank", type=int, default=DEFAULTS.lora_rank, help="LoRA rank (default: %(default)s)")
    train.add_argument("--lora-alpha", type=float, default=DEFAULTS.lora_alpha, help="LoRA alpha (default: %(default)s)")
    train.add_argument("--lora-dropout", type=float, default=DEFAULTS.lora_dropout, help="LoRA dropout (default: %(default)s)")
    train.add_argument("--lora-targets", default=",".join(DEFAULT_LORA_TARGETS),
                       help="comma-separated linear layer names (default: %(default)s)")
    train.add_argument("--new-layers", choices=NEW_LAYER_MODES, default=DEFAULTS.new_layers,
                       help="with --stage2 lora: the new M2RNN layers train in full or get LoRA too "
                       "(default: %(default)s)")
    train.add_argument("--batch-size", type=int, default=None, help=f"blocks per step {_by_device('batch_size')}")
    train.add_argument("--eval-every", type=int, default=None,
                       help=f"steps between held-out evaluations {_by_device('eval_every')}")
    train.add_argument("--seed", type=int, default=DEFAULTS.seed, help="seed of the data order and new layers (default: %(default)s)")

    run = p.add_argument_group("run")
    run.add_argument("--dtype", default="float32",
                     help="weights dtype: float32/fp32, bfloat16/bf16, float16/fp16 (default: %(default)s)")
    run.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    run.add_argument("--overwrite", action="store_true",
                     help="replace OUT if m2rnn wrote it (never an input or a folder holding one)")
    run.add_argument("--no-progress", action="store_true", help="hide every progress bar (transformers' too)")
    p.set_defaults(func=run_heal)


def _layers(text: str | None, option: str) -> list[int] | None:
    return None if text is None else parse_int_list(text, option, low=None, what="layer indices", example="1,3")


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise HealError(f"--device {name!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HealError(f"--device {name!r}: CUDA is not available here; use --device cpu")
    return device


def run_heal(args: argparse.Namespace) -> int:
    from .healing import mean_layer_mse
    from .run import heal_checkpoint

    if args.threads is not None:
        if args.threads < 1:
            print(f"m2rnn heal: error: --threads {args.threads} must be at least 1", file=sys.stderr)
            return 1
        torch.set_num_threads(args.threads)
    try:
        if args.layers is not None and args.student is None:
            raise HealError("--layers goes with --student; with --swap-layers the swapped layers are healed")
        device = _device(args.device)
        settings = HealSettings.for_device(
            device, layers=_layers(args.layers, "--layers"), batch_size=args.batch_size,
            stage1_steps=args.stage1_steps, stage1_lr=args.stage1_lr,
            stage2=args.stage2, stage2_steps=args.stage2_steps, stage2_lr=args.stage2_lr,
            temperature=args.temperature, ce_weight=args.ce_weight,
            lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
            lora_targets=tuple(name.strip() for name in args.lora_targets.split(",") if name.strip()),
            new_layers=args.new_layers, eval_every=args.eval_every, max_eval_blocks=args.max_eval_blocks,
            seed=args.seed, progress=not args.no_progress,
        )
        text = TextSource(
            dataset=args.dataset, dataset_config=args.dataset_config, split=args.split, eval_split=args.eval_split,
            files=args.text_files or (), text_column=args.text_column, max_tokens=args.max_tokens,
        )
        result = heal_checkpoint(
            args.teacher, args.output, text, student=args.student,
            swap_layers=_layers(args.swap_layers, "--swap-layers"), init=args.init, tokenizer=args.tokenizer,
            settings=settings, block_size=DEVICE_DEFAULTS[device_kind(device)]["block_size"] if args.block_size is None else args.block_size,
            eval_fraction=args.eval_fraction, dtype=args.dtype, device=str(device), overwrite=args.overwrite,
        )
    except HealError as error:
        print(f"m2rnn heal: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    before, after = result.before, result.after
    print(f"healed layers {result.layers}; wrote {args.output} (model, tokenizer, results.json, results.md, "
          "loss_curves.png)")
    print(f"held-out replaced-layer MSE {mean_layer_mse(before):.4g} -> {mean_layer_mse(result.after_stage1):.4g} "
          f"(stage 1) -> {mean_layer_mse(after):.4g}")
    print(f"held-out KL(teacher || student) {before['kl']:.4g} -> {result.after_stage1['kl']:.4g} (stage 1) -> "
          f"{after['kl']:.4g}; student LM loss {before['student_lm_loss']:.4f} -> {after['student_lm_loss']:.4f} "
          f"(teacher {before['teacher_lm_loss']:.4f})")
    return 0
