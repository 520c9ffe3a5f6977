"""Issue 17's ablation in one GPU call: which init/gate changes make the M2RNN learn S3, against the linear baselines.

    python benchmarks/s3_ablation.py all OUT --seconds 300 --lm-corpus corpus.txt   # everything, concurrently
    python benchmarks/s3_ablation.py s3 --model m2rnn --drop orthogonal --seed 1 --output-dir OUT   # one run
    python benchmarks/s3_ablation.py lm --w-init orthogonal --corpus corpus.txt --output-dir OUT    # one LM run
    python benchmarks/s3_ablation.py report OUT --into benchmarks/s3                                # table + plot

S3 runs (`m2rnn.apps.s3_models` builds the models): the M2RNN with the full recipe (`S3_RECIPE_CHANGES`: orthogonal W, no
forget gate, in_proj std 1/√width + identity conv) and with each change removed, 3 seeds each; our 3-layer GDN
[-1, 1] with the same training; the harness's one-layer GDN [-1, 1] with the harness's recipe (a fixed set of
100k sequences of length 128, AdamW lr 1e-3, batch 2048, 4,850 cosine steps); a one-layer GRU. Training stops at
`--seconds`. Each run is measured the paper's way (1,000 sequences of length 512, cumulative sequence accuracy at
every prefix length) and ours beside it (256 fresh sequences per length), and saves its weights.

LM runs: a ~3M-parameter all-M2RNN byte-level LM on a local text file, equal steps, W = I (the paper's init)
against orthogonal W, and the full S3 recipe; validation loss on the file's last 5%.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from m2rnn.apps.s3_models import S3_RECIPE_CHANGES, build_model, gdn_config, harness_gdn_config, m2rnn_config
from m2rnn.apps.eval import s3
from m2rnn.apps.training_loop import train_loop

TRAIN_LENGTH = 128
EVAL_LENGTHS = [4, 8, 16, 32, 64, 128, 256, 384, 512]
PAPER = {  # m2rnn-reference.md §6.6 / issue 17: cumulative sequence accuracy % at 4, 8, 128, 256, 384, 512
    "M2RNN (paper)": {4: 100, 8: 100, 128: 100, 256: 100, 384: 99.8, 512: 99.7},
    "GDN [-1,1] (paper)": {4: 91.6, 8: 21.7, 128: 0.0, 256: 0.0, 384: 0.0, 512: 0.0},
}
SEEDS = (1, 2, 3)
DROP_LABELS = {None: "M2RNN, full recipe", "orthogonal": "M2RNN, recipe but W = I",
               "no_forget_gate": "M2RNN, recipe but with the forget gate",
               "input_scale": "M2RNN, recipe but LM in_proj/conv init"}


class GRUModel(torch.nn.Module):
    """A one-layer GRU of width 128 with an embedding and a linear readout (the paper's nonlinear baseline)."""

    def __init__(self, vocab_size: int = 8, width: int = 128) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, width)
        self.gru = torch.nn.GRU(width, width, batch_first=True)
        self.head = torch.nn.Linear(width, vocab_size)

    def forward(self, input_ids: torch.Tensor) -> s3._Output:
        return s3._Output(self.head(self.gru(self.embed(input_ids))[0]))


def run_name(model: str, drop: str | None, seed: int) -> str:
    return f"{model}{'-no_' + drop if drop else ''}-s{seed}"


def make_model(model: str, drop: str | None, seed: int) -> torch.nn.Module:
    if model == "m2rnn":
        return build_model(m2rnn_config(changes=tuple(c for c in S3_RECIPE_CHANGES if c != drop)), seed)
    if model == "gdn":
        return build_model(gdn_config(), seed)
    if model == "harness_gdn":
        return build_model(harness_gdn_config(), seed)
    torch.manual_seed(seed)
    return GRUModel()


