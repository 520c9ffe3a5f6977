"""Fine-tune an M2RNN model with `transformers.Trainer` on a local text file, padding-free.

    python examples/finetune_trainer.py                          # tiny model from scratch, CPU, ~20 s
    python examples/finetune_trainer.py --model path/or/hub-id --data my.txt --max-steps 500 --bf16

Nothing model-specific is needed: the model computes the causal-LM loss from `labels` and honours
`num_items_in_batch`, so gradient accumulation is token-exact; `PackedCollator` (`DataCollatorWithFlattening` with
the row rounded up to a multiple of 256 tokens, so that shapes repeat on a GPU) packs documents into one row and
every layer (M2RNN, GDN, attention) restarts at each document boundary. Without `--model` it trains
the tiny preset on `examples/data/tiny_corpus.txt` with the offline byte-level tokenizer of `m2rnn.training`.
Under `accelerate launch` (DDP, FSDP2, DeepSpeed) the same script runs on several GPUs.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
)

from m2rnn import M2RNNConfig, M2RNNForCausalLM
from m2rnn.tokenization import BYTE_VOCAB_SIZE, byte_level_tokenizer
from m2rnn.training import PackedCollator, text_documents
from m2rnn.apps.output import OutputError, check_output, staged_output

DATA = Path(__file__).parent / "data" / "tiny_corpus.txt"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint folder or Hub id; default: the tiny preset from scratch")
    parser.add_argument("--data", default=str(DATA), help="UTF-8 text file, documents separated by blank lines")
    parser.add_argument("--output-dir", default="runs/finetune_trainer")
    parser.add_argument("--overwrite", action="store_true", help="replace an --output-dir this script wrote before")
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=64, help="tokens per document piece")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--no-packing", action="store_true", help="pad rows instead of packing documents")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (on CPU too)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (tiny models: 1 is fastest)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    inputs = [args.model, args.data]
    check_output(args.output_dir, inputs, args.overwrite, option="--output-dir")  # before training, not after
    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads)
    if args.model is None:
        torch.manual_seed(0)
        config = M2RNNConfig.from_preset(
            "tiny", vocab_size=BYTE_VOCAB_SIZE, pad_token_id=0, bos_token_id=1, eos_token_id=2
        )
        model, tokenizer = M2RNNForCausalLM(config), byte_level_tokenizer()
    else:
        model, tokenizer = AutoModelForCausalLM.from_pretrained(args.model), AutoTokenizer.from_pretrained(args.model)
    documents = text_documents(args.data, tokenizer, max_length=args.max_length)
    if args.no_packing:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    else:
        collator = PackedCollator()  # one row, positions restart at 0 per document

    with tempfile.TemporaryDirectory() as scratch:
        training_args = TrainingArguments(
            output_dir=scratch, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=args.accumulation, learning_rate=args.lr, lr_scheduler_type="cosine",
            warmup_steps=max(1, args.max_steps // 10), weight_decay=0.0, logging_steps=5, save_strategy="no",
            report_to=[], bf16=args.bf16, gradient_checkpointing=args.gradient_checkpointing, disable_tqdm=True,
            use_cpu=not torch.cuda.is_available(),  # Trainer refuses bf16 on a GPU-less machine unless told
        )
        trainer = Trainer(
            model=model, args=training_args, train_dataset=documents, data_collator=collator,
            processing_class=tokenizer,
        )
        trainer.train()

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(f"loss: first logged {losses[0]:.3f}, last logged {losses[-1]:.3f}")
    if trainer.is_world_process_zero():
        with staged_output(args.output_dir, inputs, args.overwrite, option="--output-dir") as staging:
            trainer.save_model(str(staging))  # weights, config, code files and the tokenizer
        print(f"saved to {args.output_dir}")
        reloaded = AutoModelForCausalLM.from_pretrained(args.output_dir).eval()
        prompt = tokenizer("The river", return_tensors="pt").input_ids
        sample = reloaded.generate(prompt, max_new_tokens=40, do_sample=False)
        print("sample:", repr(tokenizer.decode(sample[0], skip_special_tokens=True)))


if __name__ == "__main__":
    try:
        main()
    except OutputError as error:  # one line, as the m2rnn commands print it
        raise SystemExit(f"{Path(__file__).name}: error: {error}") from None
