"""S3 state tracking: data, training, evaluation, plot and table for any causal LM.

The task (from the M2RNN paper, arXiv 2603.14360): read a sequence x_1 … x_T of elements of S3, the symmetric group on
{0, 1, 2}, and predict at every position t the running product p_t of the elements read so far. A model that
keeps a faithful state generalises to lengths it never saw; a linear RNN such as Gated DeltaNet with gates in
[0, 1] cannot represent the non-abelian group and fails past its training length.

Conventions
-----------
- Elements are the 6 permutations of (0, 1, 2) in lexicographic order (`ELEMENTS`); token id i is `ELEMENTS[i]`,
  so ids 0..5 are group elements and id 0 is the identity. A model's vocabulary may be larger.
- A permutation ``p`` is a tuple with ``p[i]`` the image of ``i``. Composition ``(a ∘ b)[i] = a[b[i]]``
  (apply ``b`` first).
- Running product: ``p_1 = x_1`` and ``p_t = x_t ∘ p_{t-1}`` — apply x_1 first, then x_2, …, then x_t.
- Targets are not shifted: the logits at position t (which has read x_1..x_t) are scored against p_t.

Metrics (`hit_metrics`), leading with the paper's:
- **cumulative sequence accuracy** at length t: the share of sequences whose every prediction up to t is right
  (``hits.cumprod(1)[:, t-1].mean()``); a model that loses track scores 0, not chance;
- per-token accuracy over positions 1..t and the accuracy at position t (chance 1/6 for both).
The paper measures all lengths as prefixes of one set of 1,000 sequences of length 512 (`evaluate_s3_prefixes`);
`evaluate_s3` draws fresh sequences per length. For a causal model both estimate the same quantities.

The engine is model-agnostic: any module whose ``forward(input_ids)`` returns an object with ``.logits`` of shape
(B, S, vocab ≥ 6) can be trained and evaluated.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..training_loop import Schedule, train_loop

# ---------------------------------------------------------------------------------------------------- the group

ELEMENTS: tuple[tuple[int, int, int], ...] = tuple(itertools.permutations(range(3)))
NUM_ELEMENTS = len(ELEMENTS)  # 6
IDENTITY = ELEMENTS.index((0, 1, 2))  # 0


def compose(a: Sequence[int], b: Sequence[int]) -> tuple[int, ...]:
    """``a ∘ b``: the permutation that applies ``b`` first, then ``a``."""
    return tuple(a[b[i]] for i in range(len(b)))


def composition_table() -> torch.Tensor:
    """(6, 6) long tensor ``T`` with ``T[a, b] = id(ELEMENTS[a] ∘ ELEMENTS[b])``, built by explicit composition."""
    table = torch.empty(NUM_ELEMENTS, NUM_ELEMENTS, dtype=torch.long)
    for a, pa in enumerate(ELEMENTS):
        for b, pb in enumerate(ELEMENTS):
            table[a, b] = ELEMENTS.index(compose(pa, pb))
    return table


TABLE = composition_table()


def element_name(index: int) -> str:
    """Human-readable cycle notation of element `index`, e.g. ``e``, ``(0 1)``, ``(0 1 2)``."""
    perm = ELEMENTS[index]
    seen, cycles = set(), []
    for start in range(3):
        if start in seen or perm[start] == start:
            seen.add(start)
            continue
        cycle, i = [], start
        while i not in seen:
            seen.add(i)
            cycle.append(i)
            i = perm[i]
        cycles.append("(" + " ".join(map(str, cycle)) + ")")
    return "".join(cycles) or "e"


def running_products(elements: torch.Tensor) -> torch.Tensor:
    """Running products ``p_t = x_t ∘ p_{t-1}`` (``p_1 = x_1``) of a (B, S) long tensor of element ids."""
    table = TABLE.to(elements.device)
    products = torch.empty_like(elements)
    state = torch.full_like(elements[:, 0], IDENTITY) if elements.shape[1] else None
    for t in range(elements.shape[1]):
        state = table[elements[:, t], state]
        products[:, t] = state
    return products


def sample_fixed_dataset(size: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed training set of `size` sequences (the harness's recipe trains epochs over 100k sequences of 128)."""
    return sample_batch(size, length, torch.Generator().manual_seed(seed))


