"""RULER-style needle-in-a-haystack: synthetic needles in generated haystacks, scored by context length × depth.

Tasks (named after RULER's; the M2RNN paper reports the mean of these 6 by context length, arXiv 2603.14360):

| task | haystack | needles | asked |
|---|---|---|---|
| `single_1` | one noise paragraph, repeated | 1 key → a 7-digit number | that number |
| `single_2` | generated prose | 1 key → a 7-digit number | that number |
| `single_3` | generated prose | 1 key → a UUID | that UUID |
| `multikey` | generated prose | 4 keys → numbers (3 distractors) | one key's number |
| `multivalue` | generated prose | 1 key → 4 numbers | all 4 |
| `multiquery` | generated prose | 4 keys → numbers | all 4 keys' numbers |

A needle reads "One of the special magic {kind} for {key} is: {value}." and the prompt ends with an answer
prefix, so a base model can simply continue it. The first asked needle sits at the requested depth (0 = start of
the haystack, 1 = end); other needles sit at seeded random depths. Lengths count tokens of the model's tokenizer:
each prompt is the longest that leaves `max_new_tokens` of the length for the answer. An example scores the share
of expected values that occur verbatim in the output (RULER's "string match all"); cells average over samples.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

from .common import GenerateFn, markdown_table

TASKS: tuple[str, ...] = ("single_1", "single_2", "single_3", "multikey", "multivalue", "multiquery")
DEFAULT_LENGTHS: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
DEFAULT_DEPTHS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
_ADJECTIVES = (
    "quiet", "bright", "ancient", "curious", "gentle", "rapid", "hollow", "golden", "tidy", "restless", "humble",
    "distant", "clever", "silent", "vivid", "steady", "fragile", "bold", "patient", "crooked",
)
_NOUNS = (
    "river", "lantern", "merchant", "valley", "engine", "garden", "sailor", "library", "mountain", "violin",
    "harbor", "orchard", "painter", "bridge", "forest", "teacher", "window", "market", "castle", "meadow",
)
_VERBS = ("watched", "followed", "remembered", "crossed", "repaired", "described", "visited", "ignored", "admired", "built")
_PLACES = ("old town", "northern coast", "quiet square", "train station", "city museum", "far hills", "small island")


@dataclass(frozen=True)
class TaskSpec:
    """How one task builds its needles."""

    haystack: str  # "noise" or "prose"
    value_kind: str  # "number" or "uuid"
    num_keys: int = 1
    values_per_key: int = 1
    asked_keys: int = 1
    max_new_tokens: int = 32


SPECS: dict[str, TaskSpec] = {
    "single_1": TaskSpec("noise", "number"),
    "single_2": TaskSpec("prose", "number"),
    "single_3": TaskSpec("prose", "uuid", max_new_tokens=48),
    "multikey": TaskSpec("prose", "number", num_keys=4),
    "multivalue": TaskSpec("prose", "number", values_per_key=4, max_new_tokens=64),
    "multiquery": TaskSpec("prose", "number", num_keys=4, asked_keys=4, max_new_tokens=64),
}


@dataclass
class Example:
    """One prompt with the values the answer must contain."""

    task: str
    length: int
    depth: float
    sample: int
    prompt: str
    expected: list[str]
    prompt_tokens: int = 0
    prediction: str = ""
    score: float = 0.0


# ---------------------------------------------------------------------------------------------------- generation


def _value(kind: str, rng: random.Random) -> str:
    if kind == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return str(rng.randint(1_000_000, 9_999_999))


def _keys(count: int, rng: random.Random) -> list[str]:
    pairs = rng.sample([(a, n) for a in _ADJECTIVES for n in _NOUNS], count)
    return [f"{a}-{n}" for a, n in pairs]


def _prose_sentence(rng: random.Random) -> str:
    return (
        f"The {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} the {rng.choice(_ADJECTIVES)} "
        f"{rng.choice(_NOUNS)} near the {rng.choice(_PLACES)}."
    )


def haystack_sentences(kind: str, count: int, rng: random.Random) -> list[str]:
    """`count` filler sentences: the noise paragraph's sentences in a cycle, or seeded random sentences."""
    if kind == "noise":
        sentences = [s.strip() + "." for s in NOISE.split(".") if s.strip()]
        return [sentences[i % len(sentences)] for i in range(count)]
    if kind == "prose":
        return [_prose_sentence(rng) for _ in range(count)]
    raise ValueError(f"unknown haystack kind {kind!r}")


