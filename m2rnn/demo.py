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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .eval import s3

ASSETS = Path(__file__).parent / "assets" / "demo"
MODEL_NAMES = {"m2rnn": "M2RNN", "gdn": "Gated DeltaNet"}


# ---------------------------------------------------------------------------------------------------- recipe


@dataclass
class Recipe:
    """How the demo models are trained (the same recipe made the shipped checkpoints)."""

    train_length: int = 32
    steps: int = 4000
    batch_size: int = 128
    lr: float = 3e-3
    schedule: str = "cosine"
    curriculum: str | list[int] | None = "doubling"
    advance_at: float | None = 0.99
    warmup: int = 50
    seed: int = 0
    eval_lengths: list[int] = field(default_factory=lambda: [4, 8, 16, 32, 64, 128])
    eval_samples: int = 256


def quick_recipe(seed: int = 0) -> Recipe:
    """Seconds-long settings for tests: short sequences, few steps, few evaluation samples."""
    return Recipe(train_length=8, steps=30, batch_size=16, lr=3e-3, curriculum=None, advance_at=None, warmup=5,
                  seed=seed, eval_lengths=[4, 8, 16, 32], eval_samples=32)


def m2rnn_config(quick: bool = False):
    """The tiny M2RNN: two M2RNN layers, one shared q and k, 8 value/forget/weight/gate heads of 16×16 states."""
    from . import M2RNNConfig

    heads = 2 if quick else 8
    return M2RNNConfig(
        vocab_size=8, hidden_size=32 if quick else 64, intermediate_size=64 if quick else 128, num_hidden_layers=2,
        mixer_types=["m2rnn", "m2rnn"], m2rnn_key_head_dim=8 if quick else 16, m2rnn_value_head_dim=8 if quick else 16,
        m2rnn_num_q_heads=1, m2rnn_num_k_heads=1, m2rnn_num_v_heads=heads, m2rnn_num_forget_heads=heads,
        m2rnn_num_weight_heads=heads, m2rnn_num_gate_heads=heads, m2rnn_gradient_clipping=1.0,
        max_position_embeddings=1024, tie_word_embeddings=False,
    )