def sample_batch(
    batch_size: int, length: int, generator: torch.Generator, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform random sequences: ``(input_ids, targets)``, both (batch_size, length) long tensors on `device`."""
    elements = torch.randint(0, NUM_ELEMENTS, (batch_size, length), generator=generator)
    return elements.to(device), running_products(elements).to(device)


# ---------------------------------------------------------------------------------------------------- training


def curriculum_lengths(curriculum: str | Sequence[int] | None, train_length: int) -> list[int]:
    """The lengths a run visits: `None` = train_length only; a list = those lengths; "doubling" = 4, 8, … ≤ L."""
    if curriculum is None:
        return [train_length]
    if curriculum == "doubling":
        lengths, n = [], 4
        while n < train_length:
            lengths.append(n)
            n *= 2
        return lengths + [train_length]
    lengths = [int(n) for n in curriculum]
    if not lengths or any(n <= 0 for n in lengths):
        raise ValueError(f"train_s3: `curriculum`={curriculum!r} must be None, 'doubling' or positive lengths")
    return lengths


def s3_schedule(schedule: str, steps: int, warmup: int) -> Schedule:
    """The learning-rate `Schedule` named `schedule`: "constant" or "cosine" (to 5%) after a linear warm-up over
    `warmup` steps, or "onecycle" (from 10% up to the peak at 30% of the steps, then cosine to 1%)."""
    if schedule == "constant":
        return Schedule(steps, warmup, decay="constant")
    if schedule == "cosine":
        return Schedule(steps, warmup, floor=0.05)
    if schedule == "onecycle":
        return Schedule(steps, max(1, int(0.3 * steps)), floor=0.01, warmup_from=0.1)
    raise ValueError(f"train_s3: `schedule`={schedule!r} is not one of 'constant', 'cosine', 'onecycle'")


def s3_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy at every position (no shift) and the argmax accuracy, over the model's whole vocabulary."""
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    accuracy = (logits.argmax(-1) == targets).float().mean()
    return loss, accuracy


@dataclass
class S3History:
    """What `train_s3` did: per logged step the length, lr, loss and batch accuracy; and the wall time."""

    steps: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("steps", "lengths", "lrs", "losses", "accuracies", "seconds")}


