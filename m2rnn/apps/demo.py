"""`m2rnn demo`: the paper's S3 result on a CPU, with no download.

The demo loads three tiny checkpoints shipped inside the package (`m2rnn/assets/demo/`, trained once on a GPU with
the recipe below; docs/demo.md records it): an M2RNN with the S3 initialisation, the paper's linear baseline (the
harness's one-layer Gated DeltaNet [-1, 1]) and our 3-layer Gated DeltaNet [-1, 1]. It measures them the paper's
way (cumulative sequence accuracy on random sequences up to 4x the training length of 128), prints and plots the
result, saves the M2RNN with `save_pretrained`, reloads it with `AutoModelForCausalLM` and shows it tracking and
generating. `--train` retrains the models from scratch with the same recipe first (a GPU run; on a CPU it is
capped and says so).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .eval import s3
from .output import check_output, staged_output
from .s3_models import CONFIGS, build_model

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "demo"  # package data of `m2rnn`
MODEL_NAMES = {"m2rnn": "M2RNN", "harness_gdn": "GDN [-1,1], 1 layer (paper's baseline)",
               "gdn": "GDN [-1,1], 3 layers + conv"}


# ---------------------------------------------------------------------------------------------------- recipe


@dataclass
class Stage:
    """One `train_s3` call (its arguments)."""

    steps: int
    lr: float
    batch_size: int = 128
    schedule: str = "cosine"
    curriculum: str | list[int] | None = "doubling"
    advance_at: float | None = 0.99
    dataset_size: int | None = None
    warmup: int = 50
    log_every: int = 25  # the curriculum checks the mean batch accuracy over this many steps


def _s3_stage() -> Stage:
    """The M2RNN recipe (docs/demo.md): fresh batches of 128, doubling curriculum 4 → 128, lr 3e-3 cosine over 8,000."""
    return Stage(steps=8000, lr=3e-3)


def _harness_stage() -> Stage:
    """The paper's harness: epochs over 100k fixed sequences of 128, batch 2048, lr 1e-3, 4,850 cosine steps."""
    return Stage(steps=4850, lr=1e-3, batch_size=2048, curriculum=None, advance_at=None, dataset_size=100_000)


@dataclass
class Recipe:
    """How the demo models are trained and evaluated. The defaults are those of the shipped checkpoints
    (docs/demo.md), which ran each model for 205 s on an H200 (six runs sharing it)."""

    train_length: int = 128
    stages: dict[str, Stage] = field(default_factory=lambda: {
        "m2rnn": _s3_stage(), "harness_gdn": _harness_stage(), "gdn": _s3_stage()})
    seed: int = 1
    eval_lengths: list[int] = field(default_factory=lambda: [4, 8, 16, 32, 64, 128, 256, 384, 512])
    eval_samples: int = 1000


def quick_recipe(seed: int = 1) -> Recipe:
    """Seconds-long settings for tests: short sequences, few steps, few evaluation samples."""
    quick = Stage(steps=30, lr=3e-3, batch_size=16, curriculum=None, advance_at=None, warmup=5, log_every=10)
    return Recipe(train_length=8, stages={key: replace(quick) for key in MODEL_NAMES}, seed=seed,
                  eval_lengths=[4, 8, 16, 32], eval_samples=32)


# ---------------------------------------------------------------------------------------------------- steps


def _say(message: str = "") -> None:
    print(message, flush=True)


