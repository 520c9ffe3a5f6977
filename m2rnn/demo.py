"""`m2rnn demo`: S3 state tracking with a tiny M2RNN and a tiny Gated DeltaNet, on a CPU, with no download.

By default the demo loads two small checkpoints shipped inside the package (`m2rnn/assets/demo/`, trained once
with `m2rnn demo --train`'s recipe; docs/demo.md records it), evaluates both up to 4× the training length, prints
and saves the table and the plot, saves the M2RNN with `save_pretrained`, reloads it with `AutoModelForCausalLM`
and shows it tracking and generating. `--train` retrains both models from scratch with the same recipe first.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .eval import s3

ASSETS = Path(__file__).parent / "assets" / "demo"
MODEL_NAMES = {"m2rnn": "M2RNN", "gdn": "Gated DeltaNet"}


# ---------------------------------------------------------------------------------------------------- recipe


@dataclass
class Stage:
    """One `train_s3` call. `stop_after` reproduces a run that a time limit cut short (the schedule unchanged)."""

    steps: int
    lr: float
    stop_after: int | None = None
    batch_size: int = 128
    schedule: str = "cosine"
    curriculum: str | list[int] | None = "doubling"
    advance_at: float | None = 0.99
    warmup: int = 50
    log_every: int = 25  # the curriculum checks the mean batch accuracy over this many steps


@dataclass
class Recipe:
    """How the demo models are trained and evaluated. The defaults are the stages of the shipped checkpoints
    (docs/demo.md); `stop_after` marks where a time limit stopped the original runs."""

    train_length: int = 32
    m2rnn_stages: list[Stage] = field(default_factory=lambda: [
        Stage(steps=5000, lr=3e-3, stop_after=4325), Stage(steps=3300, lr=1e-2, stop_after=2550)])
    gdn_stages: list[Stage] = field(default_factory=lambda: [
        Stage(steps=5000, lr=1e-2), Stage(steps=3300, lr=1e-2, stop_after=2100)])
    seed: int = 0
    eval_lengths: list[int] = field(default_factory=lambda: [4, 8, 16, 32, 64, 128])
    eval_samples: int = 256

    def stages(self, key: str) -> list[Stage]:
        return self.m2rnn_stages if key == "m2rnn" else self.gdn_stages


def quick_recipe(seed: int = 0) -> Recipe:
    """Seconds-long settings for tests: short sequences, few steps, few evaluation samples."""
    quick = [Stage(steps=30, lr=3e-3, batch_size=16, curriculum=None, advance_at=None, warmup=5, log_every=10)]
    return Recipe(train_length=8, m2rnn_stages=quick, gdn_stages=list(quick), seed=seed,
                  eval_lengths=[4, 8, 16, 32], eval_samples=32)


def m2rnn_config(quick: bool = False):
    """The tiny M2RNN: 3 M2RNN layers of width 64; one shared q and k; 8 value/forget/weight/gate heads of
    16×16 states (2,048 state elements per layer)."""
    from . import M2RNNConfig

    heads = 2 if quick else 8
    return M2RNNConfig(
        vocab_size=8, hidden_size=32 if quick else 64, intermediate_size=64 if quick else 128,
        num_hidden_layers=2 if quick else 3, mixer_types=["m2rnn"] * (2 if quick else 3),
        m2rnn_key_head_dim=8 if quick else 16, m2rnn_value_head_dim=8 if quick else 16,
        m2rnn_num_q_heads=1, m2rnn_num_k_heads=1, m2rnn_num_v_heads=heads, m2rnn_num_forget_heads=heads,
        m2rnn_num_weight_heads=heads, m2rnn_num_gate_heads=heads, m2rnn_gradient_clipping=1.0,
        max_position_embeddings=1024, tie_word_embeddings=False,
    )


def gdn_config(quick: bool = False):
    """The tiny Gated DeltaNet: same width and depth, 2 heads of 32×32 states (2,048 per layer), gates in [0, 1]."""
    from . import M2RNNConfig

    return M2RNNConfig(
        vocab_size=8, hidden_size=32 if quick else 64, intermediate_size=64 if quick else 128,
        num_hidden_layers=2 if quick else 3, mixer_types=["gated_deltanet"] * (2 if quick else 3),
        linear_num_key_heads=2, linear_num_value_heads=2,
        linear_key_head_dim=8 if quick else 32, linear_value_head_dim=8 if quick else 32,
        max_position_embeddings=1024, tie_word_embeddings=False,
    )


# ---------------------------------------------------------------------------------------------------- steps


def _say(message: str = "") -> None:
    print(message, flush=True)


def build_model(config, seed: int) -> torch.nn.Module:
    """A freshly initialised `M2RNNForCausalLM` (seeded)."""
    from . import M2RNNForCausalLM

    torch.manual_seed(seed)
    return M2RNNForCausalLM(config)


def train_models(
    recipe: Recipe, quick: bool, progress: bool, seconds_per_model: float | None = None
) -> dict[str, tuple[torch.nn.Module, dict]]:
    """Train the M2RNN and the GDN from scratch, stage by stage; returns {key: (model, training record)}.

    `seconds_per_model` caps each model's total training time (the stages share it in order)."""
    out = {}
    for key, make_config in (("m2rnn", m2rnn_config), ("gdn", gdn_config)):
        model = build_model(make_config(quick), recipe.seed)
        size = f"{count_parameters(model):,} parameters"
        _say(f"Training {MODEL_NAMES[key]} ({size}) at length ≤ {recipe.train_length}")
        started, stages = time.perf_counter(), []
        for i, stage in enumerate(recipe.stages(key)):
            left = None if seconds_per_model is None else seconds_per_model - (time.perf_counter() - started)
            if left is not None and left <= 0:
                _say(f"  stage {i + 1} skipped: the time budget of {seconds_per_model:.0f} s is spent")
                break
            history = s3.train_s3(
                model, train_length=recipe.train_length, steps=stage.steps, stop_after=stage.stop_after,
                batch_size=stage.batch_size, lr=stage.lr, schedule=stage.schedule, curriculum=stage.curriculum,
                advance_at=stage.advance_at, warmup=stage.warmup, log_every=stage.log_every, seed=recipe.seed,
                max_seconds=left, progress=progress, description=f"train {key} stage {i + 1}",
            )
            planned = min(stage.steps, stage.stop_after or stage.steps)
            _say(f"  stage {i + 1}: {history.steps[-1]}/{planned} steps in {history.seconds:.0f} s, reached length "
                 f"{history.lengths[-1]}, batch accuracy {100 * history.accuracies[-1]:.1f}%")
            stages.append({"stage": asdict(stage), "steps_run": history.steps[-1], "history": history.to_dict()})
        out[key] = (model, {"recipe": {"train_length": recipe.train_length}, "stages": stages})
    return out


