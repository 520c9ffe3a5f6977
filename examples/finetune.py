"""Fine-tune an M2RNN model with a plain loop on `accelerate`: one script for one CPU, one GPU, DDP or FSDP2.

    python examples/finetune.py --cpu                                     # one process
    accelerate launch --config_file examples/accelerate/ddp.yaml examples/finetune.py     # gloo on a CPU machine
    accelerate launch --config_file examples/accelerate/fsdp2.yaml examples/finetune.py
    torchrun --standalone --nproc_per_node 2 examples/finetune.py --cpu --check-replicas   # DDP on CPU (gloo)
    python examples/finetune.py --cpu --save-every 10 --checkpoint-dir runs/ckpt      # sharded under FSDP2
    python examples/finetune.py --cpu --resume-from runs/ckpt/step-10                  # continue where it stopped
    python examples/finetune.py --consolidate runs/ckpt/step-20 --output-dir runs/consolidated   # Hub folder

Batches are packed (`DataCollatorWithFlattening`): every layer restarts at each document boundary. Each packed row
is rounded up to a multiple of `--pad-to-multiple-of` tokens (256) by a padding document, so that on a GPU the
shapes repeat and attention/matmul plans are reused instead of rebuilt on the host at every step. The
loss is token-exact under gradient accumulation and data parallelism: each optimizer step counts its targets over
all micro-batches and all processes (`num_items_in_batch`), as `Trainer` does. Without `--model` it trains the
tiny preset from scratch on `examples/data/tiny_corpus.txt` with the offline byte-level tokenizer; `--preset` trains a
named configuration from scratch, and `--random-tokens` replaces the text by random documents (for benchmarks).
`--save-every` writes `accelerate` checkpoints (model, optimizer, RNG; sharded under FSDP2 with
`fsdp_state_dict_type: SHARDED_STATE_DICT`) that `--resume-from` continues exactly and `--consolidate` turns into a
Hub folder. `--fused-ce` computes the loss with liger-kernel's fused linear cross-entropy (CUDA).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorWithFlattening

from m2rnn import M2RNNConfig, M2RNNForCausalLM
from m2rnn.apps.distributed import consolidate_checkpoint
from m2rnn.losses import apply_liger_kernel_to_m2rnn
from m2rnn.tokenization import BYTE_VOCAB_SIZE, byte_level_tokenizer
from m2rnn.training import PACKED_ROW_MULTIPLE, pad_packed_row, text_documents
from m2rnn.apps.output import OutputError, check_output, staged_folder, staged_output, written_by_m2rnn

STATE_FILE = "finetune_state.json"  # the step a checkpoint was saved after

DATA = Path(__file__).parent / "data" / "tiny_corpus.txt"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="checkpoint folder or Hub id; default: the tiny preset from scratch")
    source.add_argument("--preset", help="train this configuration from scratch (M2RNNConfig.preset_names())")
    parser.add_argument("--layers", type=int, help="with --preset: keep only the first LAYERS decoder layers")
    parser.add_argument("--data", default=str(DATA), help="UTF-8 text file, documents separated by blank lines")
    parser.add_argument("--random-tokens", type=int, metavar="DOCS", help="train on DOCS random documents of "
                        "--max-length/2 to --max-length tokens instead of --data (benchmarks; no tokenizer needed)")
    parser.add_argument("--no-packing", action="store_true", help="pad documents into rows instead of packing them "
                        "into one row (the loss is the same: packed rows keep the document boundaries)")
    parser.add_argument("--pad-to-multiple-of", type=int, default=PACKED_ROW_MULTIPLE, metavar="N",
                        help="round each row's length up to a multiple of N tokens (padding is masked out of the "
                        "loss); 1 keeps exact lengths. Repeating shapes save host time on a GPU")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute each decoder layer in "
                        "the backward (or set fsdp_activation_checkpointing in the FSDP2 config)")
    parser.add_argument("--fused-ce", action="store_true", help="liger-kernel's fused linear cross-entropy: the "
                        "logits never materialise (needs liger-kernel and a GPU)")
    parser.add_argument("--output-dir", default="runs/finetune", help="where the trained model is written")
    parser.add_argument("--overwrite", action="store_true", help="replace an --output-dir this script wrote before")
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4, help="documents per micro-batch and process")
    parser.add_argument("--accumulation", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per document piece")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu", action="store_true", help="run on CPU even if a GPU is present (gloo for DDP); "
                        "implied on a machine without a GPU")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (default: the launcher's config)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process on CPU")
    parser.add_argument("--check-replicas", action="store_true", help="after training, check (DDP) that every "
                        "process holds the same weights")
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--save-every", type=int, metavar="STEPS", help="write a training checkpoint every STEPS "
                        "optimizer steps into --checkpoint-dir (step-N folders)")
    parser.add_argument("--checkpoint-dir", help="where --save-every writes; default: OUTPUT_DIR-checkpoints")
    parser.add_argument("--resume-from", metavar="CHECKPOINT", help="continue from a step-N folder of --save-every")
    parser.add_argument("--consolidate", metavar="CHECKPOINT", help="no training: save the model of a step-N "
                        "folder (sharded or not) as a Hub folder in --output-dir, then exit")
    parser.add_argument("--report", metavar="JSON", help="write losses, tokens/s and peak GPU memory to this file")
    args = parser.parse_args(argv)
    for key in ("max_steps", "batch_size", "accumulation", "max_length", "threads", "save_every", "layers",
                "random_tokens", "pad_to_multiple_of"):
        value = getattr(args, key)
        if value is not None and value < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {value}")
    if args.layers is not None and args.preset is None:
        parser.error("--layers needs --preset")
    if args.checkpoint_dir is None:
        args.checkpoint_dir = f"{args.output_dir.rstrip('/')}-checkpoints"
    return args


def load_model_and_tokenizer(args: argparse.Namespace) -> tuple[M2RNNForCausalLM, Any]:
    """The model to train and its tokenizer (None with --random-tokens and a preset: random ids need none)."""
    if args.model is not None:
        return AutoModelForCausalLM.from_pretrained(args.model), AutoTokenizer.from_pretrained(args.model)
    if args.preset is None:
        config = M2RNNConfig.from_preset(
            "tiny", vocab_size=BYTE_VOCAB_SIZE, pad_token_id=0, bos_token_id=1, eos_token_id=2
        )
        return M2RNNForCausalLM(config), byte_level_tokenizer()
    config = M2RNNConfig.from_preset(args.preset)
    if args.layers is not None:
        config = M2RNNConfig.from_preset(
            args.preset, num_hidden_layers=args.layers, mixer_types=config.mixer_types[: args.layers],
            mlp_only_layers=[i for i in config.mlp_only_layers or [] if i < args.layers],
        )
    tokenizer = None if args.random_tokens else byte_level_tokenizer()
    return M2RNNForCausalLM(config), tokenizer


def random_documents(count: int, max_length: int, vocab_size: int, seed: int) -> list[dict[str, list[int]]]:
    """`count` documents of uniformly random ids (above the special ids) and lengths in [max_length/2, max_length]."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(2, max_length // 2), max_length + 1, (count,), generator=generator)
    return [{"input_ids": torch.randint(4, vocab_size, (int(n),), generator=generator).tolist()} for n in lengths]