def _plural(kind: str) -> str:
    return {"number": "numbers", "uuid": "uuids"}[kind]


def _needle(kind: str, key: str, value: str) -> str:
    return f"One of the special magic {_plural(kind)} for {key} is: {value}."


def _wrap(spec: TaskSpec, context: str, asked: Sequence[str]) -> str:
    kinds = _plural(spec.value_kind)
    query = ", ".join(asked[:-1]) + f" and {asked[-1]}" if len(asked) > 1 else asked[0]
    if len(asked) > 1 or spec.values_per_key > 1:
        question, answer = f"What are all the special magic {kinds}", f"The special magic {kinds}"
        verb = "are"
    else:
        question, answer = f"What is the special magic {spec.value_kind}", f"The special magic {spec.value_kind}"
        verb = "is"
    return (
        f"Some special magic {kinds} are hidden within the following text. Make sure to memorize it. "
        f"I will quiz you about the {kinds} afterwards.\n{context}\n"
        f"{question} for {query} mentioned in the provided text? {answer} for {query} mentioned in the provided "
        f"text {verb}"
    )


@dataclass
class _Draw:
    """The random parts of one sample: needles, asked keys, filler and the other needles' depths."""

    needles: list[tuple[str, str]]  # (key, value) in insertion order; asked ones first
    asked: list[str]
    expected: list[str]
    filler: list[str]
    other_depths: list[float] = field(default_factory=list)


def _draw(spec: TaskSpec, rng: random.Random, filler_count: int) -> _Draw:
    keys = _keys(spec.num_keys, rng)
    needles = [(key, _value(spec.value_kind, rng)) for key in keys for _ in range(spec.values_per_key)]
    asked = keys[: spec.asked_keys]
    expected = [value for key, value in needles if key in asked]
    filler = haystack_sentences(spec.haystack, filler_count, rng)
    return _Draw(needles, asked, expected, filler, [rng.random() for _ in needles[1:]])


def _assemble(spec: TaskSpec, draw: _Draw, count: int, depth: float) -> str:
    units = list(draw.filler[:count])
    placements = [(depth, 0)] + [(d, i) for i, d in enumerate(draw.other_depths, start=1)]
    # insert from the deepest position first so earlier indices stay valid; ties keep the needle order
    for position_depth, index in sorted(placements, key=lambda p: (-round(p[0] * count), -p[1])):
        key, value = draw.needles[index]
        units.insert(round(position_depth * count), _needle(spec.value_kind, key, value))
    return _wrap(spec, " ".join(units), draw.asked)


def _count_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=True)["input_ids"])


