"""The one training loop of the applications (S3 training for `m2rnn eval s3` users and the demo, both healing
stages) and the one learning-rate schedule each of them configures."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

DECAYS = ("cosine", "constant")


@dataclass(frozen=True)
class Schedule:
    """Learning-rate factor per step (0-based): a linear warm-up over `warmup` steps, then `decay`.

    The warm-up rises to 1 as (step + 1) / warmup, or, with `warmup_from`, from that factor as step / warmup.
    "cosine" then falls to `floor` at `steps` (and stays there), "constant" stays at 1.
    """

    steps: int
    warmup: int = 0
    decay: str = "cosine"
    floor: float = 0.0
    warmup_from: float | None = None

    def __post_init__(self) -> None:
        if self.decay not in DECAYS:
            raise ValueError(f"Schedule: decay={self.decay!r} is not one of {', '.join(map(repr, DECAYS))}")
        if self.steps < 1 or self.warmup < 0 or not 0 <= self.floor <= 1:
            raise ValueError(f"Schedule: needs steps >= 1, warmup >= 0 and floor in [0, 1], got steps={self.steps}, "
                             f"warmup={self.warmup}, floor={self.floor}")

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            if self.warmup_from is None:
                return (step + 1) / self.warmup
            return self.warmup_from + (1 - self.warmup_from) * step / self.warmup
        if self.decay == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.steps - self.warmup))
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class Step:
    """One finished optimizer step, as `train_loop` yields it."""

    index: int  # 0-based
    loss: torch.Tensor
    lr: float  # of the first parameter group
    bar: Any

    def show(self, **values: Any) -> None:
        """Show `values` after the progress bar."""
        self.bar.set_postfix(values)


def train_loop(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: Schedule,
    step_loss: Callable[[int], torch.Tensor],
    *,
    steps: int | None = None,
    max_grad_norm: float | None = None,
    progress: bool = True,
    description: str = "train",
) -> Iterator[Step]:
    """Train `model`: per step, every parameter group's lr = its initial lr × `schedule(step)`, `step_loss(step)`
    in train mode, backward, gradient clipping to `max_grad_norm` (None: none), optimizer step; then yield the
    `Step` (the caller logs, evaluates, or stops by breaking out). `steps` defaults to `schedule.steps`; fewer
    stops early with the schedule unchanged. The model is left in eval mode."""
    groups = optimizer.param_groups
    base_lrs = [group["lr"] for group in groups]
    parameters = [p for p in model.parameters() if p.requires_grad]  # in model order: the norm sums in that order
    total = schedule.steps if steps is None else steps
    bar = tqdm(range(total), desc=description, disable=not progress, dynamic_ncols=True, leave=True)
    try:
        for index in bar:
            factor = schedule(index)
            for group, lr in zip(groups, base_lrs):
                group["lr"] = lr * factor
            model.train()
            loss = step_loss(index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
            optimizer.step()
            yield Step(index, loss, groups[0]["lr"], bar)
    finally:
        bar.close()
        for group, lr in zip(groups, base_lrs):
            group["lr"] = lr
        model.eval()