def train_models(
    recipe: Recipe, quick: bool, progress: bool, seconds_per_model: float | None = None
) -> dict[str, tuple[torch.nn.Module, dict]]:
    """Train the three models from scratch (on the GPU when there is one); returns {key: (model, record)}.

    `seconds_per_model` caps each model's training time."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = {}
    for key, make_config in CONFIGS.items():
        model = build_model(make_config(quick), recipe.seed).to(device)
        stage = recipe.stages[key]
        _say(f"Training {MODEL_NAMES[key]} ({model.num_parameters():,} parameters) at length ≤ "
             f"{recipe.train_length} on {device.type}")
        history = s3.train_s3(
            model, train_length=recipe.train_length, steps=stage.steps, batch_size=stage.batch_size, lr=stage.lr,
            schedule=stage.schedule, curriculum=stage.curriculum, advance_at=stage.advance_at,
            dataset_size=stage.dataset_size, warmup=stage.warmup, log_every=stage.log_every, seed=recipe.seed,
            max_seconds=seconds_per_model, progress=progress, description=f"train {key}",
        )
        _say(f"  {history.steps[-1]}/{stage.steps} steps in {history.seconds:.0f} s, reached length "
             f"{history.lengths[-1]}, batch accuracy {100 * history.accuracies[-1]:.1f}%")
        record = {"recipe": asdict(stage) | {"train_length": recipe.train_length, "seed": recipe.seed},
                  "train_length": recipe.train_length, "steps_run": history.steps[-1],
                  "reached_length": history.lengths[-1], "train_seconds": history.seconds,
                  "device": device.type, "history": history.to_dict()}
        out[key] = (model.cpu().eval(), record)
    return out


def load_shipped_models() -> dict[str, tuple[torch.nn.Module, dict]]:
    """The checkpoints under m2rnn/assets/demo/{m2rnn,gdn}, with the training record saved beside them."""
    from transformers import AutoModelForCausalLM

    import m2rnn  # noqa: F401  (registers the Auto classes)

    out = {}
    for key in MODEL_NAMES:
        path = ASSETS / key
        model = AutoModelForCausalLM.from_pretrained(path)
        record = json.loads((path / "training.json").read_text())
        out[key] = (model.eval(), record)
    return out


def shipped_models_available() -> bool:
    return all((ASSETS / key / "config.json").exists() for key in MODEL_NAMES)


def save_and_reload(model: torch.nn.Module, path: Path) -> torch.nn.Module:
    """`save_pretrained` into `path` (inside the staged output folder), then `AutoModelForCausalLM.from_pretrained`."""
    from transformers import AutoModelForCausalLM

    model.save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path).eval()


@torch.no_grad()
def show_tracking(model: torch.nn.Module, length: int, seed: int) -> list[dict[str, Any]]:
    """Print one random sequence with the true running products and the model's predictions, position by position."""
    generator = torch.Generator().manual_seed(seed)
    input_ids, targets = s3.sample_batch(1, length, generator)
    predictions = model(input_ids).logits.argmax(-1)
    rows = []
    _say(f"{'t':>3}  {'x_t':>9}  {'true p_t':>9}  {'model':>9}")
    for t in range(length):
        x, p, y = (int(a[0, t]) for a in (input_ids, targets, predictions))
        rows.append({"t": t + 1, "x": x, "true": p, "pred": y})
        _say(f"{t + 1:>3}  {s3.element_name(x):>9}  {s3.element_name(p):>9}  "
             f"{s3.element_name(y) if y < s3.NUM_ELEMENTS else f'<{y}>':>9} {'✓' if y == p else '✗'}")
    return rows


