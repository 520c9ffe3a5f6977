"""Fine-tune an M2RNN model with a plain loop on `accelerate`: one script for one CPU, one GPU, DDP or FSDP2.

    python examples/finetune.py --cpu                                     # one process
    accelerate launch --config_file examples/accelerate/ddp.yaml examples/finetune.py     # gloo on a CPU machine
    accelerate launch --config_file examples/accelerate/fsdp2.yaml examples/finetune.py
    torchrun --nproc_per_node 2 examples/finetune.py --cpu --check-replicas   # DDP on CPU (gloo)

Batches are padding-free (`DataCollatorWithFlattening`): every layer restarts at each document boundary. The
loss is token-exact under gradient accumulation and data parallelism: each optimizer step counts its targets over
all micro-batches and all processes (`num_items_in_batch`), as `Trainer` does. Without `--model` it trains the
tiny preset from scratch on `examples/data/tiny_corpus.txt` with the offline byte-level tokenizer.
"""

from __future__ import annotations

import argparse
import contextlib
import math
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorWithFlattening

from m2rnn import M2RNNConfig, M2RNNForCausalLM
from m2rnn.tokenization import BYTE_VOCAB_SIZE, byte_level_tokenizer
from m2rnn.training import text_documents
from m2rnn.apps.output import OutputError, check_output, staged_output

DATA = Path(__file__).parent / "data" / "tiny_corpus.txt"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint folder or Hub id; default: the tiny preset from scratch")
    parser.add_argument("--data", default=str(DATA), help="UTF-8 text file, documents separated by blank lines")
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
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process on CPU")
    parser.add_argument("--check-replicas", action="store_true", help="after training, check (DDP) that every "
                        "process holds the same weights")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    for key in ("max_steps", "batch_size", "accumulation", "max_length", "threads"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    return args


def load_model_and_tokenizer(model_name: str | None) -> tuple[M2RNNForCausalLM, Any]:
    if model_name is None:
        config = M2RNNConfig.from_preset(
            "tiny", vocab_size=BYTE_VOCAB_SIZE, pad_token_id=0, bos_token_id=1, eos_token_id=2
        )
        return M2RNNForCausalLM(config), byte_level_tokenizer()
    return AutoModelForCausalLM.from_pretrained(model_name), AutoTokenizer.from_pretrained(model_name)


def count_targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Targets the causal-LM loss scores in one micro-batch (labels shift by one inside the model)."""
    return (batch["labels"][..., 1:] != -100).sum()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    inputs = [args.model, args.data]
    if not args.no_save:  # every process refuses a bad --output-dir before training, so none waits for another
        check_output(args.output_dir, inputs, args.overwrite, option="--output-dir")
    set_seed(args.seed)  # the same initial weights on every process
    model, tokenizer = load_model_and_tokenizer(args.model)
    # MoE experts that receive no token on one process get no gradient there: DDP must look for them, or its
    # all-reduces go out of step across processes (replicas then drift apart silently or hang)
    ddp = DistributedDataParallelKwargs(find_unused_parameters=model.config.num_experts > 0)
    # accumulation is done by hand below: accelerate's own would divide the token-exact loss a second time
    # without a GPU, a launcher's MULTI_GPU config would give each process its own single-process state (every
    # process the main one, each training alone and writing the output); on CPU the processes join over gloo
    accelerator = Accelerator(cpu=args.cpu or not torch.cuda.is_available(), kwargs_handlers=[ddp])
    if accelerator.device.type == "cpu":
        torch.set_num_threads(args.threads)
    model.config.use_cache = False
    documents = text_documents(args.data, tokenizer, max_length=args.max_length)
    loader = DataLoader(
        documents, batch_size=args.batch_size, shuffle=True, drop_last=True,
        collate_fn=DataCollatorWithFlattening(return_flash_attn_kwargs=True),
        generator=torch.Generator().manual_seed(args.seed),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    losses: list[float] = []
    micro_batches = _endless(loader)
    model.train()
    for step in range(args.max_steps):
        group = [next(micro_batches) for _ in range(args.accumulation)]
        local_targets = sum(count_targets(batch) for batch in group).to(accelerator.device)
        total_targets = accelerator.gather(local_targets.reshape(1)).sum()
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
        losses.append(accelerator.reduce(step_loss, reduction="sum").item())
        if accelerator.is_main_process and (step % 5 == 0 or step == args.max_steps - 1):
            print(f"step {step + 1:3d}/{args.max_steps}  loss {losses[-1]:.4f}  ppl {math.exp(min(losses[-1], 20)):.1f}")

    result: dict[str, Any] = {"losses": losses, "processes": accelerator.num_processes}
    if args.check_replicas:
        result["replicas_equal"] = replicas_equal(accelerator, model)
        if accelerator.is_main_process:
            print(f"weights identical on all {accelerator.num_processes} processes: {result['replicas_equal']}")
    if not args.no_save:
        save(accelerator, model, tokenizer, args.output_dir, inputs, args.overwrite)
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


def save(accelerator: Accelerator, model: torch.nn.Module, tokenizer: Any, output_dir: str,
         inputs: list[str | None], overwrite: bool) -> None:
    """Full (gathered, for FSDP2) weights from the main process into a staged folder renamed into place."""
    state_dict = accelerator.get_state_dict(model)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with staged_output(output_dir, inputs, overwrite, option="--output-dir") as staging:
            accelerator.unwrap_model(model).save_pretrained(staging, state_dict=state_dict)
            tokenizer.save_pretrained(staging)
        print(f"saved to {output_dir}")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    try:
        main()
    except OutputError as error:  # one line, as the m2rnn commands print it
        raise SystemExit(f"{Path(__file__).name}: error: {error}") from None