def load_shipped_models() -> dict[str, tuple[torch.nn.Module, dict]]:
    """The checkpoints under m2rnn/assets/demo/{m2rnn,gdn}, with the training record saved beside them."""
    from transformers import AutoModelForCausalLM

    import m2rnn  # noqa: F401  (registers the Auto classes)

    out = {}
    for key in MODEL_NAMES:
        path = ASSETS / key
        model = AutoModelForCausalLM.from_pretrained(path)
        record_path = path / "training.json"
        record = json.loads(record_path.read_text()) if record_path.exists() else {}
        out[key] = (model.eval(), record)
    return out


def shipped_models_available() -> bool:
    return all((ASSETS / key / "config.json").exists() for key in MODEL_NAMES)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_and_reload(model: torch.nn.Module, path: Path) -> torch.nn.Module:
    """`save_pretrained` into a temporary folder renamed into place, then `AutoModelForCausalLM.from_pretrained`."""
    from transformers import AutoModelForCausalLM

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
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
    """One sentence, computed from the numbers: mean accuracy beyond the training length per model."""
    parts = []
    for key, by_length in results.items():
        beyond = [r["accuracy"] for n, r in by_length.items() if n > train_length]
        if beyond:
            parts.append(f"{MODEL_NAMES[key]} {100 * sum(beyond) / len(beyond):.1f}%")
    longest = max(next(iter(results.values())))
    return (f"Mean all-position accuracy beyond the training length ({train_length} < length ≤ {longest}): "
            + ", ".join(parts) + f" (chance {100 / s3.NUM_ELEMENTS:.1f}%).")


def write_reports(out_dir: Path, results: dict, recipe: Recipe, meta: dict) -> str:
    """results.md, results.json and s3_accuracy.png in `out_dir`; returns the markdown table."""
    names = {MODEL_NAMES[k]: v for k, v in results.items()}
    table = s3.results_table(names, recipe.train_length)
    s3.plot_s3(names, out_dir / "s3_accuracy.png", recipe.train_length)
    s3.save_results(names, out_dir / "results.json", recipe=asdict(recipe), **meta)
    (out_dir / "results.md").write_text(
        "# S3 state tracking: M2RNN vs Gated DeltaNet\n\n"
        f"Trained at length ≤ {recipe.train_length}; {recipe.eval_samples} random sequences per length.\n\n"
        + table + "\n\n![accuracy vs length](s3_accuracy.png)\n"
    )
    return table