def train_s3_run(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = run_name(args.model, args.drop, args.seed)
    model = make_model(args.model, args.drop, args.seed).to(device)
    if args.model == "harness_gdn":  # the harness's recipe: epochs over a fixed set, no curriculum
        recipe = dict(steps=4850, batch_size=2048, lr=1e-3, curriculum=None, advance_at=None, dataset_size=100_000)
    else:  # the study's: fresh batches, doubling curriculum 4 → 128 at 99% batch accuracy
        recipe = dict(steps=args.steps, batch_size=128, lr=3e-3, curriculum="doubling", advance_at=0.99)
    history = s3.train_s3(model, train_length=TRAIN_LENGTH, seed=args.seed, max_seconds=args.seconds,
                          log_every=25, progress=False, description=name, **recipe)
    paper = s3.evaluate_s3_prefixes(model, EVAL_LENGTHS, num_samples=args.eval_samples, seed=10_000)
    ours = s3.evaluate_s3(model, EVAL_LENGTHS, num_samples=min(256, args.eval_samples), seed=20_000)
    record = {
        "name": name, "model": args.model, "drop": args.drop, "seed": args.seed,
        "parameters": model.num_parameters(), "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
        "torch": torch.__version__, "train_length": TRAIN_LENGTH, "recipe": recipe | {"seconds": args.seconds},
        "steps_run": history.steps[-1], "reached_length": history.lengths[-1], "train_seconds": history.seconds,
        "paper_way": {str(n): r for n, r in paper.items()}, "ours": {str(n): r for n, r in ours.items()},
        "history": history.to_dict(),
    }
    out = Path(args.output_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "runs" / f"{name}.json").write_text(json.dumps(record, indent=1))
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(out / "models" / name)
        (out / "models" / name / "training.json").write_text(json.dumps(
            {"recipe": record["recipe"] | {"train_length": TRAIN_LENGTH, "seed": args.seed},
             "train_length": TRAIN_LENGTH, "steps_run": record["steps_run"],
             "reached_length": record["reached_length"], "train_seconds": history.seconds,
             "gpu": record["gpu"], "history": history.to_dict()}, indent=1))
    seq = {n: f"{100 * r['sequence_accuracy']:.1f}" for n, r in paper.items()}
    print(f"{name}: {record['steps_run']} steps in {history.seconds:.0f} s, reached {record['reached_length']}; "
          f"cumulative sequence accuracy % {seq}", flush=True)


# ---------------------------------------------------------------------------------------------------- LM run


def lm_config(w_init: str):
    from m2rnn import M2RNNConfig

    s3_recipe = w_init == "s3"
    return M2RNNConfig(
        vocab_size=260, hidden_size=256, intermediate_size=768, num_hidden_layers=4, mixer_types=["m2rnn"] * 4,
        m2rnn_key_head_dim=64, m2rnn_value_head_dim=16, m2rnn_num_v_heads=16, m2rnn_num_forget_heads=16,
        m2rnn_num_weight_heads=16, m2rnn_num_gate_heads=16,
        m2rnn_state_weight_init="orthogonal" if s3_recipe else w_init, m2rnn_use_forget_gate=not s3_recipe,
        m2rnn_in_proj_init_std=256**-0.5 if s3_recipe else None, m2rnn_conv_init="identity" if s3_recipe else "normal",
        tie_word_embeddings=True, max_position_embeddings=4096,
    )


def train_lm_run(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = torch.tensor(list(Path(args.corpus).read_bytes()), dtype=torch.long) + 4  # bytes after 4 specials
    split = int(0.95 * len(data))
    train_data, val_data = data[:split], data[split:]
    model = build_model(lm_config(args.w_init), args.seed).to(device)
    generator = torch.Generator().manual_seed(args.seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95))
    length, batch = 256, 32
    val_starts = torch.linspace(0, len(val_data) - length - 2, 64).long()
    val_batch = torch.stack([val_data[i : i + length + 1] for i in val_starts]).to(device)

    @torch.no_grad()
    def val_loss() -> float:
        model.eval()
        loss = model(val_batch[:, :-1], labels=val_batch[:, :-1]).loss.item()
        model.train()
        return loss

    def step_loss(step: int) -> torch.Tensor:
        starts = torch.randint(0, len(train_data) - length - 1, (batch,), generator=generator)
        ids = torch.stack([train_data[i : i + length] for i in starts]).to(device)
        return model(ids, labels=ids).loss

    curve, start = [], time.perf_counter()
    for done in train_loop(model, optimizer, s3.s3_schedule("cosine", args.steps, 100), step_loss, max_grad_norm=1.0,
                           progress=False):
        step = done.index
        if (step + 1) % 100 == 0 or step + 1 == args.steps:
            curve.append({"step": step + 1, "train_loss": done.loss.item(), "val_loss": val_loss()})
        if args.seconds and time.perf_counter() - start > args.seconds:
            break
    record = {"w_init": args.w_init, "parameters": model.num_parameters(), "steps_planned": args.steps,
              "steps_run": step + 1, "seconds": time.perf_counter() - start, "lr": args.lr, "batch": batch,
              "length": length, "corpus_bytes": len(data), "final_val_loss": curve[-1]["val_loss"], "curve": curve}
    out = Path(args.output_dir) / "lm"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"lm-{args.w_init}.json").write_text(json.dumps(record, indent=1))
    print(f"lm {args.w_init}: {record['steps_run']} steps in {record['seconds']:.0f} s, val loss "
          f"{record['final_val_loss']:.4f} ({record['final_val_loss'] / math.log(2):.3f} bits/byte)", flush=True)


