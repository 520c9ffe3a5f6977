"""Swap one Gated DeltaNet layer of a tiny hybrid for an M2RNN layer, then heal it (CPU, well under a minute).

1. Build a tiny byte-level GDN hybrid (GDN, GDN, GDN, attention) and train it briefly on a small text, so that the
   teacher has something to lose.
2. Save it with its tokenizer, then let `heal_checkpoint` swap layer 1 to M2RNN (fresh init) and heal it:
   stage 1 matches the replaced mixer's output, stage 2 distils the teacher with LoRA (new layer fully trainable).
3. Print the held-out numbers before and after each stage. The output folder holds the healed model, the
   tokenizer, results.json, results.md and loss_curves.png.

    python examples/heal_swapped_layer.py [--output-dir heal-example-output] [--init transplant|fresh]

The same healing from the command line, on the saved teacher:

    m2rnn heal OUT/teacher OUT/healed --swap-layers 1 --text-files examples/data/heal/river_town.txt --block-size 32
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from m2rnn import M2RNNConfig, M2RNNForCausalLM
from m2rnn.apps.heal import HealSettings, TextSource, byte_level_tokenizer, heal_checkpoint, load_text_blocks
from m2rnn.apps.heal.healing import HealResult, lm_loss, mean_layer_mse
from m2rnn.apps.output import OutputError, staged_output

TEXT = Path(__file__).parent / "data" / "heal" / "river_town.txt"
BLOCK_SIZE = 32


def tiny_hybrid_config(vocab_size: int) -> M2RNNConfig:
    """Four layers of width 64: three Gated DeltaNet layers and one attention layer (about 0.2M parameters)."""
    return M2RNNConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        mixer_types=["gated_deltanet", "gated_deltanet", "gated_deltanet", "full_attention"],
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
        num_attention_heads=4, num_key_value_heads=2,
        rope_parameters={"rope_theta": 10_000.0, "partial_rotary_factor": 1.0},
        pad_token_id=0, bos_token_id=1, eos_token_id=2,  # m2rnn.tokenization.byte_level_tokenizer ids
    )


def train_teacher(model: M2RNNForCausalLM, blocks: torch.Tensor, steps: int, seed: int) -> list[float]:
    """A few hundred AdamW steps of next-byte prediction: enough for the teacher to know common words."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for _ in range(steps):
        ids = blocks[torch.randint(len(blocks), (16,), generator=generator)]
        loss = lm_loss(model(input_ids=ids, use_cache=False).logits, ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="heal-example-output", help="gets teacher/ and healed/")
    parser.add_argument("--overwrite", action="store_true", help="replace an --output-dir this script wrote before")
    parser.add_argument("--init", choices=("fresh", "transplant"), default="fresh")
    parser.add_argument("--teacher-steps", type=int, default=120)
    parser.add_argument("--stage1-steps", type=int, default=80)
    parser.add_argument("--stage2-steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="one thread is fastest for a model this small")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    # teacher/ and healed/ are built in a staging folder that becomes --output-dir once both are complete
    with staged_output(args.output_dir, [TEXT], args.overwrite, option="--output-dir") as staging:
        result = teach_and_heal(args, staging)
    report(args, result, started)


def teach_and_heal(args: argparse.Namespace, output: Path) -> HealResult:
    """Train the tiny teacher, save it to `output/teacher`, then swap layer 1 and heal it into `output/healed`."""
    started = time.perf_counter()
    tokenizer = byte_level_tokenizer()
    text = TextSource(files=[TEXT])
    blocks = load_text_blocks(text, tokenizer, block_size=BLOCK_SIZE)
    torch.manual_seed(args.seed)
    teacher = M2RNNForCausalLM(tiny_hybrid_config(len(tokenizer)))
    losses = train_teacher(teacher, blocks.train, args.teacher_steps, args.seed)
    with torch.no_grad():
        held_out = lm_loss(teacher.eval()(input_ids=blocks.eval).logits, blocks.eval).item()
    print(f"teacher: {teacher.num_parameters():,} parameters, {args.teacher_steps} steps, train loss "
          f"{losses[0]:.3f} -> {losses[-1]:.3f}, held-out LM loss {held_out:.3f} nats/byte "
          f"({time.perf_counter() - started:.1f} s)")
    teacher.save_pretrained(output / "teacher")
    tokenizer.save_pretrained(output / "teacher")

    settings = HealSettings(
        batch_size=16, stage1_steps=args.stage1_steps, stage1_lr=3e-3, stage2="lora", stage2_steps=args.stage2_steps,
        stage2_lr=2e-3, eval_every=20, seed=args.seed, progress=True,
    )
    return heal_checkpoint(output / "teacher", output / "healed", text, swap_layers=[1], init=args.init,
                           settings=settings, block_size=BLOCK_SIZE)


def report(args: argparse.Namespace, result: HealResult, started: float) -> None:
    """The held-out numbers before and after each stage."""
    output = Path(args.output_dir)
    print(f"\nswapped layer 1 (gated_deltanet -> m2rnn, {args.init} init); held-out numbers "
          f"({result.data['eval_blocks_measured']} blocks of {BLOCK_SIZE} bytes):")
    print(f"{'':>16} {'layer-1 MSE':>12} {'relative':>9} {'KL':>8} {'LM loss':>8}")
    for label, measures in (("before healing", result.before), ("after stage 1", result.after_stage1),
                            ("after stage 2", result.after)):
        layer = measures["replaced_layer_mse"]["1"]
        print(f"{label:>16} {layer['mse']:12.4g} {layer['relative_mse']:9.3f} {measures['kl']:8.4f} "
              f"{measures['student_lm_loss']:8.4f}")
    print(f"{'teacher':>16} {'':>12} {'':>9} {'':>8} {result.before['teacher_lm_loss']:8.4f}")
    print(f"\nlayer MSE {mean_layer_mse(result.before):.4g} -> {mean_layer_mse(result.after):.4g}, "
          f"KL {result.before['kl']:.4f} -> {result.after['kl']:.4f}; healing {result.seconds:.1f} s, "
          f"total {time.perf_counter() - started:.1f} s")
    print(f"wrote {output / 'healed'} (model, tokenizer, results.json, results.md, loss_curves.png)")


if __name__ == "__main__":
    try:
        main()
    except OutputError as error:  # one line, as the m2rnn commands print it
        raise SystemExit(f"{Path(__file__).name}: error: {error}") from None
