"""LoRA fine-tuning of an M2RNN model with PEFT and `Trainer`: adapt the projections of every layer type and each
M2RNN head's recurrent weight W, save the adapter, reload it, merge it and check the outputs did not change.

    python examples/finetune_lora.py                             # tiny base model, CPU, ~20 s
    python examples/finetune_lora.py --model path/or/hub-id --targets default --train-recurrent

--targets default     `LoraConfig()` without target_modules: m2rnn registers its defaults with PEFT (every
                      mixer's q/k/v/o, in_proj, in_proj_qkv, in_proj_z and out_proj)
--targets all-linear  every nn.Linear except lm_head (MLPs and the small GDN gate projections too)
--no-state-weight     leave W frozen (by default it gets a rank-r delta per head through `target_parameters`)
--train-recurrent     also train A_log, dt_bias, D, the short convs and norms of the recurrent mixers in full
                      (`modules_to_save`)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from m2rnn import M2RNNConfig, M2RNNForCausalLM
from m2rnn.tokenization import BYTE_VOCAB_SIZE, byte_level_tokenizer
from m2rnn.training import (
    STATE_WEIGHT_TARGET,
    PackedCollator,
    merge_and_unload,
    recurrent_modules_to_save,
    text_documents,
)
from m2rnn.apps.output import OutputError, staged_output

DATA = Path(__file__).parent / "data" / "tiny_corpus.txt"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="base checkpoint folder or Hub id; default: a tiny model saved first")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--output-dir", default="runs/finetune_lora", help="gets adapter/ and merged/")
    parser.add_argument("--overwrite", action="store_true", help="replace an --output-dir this script wrote before")
    parser.add_argument("--targets", choices=["default", "all-linear"], default="all-linear")
    parser.add_argument("--no-state-weight", action="store_true", help="do not adapt the M2RNN weights W")
    parser.add_argument("--train-recurrent", action="store_true", help="train the recurrent mixers in full")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (tiny models: 1 is fastest)")
    return parser.parse_args()


def load_base(path: str) -> M2RNNForCausalLM:
    return AutoModelForCausalLM.from_pretrained(path).eval()


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads)
    inputs = [args.model, args.data]
    # the whole --output-dir (base/, adapter/, merged/) is built in a staging folder and renamed into place at the end
    with staged_output(args.output_dir, inputs, args.overwrite, option="--output-dir") as output:
        train_save_and_merge(args, output)
    print(f"adapter in {Path(args.output_dir) / 'adapter'}, merged model in {Path(args.output_dir) / 'merged'}")


def train_save_and_merge(args: argparse.Namespace, output: Path) -> None:
    if args.model is None:  # a fixed base checkpoint, so the adapter can be reloaded onto the same weights
        torch.manual_seed(0)
        config = M2RNNConfig.from_preset(
            "tiny", vocab_size=BYTE_VOCAB_SIZE, pad_token_id=0, bos_token_id=1, eos_token_id=2
        )
        M2RNNForCausalLM(config).save_pretrained(output / "base")
        byte_level_tokenizer().save_pretrained(output / "base")
        args.model = str(output / "base")
    tokenizer = AutoTokenizer.from_pretrained(args.model)

    lora = LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, task_type="CAUSAL_LM",
        target_modules=None if args.targets == "default" else "all-linear",
        # with --train-recurrent W trains in full inside the saved mixer copies (PEFT refuses both on one module)
        target_parameters=None if args.no_state_weight or args.train_recurrent else [STATE_WEIGHT_TARGET],
        modules_to_save=recurrent_modules_to_save(load_base(args.model)) if args.train_recurrent else None,
    )
    model = get_peft_model(load_base(args.model), lora)
    model.print_trainable_parameters()

    documents = text_documents(args.data, tokenizer, max_length=args.max_length)
    with tempfile.TemporaryDirectory() as scratch:
        training_args = TrainingArguments(
            output_dir=scratch, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr, lr_scheduler_type="constant", weight_decay=0.0, logging_steps=5,
            save_strategy="no", report_to=[], disable_tqdm=True,
        )
        trainer = Trainer(
            model=model, args=training_args, train_dataset=documents, data_collator=PackedCollator()
        )
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(f"loss: first logged {losses[0]:.3f}, last logged {losses[-1]:.3f}")

    model.eval()
    probe = tokenizer("The lighthouse keeper", return_tensors="pt").input_ids
    with torch.no_grad():
        adapted = model(probe).logits
    model.save_pretrained(output / "adapter")  # adapter_config.json + adapter_model.safetensors only
    reloaded = PeftModel.from_pretrained(load_base(args.model), output / "adapter").eval()
    with torch.no_grad():
        reload_error = (reloaded(probe).logits - adapted).abs().max().item()
    merged = merge_and_unload(reloaded)  # also merges LoRA layers nested in a target_parameters wrapper
    with torch.no_grad():
        merged_error = (merged(probe).logits - adapted).abs().max().item()
    print(f"max |Δlogit| vs the trained adapter: reloaded {reload_error:.1e}, merged {merged_error:.1e}")
    if max(reload_error, merged_error) > 1e-4:
        raise SystemExit(f"reloading or merging changed the outputs: {reload_error}, {merged_error}")
    merged.save_pretrained(output / "merged")
    tokenizer.save_pretrained(output / "merged")


if __name__ == "__main__":
    try:
        main()
    except OutputError as error:  # one line, as the m2rnn commands print it
        raise SystemExit(f"{Path(__file__).name}: error: {error}") from None
