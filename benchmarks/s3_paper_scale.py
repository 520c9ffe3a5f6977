"""S3 state tracking at the paper's lengths on a GPU: train at length 128, evaluate from 4 to 512.

    python benchmarks/s3_paper_scale.py train --model m2rnn --seconds 150 --output-dir out   # one model
    python benchmarks/s3_paper_scale.py report out                                           # table + plot

`train` builds the demo's model of that kind (`m2rnn.apps.s3_models.m2rnn_config` / `gdn_config`; the GDN with
negative eigenvalues, the paper's "Gated DeltaNet [−1,1]"), trains it on S3 running products with the doubling
curriculum 4 → 8 → … → 128 (moving on at 99% batch accuracy) for at most `--seconds`, evaluates accuracy at
4 … 512 on held-out sequences and writes `<model>.json`. Two `train` runs can share one GPU (the models are
tiny). `report` merges the JSON files into `results.md`, `results.json` and `s3_accuracy.png`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from m2rnn.apps.s3_models import build_model, gdn_config, m2rnn_config
from m2rnn.apps.eval import s3

TRAIN_LENGTH = 128
EVAL_LENGTHS = [4, 8, 16, 32, 64, 128, 256, 384, 512]
PAPER = {  # m2rnn-reference.md §6.6: accuracy % at lengths 4, 8, 128, 256, 384, 512 after training at 128
    "M2RNN": {4: 100, 8: 100, 128: 100, 256: 100, 384: 99.8, 512: 99.7},
    "Gated DeltaNet [−1,1]": {4: 91.6, 8: 21.7, 128: 0.0, 256: 0.0, 384: 0.0, 512: 0.0},
}
NAMES = {"m2rnn": "M2RNN", "gdn": "Gated DeltaNet [−1,1]"}


def make_model(kind: str, seed: int) -> torch.nn.Module:
    config = m2rnn_config() if kind == "m2rnn" else gdn_config()
    if kind == "gdn":
        config.linear_allow_neg_eigval = True
    config.max_position_embeddings = 4096
    return build_model(config, seed)


def train(args: argparse.Namespace) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = make_model(args.model, args.seed).to(device)
    started = time.perf_counter()
    history = s3.train_s3(
        model, train_length=TRAIN_LENGTH, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        curriculum="doubling", advance_at=0.99, log_every=25, seed=args.seed, max_seconds=args.seconds,
        progress=False, description=args.model,
    )
    results = s3.evaluate_s3(model, EVAL_LENGTHS, num_samples=args.eval_samples, batch_size=128)
    record = {
        "model": NAMES[args.model] + (f" ({args.tag})" if args.tag else ""), "parameters": model.num_parameters(), "device": str(device),
        "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None, "torch": torch.__version__,
        "train_length": TRAIN_LENGTH, "steps_run": history.steps[-1], "reached_length": history.lengths[-1],
        "train_seconds": history.seconds, "total_seconds": time.perf_counter() - started,
        "recipe": {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seconds": args.seconds,
                   "seed": args.seed, "curriculum": "doubling 4..128, advance at 99%"},
        "results": {str(n): r for n, r in results.items()}, "history": history.to_dict(),
    }
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.model}{'_' + args.tag if args.tag else ''}.json").write_text(json.dumps(record, indent=1))
    print(f"{args.model}: {record['steps_run']} steps in {history.seconds:.0f} s, reached length "
          f"{record['reached_length']}; accuracy % (all / last):",
          {n: f"{100 * r['accuracy']:.1f}/{100 * r['last_accuracy']:.1f}" for n, r in results.items()}, flush=True)


def report(args: argparse.Namespace) -> None:
    folder = Path(args.folder)
    records = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json")) if p.name != "results.json"]
    if not records:
        raise SystemExit(f"report: no <model>.json files in {folder}")
    by_model = {r["model"]: {int(n): v for n, v in r["results"].items()} for r in records}
    lines = [s3.results_table(by_model, train_length=TRAIN_LENGTH), "",
             "| model | parameters | steps | reached length | train s |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['parameters']:,} | {r['steps_run']} | {r['reached_length']} | "
              f"{r['train_seconds']:.0f} |" for r in records]
    lines += ["", "Paper (m2rnn-reference.md §6.6), accuracy %: " + json.dumps(PAPER, ensure_ascii=False)]
    (folder / "results.md").write_text("\n".join(lines) + "\n")
    s3.save_results(by_model, folder / "results.json", runs=records)
    s3.plot_s3(by_model, folder / "s3_accuracy.png", train_length=TRAIN_LENGTH)
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("train", help="train and evaluate one model")
    run.add_argument("--model", choices=list(NAMES), required=True)
    run.add_argument("--output-dir", required=True)
    run.add_argument("--seconds", type=float, default=150.0, help="training time cap")
    run.add_argument("--steps", type=int, default=20000, help="steps of the lr schedule (the cap may stop earlier)")
    run.add_argument("--batch-size", type=int, default=128)
    run.add_argument("--lr", type=float, default=3e-3)
    run.add_argument("--eval-samples", type=int, default=256)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--tag", default="", help="suffix of the run's name and file (several runs of one model)")
    merge = commands.add_parser("report", help="merge the per-model JSON files into a table and a plot")
    merge.add_argument("folder")
    args = parser.parse_args()
    train(args) if args.command == "train" else report(args)


if __name__ == "__main__":
    main()