def gdn_config(quick: bool = False):
    """The tiny Gated DeltaNet: same width and depth, gates in [0, 1], a comparable recurrent state."""
    from . import M2RNNConfig

    return M2RNNConfig(
        vocab_size=8, hidden_size=32 if quick else 64, intermediate_size=64 if quick else 128, num_hidden_layers=2,
        mixer_types=["gated_deltanet", "gated_deltanet"], linear_num_key_heads=2, linear_num_value_heads=2,
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


def train_models(recipe: Recipe, quick: bool, progress: bool) -> dict[str, tuple[torch.nn.Module, dict]]:
    """Train the M2RNN and the GDN from scratch; returns {key: (model, history dict)}."""
    out = {}
    for key, make_config in (("m2rnn", m2rnn_config), ("gdn", gdn_config)):
        model = build_model(make_config(quick), recipe.seed)
        _say(f"Training {MODEL_NAMES[key]} ({count_parameters(model):,} parameters) at length ≤ {recipe.train_length}")
        history = s3.train_s3(
            model, train_length=recipe.train_length, steps=recipe.steps, batch_size=recipe.batch_size, lr=recipe.lr,
            schedule=recipe.schedule, curriculum=recipe.curriculum, advance_at=recipe.advance_at,
            warmup=recipe.warmup, seed=recipe.seed, progress=progress, description=f"train {key}",
        )
        _say(f"  {history.seconds:.0f} s, last logged length {history.lengths[-1]}, "
             f"batch accuracy {100 * history.accuracies[-1]:.1f}%")
        out[key] = (model, history.to_dict())
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
def show_generation(model: torch.nn.Module, prompt_length: int, new_tokens: int, seed: int) -> dict[str, Any]:
    """Greedy `generate`: each new token is the model's running product of everything before it, its own outputs
    included, so the truth for generated token j is the running product of prompt + tokens 1..j-1."""
    generator = torch.Generator().manual_seed(seed)
    prompt, _ = s3.sample_batch(1, prompt_length, generator)
    output = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, pad_token_id=None)
    generated = output[0, prompt_length:]
    truth = s3.running_products(output[:, :-1])[0, prompt_length - 1:]
    names = lambda ids: " ".join(s3.element_name(int(i)) if int(i) < 6 else f"<{int(i)}>" for i in ids)  # noqa: E731
    _say(f"prompt    : {names(prompt[0])}")
    _say(f"generated : {names(generated)}")
    _say(f"expected  : {names(truth)}")
    correct = int((generated == truth).sum())
    _say(f"{correct}/{new_tokens} generated tokens are the correct running product")
    return {"prompt": prompt[0].tolist(), "generated": generated.tolist(), "expected": truth.tolist()}


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
) -> dict[str, Any]:
    """Run the demo end to end and return its results; see the module docstring for what it does."""
    start = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    recipe = quick_recipe(seed) if quick else Recipe(seed=seed)
    if steps is not None:
        recipe.steps = steps
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    _say("S3 state tracking: read elements x_1..x_t of the symmetric group on {0,1,2}, predict at every position")
    _say("the running product p_t = x_t ∘ p_{t-1}. Chance is 1/6. M2RNN's non-linear matrix state can track it at")
    _say("lengths it never saw; Gated DeltaNet (a linear RNN, gates in [0,1]) cannot.\n")

    if train or quick or not shipped_models_available():
        if not (train or quick):
            _say("No shipped checkpoints found under m2rnn/assets/demo: training from scratch.")
        source = "trained now"
        models = train_models(recipe, quick, progress)
    else:
        source = f"shipped checkpoints ({ASSETS}); retrain with `m2rnn demo --train`"
        _say(f"Loading the shipped checkpoints from {ASSETS}")
        models = load_shipped_models()
        record = models["m2rnn"][1]
        if "recipe" in record:
            recipe.train_length = record["recipe"]["train_length"]
    _say(f"Models: {source}.")

    _say(f"\nEvaluating on {recipe.eval_samples} fresh sequences per length, up to "
         f"{max(recipe.eval_lengths) // recipe.train_length}× the training length")
    results = {
        key: s3.evaluate_s3(model, recipe.eval_lengths, recipe.eval_samples, seed=10_000 + seed, progress=progress)
        for key, (model, _) in models.items()
    }
    meta = {"source": source, "parameters": {k: count_parameters(m) for k, (m, _) in models.items()},
            "training": {k: h for k, (_, h) in models.items()}}
    table = write_reports(out_dir, results, recipe, meta)
    _say("\n" + table + "\n")

    _say("Saving the M2RNN with save_pretrained and reloading it with AutoModelForCausalLM")
    reloaded = save_and_reload(models["m2rnn"][0], out_dir / "m2rnn-s3")
    example = torch.randint(0, s3.NUM_ELEMENTS, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        same = torch.allclose(models["m2rnn"][0](example).logits, reloaded(example).logits, atol=1e-5)
    _say(f"  {out_dir / 'm2rnn-s3'}: reloaded logits {'match' if same else 'DIFFER from'} the original\n")

    _say("The reloaded M2RNN on a sequence of length 16 (cycle notation, e = identity):")
    tracking = show_tracking(reloaded, 16, seed + 1)
    _say("\nmodel.generate (greedy) after a 12-element prompt:")
    generation = show_generation(reloaded, 12, 8, seed + 2)

    seconds = time.perf_counter() - start
    summary = {"results": results, "source": source, "reload_matches": same, "tracking": tracking,
               "generation": generation, "seconds": seconds, "output_dir": str(out_dir)}
    _say(f"\nWrote {out_dir / 'results.md'}, {out_dir / 'results.json'}, {out_dir / 's3_accuracy.png'} and "
         f"{out_dir / 'm2rnn-s3'} in {seconds:.0f} s.")
    return summary