def build_examples(
    tokenizer: Any,
    task: str,
    length: int,
    depths: Sequence[float],
    samples: int,
    seed: int = 0,
) -> list[Example]:
    """`samples` × `depths` prompts of at most `length − max_new_tokens` tokens for one task and length.

    The filler count is found by bisection once per sample (the needles' depth barely changes the count), then
    each depth's prompt is trimmed a unit at a time if it still runs over.
    """
    if task not in SPECS:
        raise ValueError(f"--tasks: unknown needle task {task!r}; tasks: {', '.join(TASKS)}")
    spec = SPECS[task]
    budget = length - spec.max_new_tokens
    examples = []
    for sample in range(samples):
        rng = random.Random(f"{seed}-{task}-{length}-{sample}")
        pool = max(16, budget // 8)
        draw = _draw(spec, rng, pool)
        while _count_tokens(tokenizer, _assemble(spec, draw, len(draw.filler), 0.5)) <= budget:
            draw.filler += haystack_sentences(spec.haystack, len(draw.filler), rng)
        low, high = 0, len(draw.filler)  # invariant: low fits (if anything fits), high does not
        _check_length(tokenizer, spec, draw, task, length)
        while high - low > 1:
            middle = (low + high) // 2
            if _count_tokens(tokenizer, _assemble(spec, draw, middle, 0.5)) <= budget:
                low = middle
            else:
                high = middle
        for depth in depths:
            count = low
            prompt = _assemble(spec, draw, count, depth)
            while (tokens := _count_tokens(tokenizer, prompt)) > budget and count > 0:
                count -= 1
                prompt = _assemble(spec, draw, count, depth)
            examples.append(Example(task, length, depth, sample, prompt, list(draw.expected), tokens))
    return examples


def _check_length(tokenizer: Any, spec: TaskSpec, draw: _Draw, task: str, length: int) -> None:
    """Refuse a length that cannot hold the task's prompt with an empty haystack plus its answer."""
    minimum = _count_tokens(tokenizer, _assemble(spec, draw, 0, 0.5)) + spec.max_new_tokens
    if length < minimum:
        raise ValueError(
            f"--lengths: {length} tokens is too short for the {task!r} prompt and its {spec.max_new_tokens}-token "
            f"answer: it needs at least {minimum} tokens with this tokenizer (a haystack needs more)"
        )


def check_lengths(tokenizer: Any, tasks: Sequence[str], lengths: Sequence[int], seed: int = 0) -> None:
    """Before any generation: every length fits every task's prompt (checked on each task's first sample)."""
    for task in tasks:
        spec = SPECS[task]
        for length in lengths:
            rng = random.Random(f"{seed}-{task}-{length}-0")
            _check_length(tokenizer, spec, _draw(spec, rng, 0), task, length)


def plan(model: Any, tasks: Sequence[str], lengths: Sequence[int], depths: Sequence[float], samples: int,
         where: str) -> str:
    """What a run will do (prompts, tokens) and a rough time estimate from timing the model once."""
    from ..options import format_duration
    from .common import seconds_per_token

    per_cell = len(depths) * samples
    prompts = len(tasks) * len(lengths) * per_cell
    prompt_tokens = per_cell * sum(length - SPECS[t].max_new_tokens for t in tasks for length in lengths)
    new_tokens = per_cell * len(lengths) * sum(SPECS[t].max_new_tokens for t in tasks)
    per_prompt_token, per_new_token = seconds_per_token(model)
    estimate = prompt_tokens * per_prompt_token + new_tokens * per_new_token
    shown = ", ".join(_length_label(n) for n in lengths)
    return (
        f"{len(tasks)} tasks × {len(lengths)} lengths ({shown}) × {len(depths)} depths × {samples} sample(s) = "
        f"{prompts} prompts, {prompt_tokens / 1e6:.2f}M prompt tokens, up to {new_tokens} new tokens on {where}; "
        f"estimated ~{format_duration(estimate)} (rough, from one timed prompt; --lengths, --depths and --limit "
        "change the size)"
    )


def score_prediction(prediction: str, expected: Sequence[str]) -> float:
    """Share of the expected values that occur verbatim in the prediction."""
    return sum(value in prediction for value in expected) / len(expected)


# ---------------------------------------------------------------------------------------------------- runner


def run_niah(
    generate: GenerateFn,
    tokenizer: Any,
    *,
    tasks: Sequence[str] = TASKS,
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    samples: int = 2,
    batch_size: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Build, generate and score every (task, length, depth, sample); returns cells and aggregates."""
    if samples <= 0:
        raise ValueError(f"--limit (samples per cell) must be positive, got {samples}")
    if batch_size <= 0:
        raise ValueError(f"--batch-size must be positive, got {batch_size}")
    groups = [(task, length) for task in tasks for length in lengths]
    total = len(groups) * len(depths) * samples
    bar = tqdm(total=total, desc="needle-in-a-haystack", disable=not progress, dynamic_ncols=True)
    examples: list[Example] = []
    for task, length in groups:
        bar.set_postfix(task=task, length=length)
        group = build_examples(tokenizer, task, length, depths, samples, seed)
        for start in range(0, len(group), batch_size):
            batch = group[start:start + batch_size]
            outputs = generate([e.prompt for e in batch], SPECS[task].max_new_tokens, False)
            for example, output in zip(batch, outputs):
                example.prediction = output
                example.score = score_prediction(output, example.expected)
            bar.update(len(batch))
        examples.extend(group)
    bar.close()
    return summarize(examples, tasks, lengths, depths)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def summarize(
    examples: Sequence[Example], tasks: Sequence[str], lengths: Sequence[int], depths: Sequence[float]
) -> dict[str, Any]:
    """Scores ×100: per (task, length, depth) cell, per task and length, per length and depth, per length."""

    def pick(**where: Any) -> list[float]:
        return [e.score for e in examples if all(getattr(e, k) == v for k, v in where.items())]

    cells = [
        {"task": t, "length": n, "depth": d, "score": 100 * _mean(pick(task=t, length=n, depth=d)),
         "samples": len(pick(task=t, length=n, depth=d))}
        for t in tasks for n in lengths for d in depths
    ]
    return {
        "tasks": list(tasks),
        "lengths": list(lengths),
        "depths": list(depths),
        "by_length": {n: 100 * _mean(pick(length=n)) for n in lengths},
        "by_task_length": {t: {n: 100 * _mean(pick(task=t, length=n)) for n in lengths} for t in tasks},
        "by_length_depth": {n: {d: 100 * _mean(pick(length=n, depth=d)) for d in depths} for n in lengths},
        "cells": cells,
        "examples": [
            {"task": e.task, "length": e.length, "depth": e.depth, "sample": e.sample, "prompt_tokens": e.prompt_tokens,
             "expected": e.expected, "prediction": e.prediction, "score": e.score}
            for e in examples
        ],
    }


def _length_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def results_markdown(results: dict[str, Any], title: str = "Needle in a haystack") -> str:
    """Task × length table with the mean row, and the mean length × depth table (scores %)."""
    lengths = results["lengths"]
    header = ["task"] + [_length_label(n) for n in lengths]
    rows = [[t] + [results["by_task_length"][t][n] for n in lengths] for t in results["tasks"]]
    rows.append(["**mean**"] + [results["by_length"][n] for n in lengths])
    depth_header = ["depth"] + [_length_label(n) for n in lengths]
    depth_rows = [[f"{d:g}"] + [results["by_length_depth"][n][d] for n in lengths] for d in results["depths"]]
    return (
        f"# {title}\n\nScore (%) = share of the asked needle values found verbatim in the output.\n\n"
        + markdown_table(header, rows)
        + "\n\n## Mean over tasks by depth (0 = start, 1 = end of the haystack)\n\n"
        + markdown_table(depth_header, depth_rows)
        + "\n"
    )


def plot_heatmap(results: dict[str, Any], path: str | Path, title: str = "Needle in a haystack") -> Path:
    """PNG heatmap of the mean score over tasks, context length (x) × needle depth (y)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    lengths, depths = results["lengths"], results["depths"]
    grid = [[results["by_length_depth"][n][d] for n in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(lengths), 1.2 + 0.5 * len(depths)), dpi=120)
    image = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [_length_label(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=8)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="score (%)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_evaluation(
    folder: Path, model_name: str, tasks: Sequence[str], lengths: Sequence[int], depths: Sequence[float],
    samples: int, *, tokenizer: str | None = None, where: str = "cpu", batch_size: int = 1, seed: int = 0,
    progress: bool = True, device: str | None = None, dtype: str | None = None, trust_remote_code: bool = False,
) -> str:
    """`m2rnn eval niah`: check the lengths with the tokenizer (before the weights are loaded), load the model, run
    every (task, length, depth) cell and write results.json, results.md and the heatmap into `folder`; returns the
    markdown table."""
    from .common import HFGenerator, announce, environment, load_checked_tokenizer, load_model, write_results
    from .distributed import data_parallel, global_batch_size

    loaded_tokenizer = load_checked_tokenizer(model_name, tokenizer, trust_remote_code)
    check_lengths(loaded_tokenizer, tasks, lengths, seed=seed)
    model = load_model(model_name, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    announce("niah", plan(model, tasks, lengths, depths, samples, where=where))
    results = run_niah(
        data_parallel(HFGenerator(model, loaded_tokenizer), batch_size), loaded_tokenizer, tasks=tasks,
        lengths=lengths, depths=depths, samples=samples, batch_size=global_batch_size(batch_size), seed=seed,
        progress=progress,
    )
    results.update(model=model_name, **environment())
    markdown = results_markdown(results, f"Needle in a haystack: {model_name}")
    plot_heatmap(results, folder / "niah_heatmap.png", f"Needle in a haystack: {Path(model_name).name}")
    write_results(folder, results, markdown + "\n![heatmap](niah_heatmap.png)\n")
    return markdown