@torch.no_grad()
def show_generation(model: torch.nn.Module, prompt_lengths: list[int], seed: int) -> list[dict[str, Any]]:
    """`model.generate` (greedy, one new token, recurrent cache) after random prompts of several lengths: the new
    token is the model's answer for the running product of the whole prompt."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for length in prompt_lengths:
        prompt, targets = s3.sample_batch(1, length, generator)
        output = model.generate(prompt, max_new_tokens=1, do_sample=False, pad_token_id=None)
        answer, truth = int(output[0, -1]), int(targets[0, -1])
        shown = " ".join(s3.element_name(int(i)) for i in prompt[0, :6]) + (" …" if length > 6 else "")
        name = s3.element_name(answer) if answer < s3.NUM_ELEMENTS else f"<{answer}>"
        _say(f"  length {length:>3}: {shown:<40} → {name:>8}  (true {s3.element_name(truth)}) "
             f"{'✓' if answer == truth else '✗'}")
        rows.append({"length": length, "prompt": prompt[0].tolist(), "generated": answer, "expected": truth})
    return rows


def verdict(results: dict[str, dict[int, dict[str, float]]], train_length: int) -> str:
    """One sentence computed from the numbers: cumulative sequence accuracy at the longest length, and the first
    length where each model drops below 1%."""
    longest = max(next(iter(results.values())))
    parts = []
    for key, by_length in results.items():
        collapsed = [n for n, r in sorted(by_length.items()) if r["sequence_accuracy"] < 0.01]
        where = f", below 1% from length {collapsed[0]}" if collapsed else ""
        parts.append(f"{MODEL_NAMES[key]} {100 * by_length[longest]['sequence_accuracy']:.1f}%{where}")
    return (f"Cumulative sequence accuracy at length {longest} ({longest // train_length}x the training length "
            f"{train_length}): " + "; ".join(parts) + ".")


def write_reports(out_dir: Path, results: dict, recipe: Recipe, meta: dict) -> str:
    """results.md, results.json and s3_accuracy.png in `out_dir`; returns the markdown table."""
    names = {MODEL_NAMES[k]: v for k, v in results.items()}
    table = s3.results_table(names, recipe.train_length)
    s3.plot_s3(names, out_dir / "s3_accuracy.png", recipe.train_length)
    s3.save_results(names, out_dir / "results.json", recipe=asdict(recipe), **meta)
    (out_dir / "results.md").write_text(
        "# S3 state tracking: M2RNN vs Gated DeltaNet [-1, 1]\n\n"
        f"Trained at length ≤ {recipe.train_length}; {recipe.eval_samples} random sequences of length "
        f"{max(recipe.eval_lengths)}, every length read as a prefix (the paper's measurement).\n\n"
        + table + "\n\n![accuracy vs length](s3_accuracy.png)\n"
    )
    return table


# ---------------------------------------------------------------------------------------------------- entry point


def run_demo(
    output_dir: str | Path = "m2rnn-demo-output",
    *,
    train: bool = False,
    steps: int | None = None,
    seed: int = 1,
    quick: bool = False,
    progress: bool = True,
    threads: int | None = None,
    train_seconds: float | None = 100.0,
    eval_samples: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run the demo end to end and return its results; see the module docstring for what it does.

    `train`: retrain the models from scratch (each capped at `train_seconds`, None for no cap) instead of loading
    the shipped checkpoints. `steps` replaces each recipe's step count. `quick`: tiny untuned models and a few
    steps (tests). The output folder is written through `m2rnn.apps.output.staged_output`: an existing one is replaced
    only with `overwrite` and only if m2rnn wrote it, and only once the new one is complete."""
    start = time.perf_counter()
    check_output(output_dir, inputs=[ASSETS], overwrite=overwrite, option="--output-dir")
    if threads:
        torch.set_num_threads(threads)
    recipe = quick_recipe(seed) if quick else Recipe(seed=seed)
    if steps is not None:
        recipe.stages = {key: replace(stage, steps=steps) for key, stage in recipe.stages.items()}
    if eval_samples is not None:
        recipe.eval_samples = eval_samples

    _say("S3 state tracking: read elements x_1..x_t of the symmetric group on {0,1,2} and predict, at every")
    _say("position, the running product p_t = x_t ∘ p_{t-1}. The paper reports that M2RNN, a non-linear")
    _say("matrix-state RNN trained at length 128, keeps every prediction right up to length 512, while the")
    _say("linear Gated DeltaNet [-1,1] loses track within a few steps. Metric: cumulative sequence accuracy, the")
    _say("share of sequences whose predictions are ALL right up to length t (losing track scores 0).\n")

    if train or quick:
        budget = None if quick else train_seconds
        if not quick and not torch.cuda.is_available():
            _say(f"No GPU: the recipe needs ~6,000 steps per model (about 3.5 minutes each on an H200); this CPU "
                 f"gets {f'{budget:.0f} s' if budget else 'no time cap'} per model, so expect an undertrained "
                 "M2RNN. The shipped checkpoints (`m2rnn demo` without --train) are the GPU-trained ones.")
        source = "trained now"
        models = train_models(recipe, quick, progress, budget or None)
    else:
        if not shipped_models_available():
            raise FileNotFoundError(f"the shipped checkpoints are missing from {ASSETS}; reinstall m2rnn or pass --train")
        source = f"shipped checkpoints ({ASSETS}); retrain with `m2rnn demo --train`"
        _say(f"Loading the shipped checkpoints from {ASSETS}")
        models = load_shipped_models()
        recipe.train_length = models["m2rnn"][1]["train_length"]
    _say(f"Models: {source}.")

    eval_start = time.perf_counter()
    longest = max(recipe.eval_lengths)
    _say(f"\nEvaluating on {recipe.eval_samples} random sequences of length {longest} "
         f"({longest // recipe.train_length}x the training length {recipe.train_length})")
    results = {}
    for key, (model, _) in models.items():
        results[key] = s3.evaluate_s3_prefixes(model, recipe.eval_lengths, recipe.eval_samples, seed=10_000 + seed,
                                               batch_size=100)
        _say(f"  {MODEL_NAMES[key]}: done ({time.perf_counter() - eval_start:.0f} s)")
    meta = {"source": source, "parameters": {k: m.num_parameters() for k, (m, _) in models.items()},
            "training": {k: {n: v for n, v in record.items() if n != "history"} for k, (_, record) in models.items()}}
    with staged_output(output_dir, inputs=[ASSETS], overwrite=overwrite, option="--output-dir") as staging:
        table = write_reports(staging, results, recipe, meta)
        _say("\n" + table + "\n")
        summary_line = verdict(results, recipe.train_length)
        _say(summary_line + "\n")

        _say("Saving the M2RNN with save_pretrained and reloading it with AutoModelForCausalLM")
        reloaded = save_and_reload(models["m2rnn"][0], staging / "m2rnn-s3")
        example = torch.randint(0, s3.NUM_ELEMENTS, (2, 12), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            same = torch.allclose(models["m2rnn"][0](example).logits, reloaded(example).logits, atol=1e-5)
        _say(f"  {Path(output_dir) / 'm2rnn-s3'}: reloaded logits {'match' if same else 'DIFFER from'} the original\n")

        _say("The reloaded M2RNN on a sequence of length 16 (cycle notation, e = identity):")
        tracking = show_tracking(reloaded, 16, seed + 1)
        _say("\nmodel.generate (greedy, one token) after random prompts; the answer is the product of the whole prompt:")
        lengths = [n for n in (8, 32, 128, 512) if n <= longest]
        generation = show_generation(reloaded, lengths, seed + 2)
        seconds = time.perf_counter() - start
        summary = {"results": results, "source": source, "verdict": summary_line, "reload_matches": same,
                   "tracking": tracking, "generation": generation, "seconds": seconds, "output_dir": str(output_dir)}
        (staging / "summary.json").write_text(json.dumps(
            {k: v for k, v in summary.items() if k != "results"}, indent=1) + "\n")
    out_dir = Path(output_dir)
    _say(f"\nWrote {out_dir / 'results.md'}, {out_dir / 'results.json'}, {out_dir / 's3_accuracy.png'} and "
         f"{out_dir / 'm2rnn-s3'} in {seconds:.0f} s.")
    return summary