# ---------------------------------------------------------------------------------------------------- entry point


def run_demo(
    output_dir: str | Path = "m2rnn-demo-output",
    *,
    train: bool = False,
    steps: int | None = None,
    seed: int = 0,
    quick: bool = False,
    progress: bool = True,
    threads: int | None = None,
    train_seconds: float | None = 100.0,
) -> dict[str, Any]:
    """Run the demo end to end and return its results; see the module docstring for what it does.

    `train`: retrain both models from scratch (each capped at `train_seconds`, None for no cap) instead of loading
    the shipped checkpoints. `steps` replaces the recipe's stages by one stage of that many steps per model.
    `quick`: tiny untuned models and a few steps (tests)."""
    start = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    recipe = quick_recipe(seed) if quick else Recipe(seed=seed)
    if steps is not None:
        recipe.m2rnn_stages = [replace(recipe.m2rnn_stages[0], steps=steps, stop_after=None)]
        recipe.gdn_stages = [replace(recipe.gdn_stages[0], steps=steps, stop_after=None)]
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    _say("S3 state tracking: read elements x_1..x_t of the symmetric group on {0,1,2} and predict, at every")
    _say("position, the running product p_t = x_t ∘ p_{t-1} (chance 1/6). The paper reports that M2RNN, a")
    _say("non-linear matrix-state RNN, keeps tracking far beyond its training length while Gated DeltaNet")
    _say("(a linear RNN, gates in [0,1]) does not. Here: two tiny models, measured below as they are.\n")

    if train or quick or not shipped_models_available():
        if not (train or quick):
            _say("No shipped checkpoints found under m2rnn/assets/demo: training from scratch.")
        budget = None if quick else train_seconds
        if budget:
            _say(f"Training each model for at most {budget:.0f} s on this machine (the shipped checkpoints had "
                 "~12 GPU-minutes); `--train-seconds 0` removes the cap.")
        source = "trained now"
        models = train_models(recipe, quick, progress, budget or None)
    else:
        source = f"shipped checkpoints ({ASSETS}); retrain with `m2rnn demo --train`"
        _say(f"Loading the shipped checkpoints from {ASSETS}")
        models = load_shipped_models()
        recipe.train_length = models["m2rnn"][1].get("recipe", {}).get("train_length", recipe.train_length)
    _say(f"Models: {source}.")

    eval_start = time.perf_counter()
    _say(f"\nEvaluating on {recipe.eval_samples} fresh random sequences per length, up to "
         f"{max(recipe.eval_lengths) // recipe.train_length}× the training length ({recipe.train_length})")
    results = {
        key: s3.evaluate_s3(model, recipe.eval_lengths, recipe.eval_samples, seed=10_000 + seed, progress=progress)
        for key, (model, _) in models.items()
    }
    meta = {"source": source, "parameters": {k: count_parameters(m) for k, (m, _) in models.items()},
            "training": {k: record for k, (_, record) in models.items()}}
    table = write_reports(out_dir, results, recipe, meta)
    _say("\n" + table + "\n")
    summary_line = verdict(results, recipe.train_length)
    _say(summary_line)
    _say(f"(evaluation took {time.perf_counter() - eval_start:.0f} s)\n")

    _say("Saving the M2RNN with save_pretrained and reloading it with AutoModelForCausalLM")
    reloaded = save_and_reload(models["m2rnn"][0], out_dir / "m2rnn-s3")
    example = torch.randint(0, s3.NUM_ELEMENTS, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        same = torch.allclose(models["m2rnn"][0](example).logits, reloaded(example).logits, atol=1e-5)
    _say(f"  {out_dir / 'm2rnn-s3'}: reloaded logits {'match' if same else 'DIFFER from'} the original\n")

    _say("The reloaded M2RNN on a sequence of length 16 (cycle notation, e = identity):")
    tracking = show_tracking(reloaded, 16, seed + 1)
    _say("\nmodel.generate (greedy, one token) after random prompts; the answer is the product of the whole prompt:")
    lengths = [n for n in (8, 16, 32, 64, 128) if n <= max(recipe.eval_lengths)]
    generation = show_generation(reloaded, lengths, seed + 2)

    seconds = time.perf_counter() - start
    summary = {"results": results, "source": source, "verdict": summary_line, "reload_matches": same,
               "tracking": tracking, "generation": generation, "seconds": seconds, "output_dir": str(out_dir)}
    _say(f"\nWrote {out_dir / 'results.md'}, {out_dir / 'results.json'}, {out_dir / 's3_accuracy.png'} and "
         f"{out_dir / 'm2rnn-s3'} in {seconds:.0f} s.")
    return summary