# ---------------------------------------------------------------------------------------------------- all, report


def run_all(args: argparse.Namespace) -> None:
    """Every run as its own process, all at once (the models are tiny; one CPU core each), then `report`."""
    me = [sys.executable, __file__]
    common = ["--output-dir", args.output_dir]
    jobs = [["s3", "--model", "m2rnn", "--seed", str(seed), "--seconds", str(args.seconds)]
            + (["--drop", drop] if drop else []) for drop in (None, *S3_RECIPE_CHANGES) for seed in SEEDS]
    jobs += [["s3", "--model", model, "--seed", "1", "--seconds", str(args.seconds)]
             for model in ("harness_gdn", "gdn", "gru")]
    if args.lm_corpus:
        jobs += [["lm", "--w-init", w, "--corpus", args.lm_corpus, "--steps", str(args.lm_steps),
                  "--seconds", str(args.seconds + 60)] for w in ("identity", "orthogonal", "s3")]
    logs = Path(args.output_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for job in jobs:
        tag = "-".join(job[i + 1] for i, x in enumerate(job) if x in ("--model", "--drop", "--seed", "--w-init"))
        log = open(logs / f"{job[0]}-{tag}.log", "w")
        procs.append((job, subprocess.Popen(me + job + common, stdout=log, stderr=subprocess.STDOUT,
                                            env=os.environ | {"PYTHONUNBUFFERED": "1"})))
    for job, proc in procs:
        code = proc.wait()
        print(f"{' '.join(job)}: exit {code}", flush=True)
    report(argparse.Namespace(folder=args.output_dir, into=args.output_dir))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def report(args: argparse.Namespace) -> None:
    folder, into = Path(args.folder), Path(args.into)
    runs = [json.loads(p.read_text()) for p in sorted((folder / "runs").glob("*.json"))]
    if not runs and (folder / "results.json").exists():  # an earlier report (runs without their histories)
        runs = json.loads((folder / "results.json").read_text())["runs"]
    if not runs:
        raise SystemExit(f"report: no runs/*.json or results.json in {folder}")
    groups: dict[str, list[dict]] = {}
    for run in runs:
        label = {"m2rnn": DROP_LABELS[run["drop"]],
                 "gdn": "our GDN [-1,1] (3 layers, conv, gates)", "harness_gdn": "harness GDN [-1,1] (1 layer)",
                 "gru": "GRU (1 layer, 128)"}[run["model"]]
        groups.setdefault(label, []).append(run)
    show = [4, 8, 16, 32, 64, 128, 256, 384, 512]
    lines = ["Cumulative sequence accuracy %, the paper's way (1,000 sequences of length 512, read at each prefix "
             "length), per seed; trained at 128.", "",
             "| run | seed | steps | reached | " + " | ".join(map(str, show)) + " |",
             "|---|---|---|---|" + "---|" * len(show)]
    for label, group in groups.items():
        for run in group:
            cells = [f"{100 * run['paper_way'][str(n)]['sequence_accuracy']:.1f}" for n in show]
            lines.append(f"| {label} | {run['seed']} | {run['steps_run']} | {run['reached_length']} | "
                         + " | ".join(cells) + " |")
    for name, row in PAPER.items():
        lines.append(f"| {name} | | | 128 | " + " | ".join(str(row.get(n, "")) for n in show) + " |")
    lines += ["", "Ours beside it (256 fresh sequences per length; mean over seeds): cumulative sequence accuracy "
              "(per-token / last position) %.", ""]
    means = {label: {n: {key: _mean([r["ours"][str(n)][key] for r in group])
                         for key in ("sequence_accuracy", "accuracy", "last_accuracy")} for n in show}
             for label, group in groups.items()}
    lines.append(s3.results_table(means, train_length=TRAIN_LENGTH))
    lm = [json.loads(p.read_text()) for p in sorted((folder / "lm").glob("*.json"))] if (folder / "lm").exists() else []
    if not lm and (folder / "results.json").exists():
        lm = json.loads((folder / "results.json").read_text()).get("lm", [])
    if lm:
        lines += ["", "| LM run (byte-level, all-M2RNN) | parameters | steps | val loss (nats/byte) | bits/byte |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['w_init']} | {r['parameters']:,} | {r['steps_run']}/{r['steps_planned']} | "
                  f"{r['final_val_loss']:.4f} | {r['final_val_loss'] / math.log(2):.3f} |" for r in lm]
    into.mkdir(parents=True, exist_ok=True)
    (into / "results.md").write_text("\n".join(lines) + "\n")
    plotted = {}
    for label, group in groups.items():  # the mean over seeds of the paper-way curves
        name = f"{label} (mean of {len(group)} seeds)" if len(group) > 1 else label
        plotted[name] = {n: {"sequence_accuracy": _mean([r["paper_way"][str(n)]["sequence_accuracy"] for r in group])}
                         for n in show}
    s3.plot_s3(plotted, into / "s3_accuracy.png", train_length=TRAIN_LENGTH, per_token=False,
               title="S3, trained at 128: cumulative sequence accuracy (1,000 sequences of 512)")
    summary = {"runs": [{k: v for k, v in r.items() if k != "history"} for r in runs],
               "lm": [{k: v for k, v in r.items() if k != "curve"} | {"curve": r["curve"]} for r in lm]}
    (into / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("s3", help="train and evaluate one S3 run")
    one.add_argument("--model", choices=["m2rnn", "gdn", "harness_gdn", "gru"], required=True)
    one.add_argument("--drop", choices=S3_RECIPE_CHANGES, default=None, help="M2RNN: the recipe change to leave out")
    one.add_argument("--seed", type=int, default=1)
    one.add_argument("--seconds", type=float, default=300.0, help="training time cap")
    one.add_argument("--steps", type=int, default=8000, help="steps of the lr schedule (the cap may stop earlier)")
    one.add_argument("--eval-samples", type=int, default=1000, help="sequences of length 512 (the paper: 1,000)")
    one.add_argument("--output-dir", required=True)
    lm = commands.add_parser("lm", help="one small language-model run")
    lm.add_argument("--w-init", choices=["identity", "orthogonal", "s3"], required=True)
    lm.add_argument("--corpus", required=True)
    lm.add_argument("--steps", type=int, default=1200)
    lm.add_argument("--lr", type=float, default=1e-3)
    lm.add_argument("--seed", type=int, default=0)
    lm.add_argument("--seconds", type=float, default=0, help="safety time cap, 0 for none")
    lm.add_argument("--output-dir", required=True)
    every = commands.add_parser("all", help="every run concurrently, then the report")
    every.add_argument("output_dir")
    every.add_argument("--seconds", type=float, default=300.0)
    every.add_argument("--lm-corpus", default=None)
    every.add_argument("--lm-steps", type=int, default=1200)
    merge = commands.add_parser("report", help="table + plot from a finished folder")
    merge.add_argument("folder")
    merge.add_argument("--into", required=True)
    args = parser.parse_args()
    {"s3": train_s3_run, "lm": train_lm_run, "all": run_all, "report": report}[args.command](args)


if __name__ == "__main__":
    main()