def train_s3(
    model: torch.nn.Module,
    *,
    train_length: int = 32,
    steps: int = 1000,
    batch_size: int = 64,
    lr: float = 3e-3,
    schedule: str = "cosine",
    curriculum: str | Sequence[int] | None = "doubling",
    advance_at: float | None = 0.99,
    weight_decay: float = 0.01,
    warmup: int = 50,
    grad_clip: float = 1.0,
    seed: int = 0,
    progress: bool = True,
    log_every: int = 10,
    max_seconds: float | None = None,
    stop_after: int | None = None,
    dataset_size: int | None = None,
    description: str = "S3",
) -> S3History:
    """Train `model` on S3 running products with AdamW; returns an `S3History`.

    Curriculum: the run visits `curriculum_lengths(curriculum, train_length)` in order. With `advance_at`, it moves
    to the next length as soon as the mean batch accuracy of the last `log_every` steps reaches `advance_at`
    (and stays on the last length once there); without it, the steps are split evenly between the lengths.
    The lr schedule runs over all `steps` whatever the curriculum does. `max_seconds` and `stop_after` (a step
    count) stop the run early, the schedule unchanged; the history says how many steps ran.
    `dataset_size`: train on a fixed set of that many sequences of `train_length` (shuffled each epoch; a
    curriculum stage reads their prefixes) instead of fresh random batches.
    """
    lengths = curriculum_lengths(curriculum, train_length)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    order, cursor = None, 0
    if dataset_size is not None:
        if dataset_size < batch_size:
            raise ValueError(f"train_s3: `dataset_size`={dataset_size} must be at least batch_size={batch_size}")
        data_inputs, data_targets = sample_fixed_dataset(dataset_size, max(lengths), seed)
        data_inputs, data_targets = data_inputs.to(device), data_targets.to(device)
        order, cursor = torch.randperm(dataset_size, generator=generator), 0
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr,
        betas=(0.9, 0.98),
    )
    history = S3History()
    stage, recent, length = 0, [], lengths[0]
    start = time.perf_counter()
    last = min(steps, stop_after or steps) - 1

    def step_loss(step: int) -> torch.Tensor:
        nonlocal stage, length, order, cursor
        if advance_at is None:
            stage = min(len(lengths) - 1, step * len(lengths) // max(1, steps))
        length = lengths[stage]
        if dataset_size is None:
            input_ids, targets = sample_batch(batch_size, length, generator, device)
        else:
            if cursor + batch_size > dataset_size:  # new epoch (the incomplete last batch is dropped)
                order, cursor = torch.randperm(dataset_size, generator=generator), 0
            rows = order[cursor : cursor + batch_size].to(device)
            cursor += batch_size
            input_ids, targets = data_inputs[rows, :length], data_targets[rows, :length]
        loss, accuracy = s3_loss(model(input_ids).logits, targets)
        recent.append(accuracy.item())
        return loss

    for done in train_loop(model, optimizer, s3_schedule(schedule, steps, warmup), step_loss, steps=last + 1,
                           max_grad_norm=grad_clip or None, progress=progress, description=description):
        step, loss = done.index, done.loss
        out_of_time = max_seconds is not None and time.perf_counter() - start > max_seconds
        if (step + 1) % log_every == 0 or step == last or out_of_time:
            mean_acc = sum(recent) / len(recent)
            history.steps.append(step + 1)
            history.lengths.append(length)
            history.lrs.append(done.lr)
            history.losses.append(loss.item())
            history.accuracies.append(mean_acc)
            done.show(len=length, loss=f"{loss.item():.3f}", acc=f"{mean_acc:.3f}")
            if advance_at is not None and mean_acc >= advance_at and stage < len(lengths) - 1:
                stage += 1
            recent.clear()
        if out_of_time:
            break
    history.seconds = time.perf_counter() - start
    return history


# ---------------------------------------------------------------------------------------------------- evaluation


def cumulative_sequence_accuracy(hits: torch.Tensor) -> torch.Tensor:
    """(S,) share of sequences whose predictions are all right up to each position, from (B, S) boolean hits."""
    return hits.long().cumprod(dim=1).float().mean(dim=0)


def hit_metrics(hits: torch.Tensor, lengths: Iterable[int]) -> dict[int, dict[str, float]]:
    """Metrics of (B, S) boolean `hits` at each prefix length t ≤ S: ``sequence_accuracy`` (cumulative sequence
    accuracy, the paper's), ``accuracy`` (mean over positions 1..t) and ``last_accuracy`` (at position t)."""
    hits = hits.bool()
    sequence = cumulative_sequence_accuracy(hits)
    per_position = hits.float().mean(dim=0)
    running = per_position.cumsum(0)
    out = {}
    for t in lengths:
        if not 1 <= t <= hits.shape[1]:
            raise ValueError(f"hit_metrics: length {t} is outside 1..{hits.shape[1]}")
        out[t] = {"sequence_accuracy": sequence[t - 1].item(), "accuracy": running[t - 1].item() / t,
                  "last_accuracy": per_position[t - 1].item()}
    return out


@torch.no_grad()
def _hits(model: torch.nn.Module, num_samples: int, length: int, generator: torch.Generator,
          batch_size: int) -> torch.Tensor:
    device = next(model.parameters()).device
    rows = []
    for done in range(0, num_samples, batch_size):
        input_ids, targets = sample_batch(min(batch_size, num_samples - done), length, generator, device)
        rows.append((model(input_ids).logits.argmax(-1) == targets).cpu())
    return torch.cat(rows)


def _evaluating(model: torch.nn.Module):
    was_training = model.training
    model.eval()
    return was_training


def evaluate_s3(
    model: torch.nn.Module,
    lengths: Iterable[int],
    num_samples: int = 256,
    seed: int = 1234,
    batch_size: int = 256,
    progress: bool = False,
) -> dict[int, dict[str, float]]:
    """`hit_metrics` by length, each length on its own `num_samples` fresh random sequences.

    Returns ``{length: {"sequence_accuracy", "accuracy", "last_accuracy"}}``. The prediction is the argmax over the
    model's whole vocabulary. `seed` is distinct from training seeds by default so that sequences are held out.
    """
    was_training = _evaluating(model)
    results: dict[int, dict[str, float]] = {}
    for length in tqdm(list(lengths), desc="evaluate", disable=not progress, dynamic_ncols=True):
        hits = _hits(model, num_samples, length, torch.Generator().manual_seed(seed + length), batch_size)
        results[length] = hit_metrics(hits, [length])[length]
    model.train(was_training)
    return results


def evaluate_s3_prefixes(
    model: torch.nn.Module,
    lengths: Iterable[int],
    num_samples: int = 1000,
    seed: int = 1234,
    batch_size: int = 250,
) -> dict[int, dict[str, float]]:
    """The paper's measurement: `num_samples` sequences of length max(`lengths`), every metric read at each length
    as a prefix of the same sequences (so the curve of cumulative sequence accuracy never rises)."""
    lengths = sorted(lengths)
    was_training = _evaluating(model)
    hits = _hits(model, num_samples, lengths[-1], torch.Generator().manual_seed(seed), batch_size)
    model.train(was_training)
    return hit_metrics(hits, lengths)


# ---------------------------------------------------------------------------------------------------- reporting


def _percent(result: Mapping[str, float] | None, key: str) -> str:
    value = None if result is None else result.get(key)
    return "–" if value is None else f"{100 * value:.1f}"


def results_table(
    results_by_model: Mapping[str, Mapping[int, Mapping[str, float]]], train_length: int | None = None
) -> str:
    """Markdown table: one row per model, one column per length, cells "sequence % (token % / last %)" — the
    cumulative sequence accuracy first, the per-token and last-position accuracy beside it."""
    lengths = sorted({n for results in results_by_model.values() for n in results})
    def header(n: int) -> str:
        return f"{n}{' (train)' if n == train_length else ''}"
    lines = [
        "| model | " + " | ".join(header(n) for n in lengths) + " |",
        "|---|" + "---|" * len(lengths),
    ]
    for name, results in results_by_model.items():
        cells = []
        for n in lengths:
            r = results.get(n)
            cells.append("–" if r is None else f"**{_percent(r, 'sequence_accuracy')}** "
                         f"({_percent(r, 'accuracy')} / {_percent(r, 'last_accuracy')})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Cells: **cumulative sequence accuracy %** (all predictions up to that length right; a model that "
                 "loses track scores 0) (per-token accuracy % / accuracy at the last position %, chance 16.7%).")
    return "\n".join(lines)


def plot_s3(
    results_by_model: Mapping[str, Mapping[int, Mapping[str, float]]],
    path: str | Path,
    train_length: int | None = None,
    title: str = "S3 state tracking: cumulative sequence accuracy vs length",
    per_token: bool = True,
) -> Path:
    """PNG of cumulative sequence accuracy vs length per model (solid) and, with `per_token`, the per-token accuracy
    (dotted) with its chance level; a dashed line at `train_length`."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=120)
    for name, results in results_by_model.items():
        lengths = sorted(results)
        sequence = [100 * results[n].get("sequence_accuracy", float("nan")) for n in lengths]
        (line,) = ax.plot(lengths, sequence, marker="o", label=f"{name}: sequence" if per_token else name)
        if per_token:
            ax.plot(lengths, [100 * results[n]["accuracy"] for n in lengths], marker=".", linestyle=":",
                    linewidth=1, color=line.get_color(), label=f"{name}: per token")
    if per_token:
        ax.axhline(100 / NUM_ELEMENTS, color="grey", linestyle=":", linewidth=1, label="per-token chance (16.7%)")
    if train_length is not None:
        ax.axvline(train_length, color="black", linestyle="--", linewidth=1, label=f"training length {train_length}")
    ax.set_xscale("log", base=2)
    ticks = sorted({n for results in results_by_model.values() for n in results})
    ax.set_xticks(ticks, [str(n) for n in ticks])
    ax.minorticks_off()
    ax.set_xlabel("sequence length")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def save_results(results_by_model: Mapping[str, Mapping[int, Mapping[str, float]]], path: str | Path, **extra) -> Path:
    """JSON with the results (lengths as strings, JSON keys) and any `extra` metadata."""
    path = Path(path)
    payload = {"results": {m: {str(n): r for n, r in res.items()} for m, res in results_by_model.items()}, **extra}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def write_evaluation(
    folder: Path, model_name: str, lengths: Sequence[int], *, num_samples: int = 256, seed: int = 1234,
    batch_size: int = 64, train_length: int | None = None, progress: bool = True, device: str | None = None,
    dtype: str | None = None, trust_remote_code: bool = False,
) -> str:
    """`m2rnn eval s3`: load the model, measure it at each length and write results.json, results.md and the
    accuracy plot into `folder`; returns the markdown table."""
    from .common import announce, environment, load_model, write_results

    model = load_model(model_name, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    tokens = num_samples * sum(lengths)
    announce("s3", f"{len(lengths)} lengths ({lengths[0]}…{lengths[-1]}) × {num_samples} sequences = "
             f"{tokens / 1e6:.2f}M tokens on {next(model.parameters()).device.type}")
    results = evaluate_s3(model, lengths, num_samples=num_samples, seed=seed, batch_size=batch_size,
                          progress=progress)
    name = Path(model_name).name or model_name
    by_model = {name: results}
    markdown = f"# S3 state tracking: {model_name}\n\n" + results_table(by_model, train_length)
    plot_s3(by_model, folder / "s3_accuracy.png", train_length=train_length)
    payload = {"results": {name: {str(n): r for n, r in results.items()}}, "model": model_name,
               "num_samples": num_samples, "seed": seed, "train_length": train_length, **environment()}
    write_results(folder, payload, markdown + "\n\n![accuracy](s3_accuracy.png)\n")
    return markdown