def pad_documents(pad_token_id: int, multiple: int = 1) -> Any:
    """A collator that right-pads documents into rows (labels -100 on padding), the unpacked batch layout; the row
    width is the longest document rounded up to a multiple of `multiple`."""

    def collate(documents: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(document["input_ids"]) for document in documents)
        width += -width % multiple
        input_ids = torch.full((len(documents), width), pad_token_id)
        attention_mask = torch.zeros((len(documents), width), dtype=torch.long)
        for row, document in enumerate(documents):
            input_ids[row, : len(document["input_ids"])] = torch.tensor(document["input_ids"])
            attention_mask[row, : len(document["input_ids"])] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "labels": input_ids.masked_fill(attention_mask == 0, -100)}

    return collate


def count_targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Targets the causal-LM loss scores in one micro-batch (labels shift by one inside the model)."""
    return (batch["labels"][..., 1:] != -100).sum()


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Input tokens of one micro-batch (padding left out)."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.consolidate:
        consolidate_checkpoint(args.consolidate, args.output_dir, args.overwrite)
        print(f"consolidated {args.consolidate} into {args.output_dir}")
        return {"consolidated": args.output_dir}
    inputs = [args.model, args.data, args.resume_from]
    if not args.no_save:  # every process refuses a bad --output-dir before training, so none waits for another
        check_output(args.output_dir, inputs, args.overwrite, option="--output-dir")
    if args.save_every and not written_by_m2rnn(args.checkpoint_dir):  # a folder of ours gets more step-N folders
        check_output(args.checkpoint_dir, inputs, option="--checkpoint-dir")
    set_seed(args.seed)  # the same initial weights on every process
    model, tokenizer = load_model_and_tokenizer(args)
    if args.fused_ce:
        apply_liger_kernel_to_m2rnn(model)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    # accumulation is done by hand below: accelerate's own would divide the token-exact loss a second time
    # without a GPU, a launcher's MULTI_GPU config would give each process its own single-process state (every
    # process the main one, each training alone and writing the output); on CPU the processes join over gloo.
    # MoE models need no find_unused_parameters: experts that get no token still join the graph while training
    accelerator = Accelerator(cpu=args.cpu or not torch.cuda.is_available(), mixed_precision="bf16" if args.bf16 else None)
    if accelerator.device.type == "cpu":
        torch.set_num_threads(args.threads)
    model.config.use_cache = False
    if args.random_tokens:
        documents = random_documents(args.random_tokens, args.max_length, model.config.vocab_size, args.seed)
    else:
        documents = text_documents(args.data, tokenizer, max_length=args.max_length)
    pad_token_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0  # any id: masked out
    collator = (pad_documents(pad_token_id, args.pad_to_multiple_of) if args.no_packing
                else DataCollatorWithFlattening(return_flash_attn_kwargs=True))
    loader = DataLoader(
        documents, batch_size=args.batch_size, shuffle=True, drop_last=True, collate_fn=collator,
        generator=torch.Generator().manual_seed(args.seed),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if accelerator.is_main_process and args.save_every and not Path(args.checkpoint_dir).exists():
        with staged_folder(args.checkpoint_dir):  # an empty folder that carries our output marker
            pass

    micro_batches = _endless(loader)
    first_step = 0
    if args.resume_from:
        accelerator.load_state(args.resume_from)
        first_step = json.loads((Path(args.resume_from) / STATE_FILE).read_text())["step"]
        for _ in range(first_step * args.accumulation):  # the same data order as a run that never stopped
            next(micro_batches)
        if accelerator.is_main_process:
            print(f"resumed from {args.resume_from} after step {first_step}")

    losses: list[float] = []
    timed_tokens, timed_seconds = 0, 0.0
    model.train()
    for step in range(first_step, args.max_steps):
        started = time.perf_counter()
        group = [next(micro_batches) for _ in range(args.accumulation)]
        step_tokens = sum(count_tokens(batch) for batch in group)
        if not args.no_packing:  # counted first: the padding document is not part of the data
            group = [pad_packed_row(batch, args.pad_to_multiple_of, pad_token_id) for batch in group]
        local_targets = sum(count_targets(batch) for batch in group).to(accelerator.device)
        # one collective for both counts: every process's targets (the loss divisor) and tokens (the throughput)
        counts = accelerator.gather(torch.stack([local_targets, torch.tensor(step_tokens, device=accelerator.device)]))
        total_targets, global_tokens = counts[0::2].sum(), counts[1::2].sum()
        step_loss = 0.0
        for i, batch in enumerate(group):
            # gradients are all-reduced once per step, on the last micro-batch
            with contextlib.nullcontext() if i == len(group) - 1 else accelerator.no_sync(model):
                # sum over my targets / all targets of the step; DDP averages gradients over processes, so
                # multiply back by the process count to get the exact token mean of the global batch
                loss = model(**batch, num_items_in_batch=total_targets).loss * accelerator.num_processes
                accelerator.backward(loss)
            step_loss += loss.detach() / accelerator.num_processes
        optimizer.step()
        optimizer.zero_grad()
        losses.append(accelerator.reduce(step_loss, reduction="sum").item())  # synchronises the device
        if step - first_step >= 2:  # the first steps compile kernels and warm the allocator
            timed_seconds += time.perf_counter() - started
            timed_tokens += int(global_tokens)  # after the loss's .item(): no extra synchronisation
        if accelerator.is_main_process and (step % 5 == 0 or step == args.max_steps - 1):
            print(f"step {step + 1:3d}/{args.max_steps}  loss {losses[-1]:.4f}  ppl {math.exp(min(losses[-1], 20)):.1f}")
        if args.save_every and (step + 1) % args.save_every == 0:
            save_checkpoint(accelerator, model, tokenizer, Path(args.checkpoint_dir) / f"step-{step + 1}", step + 1,
                            inputs, args.overwrite)

    result: dict[str, Any] = {"losses": losses, "processes": accelerator.num_processes, "first_step": first_step}
    if timed_seconds:
        result["timed_tokens"] = timed_tokens  # documents' tokens of the timed steps on all processes, padding left out
        result["tokens_per_second"] = timed_tokens / timed_seconds
    if accelerator.device.type == "cuda":
        peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30], device=accelerator.device)
        result["peak_memory_gib_per_process"] = accelerator.gather(peak).tolist()
    if args.check_replicas:
        result["replicas_equal"] = replicas_equal(accelerator, model)
        if accelerator.is_main_process:
            print(f"weights identical on all {accelerator.num_processes} processes: {result['replicas_equal']}")
    if not args.no_save:
        save(accelerator, model, tokenizer, args.output_dir, inputs, args.overwrite)
    if args.report and accelerator.is_main_process:
        Path(args.report).write_text(json.dumps(result, indent=1))
    accelerator.end_training()
    return result


def _endless(loader: DataLoader):
    while True:
        yield from loader


def replicas_equal(accelerator: Accelerator, model: torch.nn.Module) -> bool:
    """Whether every process holds bit-identical weights (data-parallel replicas must stay in sync)."""
    flat = torch.cat([p.detach().float().flatten() for p in accelerator.unwrap_model(model).parameters()])
    gathered = accelerator.gather(flat.unsqueeze(0))
    return bool((gathered == gathered[0]).all().item())


def save_checkpoint(accelerator: Accelerator, model: torch.nn.Module, tokenizer: Any, folder: Path, step: int,
                    inputs: list[str | None], overwrite: bool) -> None:
    """`accelerator.save_state` (every process writes its shards under FSDP2) into a staged `step-N` folder, with
    the config, the tokenizer and the step beside it, renamed into place once every process has written."""
    with contextlib.ExitStack() as stack:
        staging = None
        if accelerator.is_main_process:
            staging = str(stack.enter_context(staged_output(folder, inputs, overwrite, option="--checkpoint-dir")))
        staging = broadcast_object_list([staging])[0]
        accelerator.save_state(staging)
        if accelerator.is_main_process:
            accelerator.unwrap_model(model).config.save_pretrained(staging)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
            (Path(staging) / STATE_FILE).write_text(json.dumps({"step": step}))
        accelerator.wait_for_everyone()  # every shard is written before the folder is renamed into place
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        print(f"checkpoint {folder}")


def save(accelerator: Accelerator, model: torch.nn.Module, tokenizer: Any, output_dir: str,
         inputs: list[str | None], overwrite: bool) -> None:
    """Full (gathered, for FSDP2) weights from the main process into a staged folder renamed into place."""
    state_dict = accelerator.get_state_dict(model)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with staged_output(output_dir, inputs, overwrite, option="--output-dir") as staging:
            accelerator.unwrap_model(model).save_pretrained(staging, state_dict=state_dict)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
        print(f"saved to {output_dir}")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    try:
        main()
    except (OutputError, FileNotFoundError, ValueError) as error:  # one line, as the m2rnn commands print it
        raise SystemExit(f"{Path(__file__).name}: error: {error}") from None
