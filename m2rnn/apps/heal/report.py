"""What a healing run leaves behind besides the model: results.json, results.md and loss_curves.png."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .healing import HealResult, StageLog, mean_layer_mse

PLOT_NAME = "loss_curves.png"


def write_results(folder: str | Path, result: HealResult, extra: dict[str, Any] | None = None) -> None:
    """`results.json` (everything, including the curves), `results.md` (the before/after table) and the plot."""
    folder = Path(folder)
    record = {**(extra or {}), **result.to_dict()}
    (folder / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    (folder / "results.md").write_text(results_markdown(result, extra))
    plot_curves(result.stages, folder / PLOT_NAME)


def _row(label: str, measures: dict[str, Any], layers: list[int]) -> str:
    per_layer = [measures["replaced_layer_mse"][str(i)] for i in layers]
    mse = " | ".join(f"{entry['mse']:.4g} ({entry['relative_mse']:.3g})" for entry in per_layer)
    return f"| {label} | {mse} | {measures['kl']:.4g} | {measures['student_lm_loss']:.4f} |"


def results_markdown(result: HealResult, extra: dict[str, Any] | None = None) -> str:
    """A short report: what was healed on what, the held-out table, the stages' sizes and times."""
    layers = result.layers
    lines = ["# Healing results", ""]
    for key, value in (extra or {}).items():
        lines.append(f"- {key}: `{value}`")
    data = result.data
    lines += [
        f"- healed layers: {layers}",
        f"- data: {data['train_blocks']} training blocks, {data['eval_blocks_measured']} held-out blocks measured "
        f"(of {data['eval_blocks']}), {data['block_size']} tokens each",
        f"- teacher LM loss on the held-out blocks: {result.before['teacher_lm_loss']:.4f} nats/token",
        f"- total time: {result.seconds:.1f} s",
        "",
        "Held-out numbers. Layer MSE: the new mixer against the replaced mixer on the teacher's mixer inputs "
        "(in brackets: MSE / mean square of the teacher mixer's output). KL(teacher ‖ student) at T = 1 and the "
        "student's LM loss in nats per token.",
        "",
        "| | " + " | ".join(f"layer {i} MSE" for i in layers) + " | KL | student LM loss |",
        "|---|" + "---|" * len(layers) + "---|---|",
        _row("before healing", result.before, layers),
        _row("after stage 1", result.after_stage1, layers),
        _row("after stage 2", result.after, layers),
        "",
        "| stage | trainable parameters | steps | seconds | held-out loss first → last |",
        "|---|---|---|---|---|",
    ]
    for stage in result.stages:
        first, last = stage.eval[0][1], stage.eval[-1][1]
        lines.append(f"| {stage.name} | {stage.trainable_parameters:,} | {len(stage.train)} | {stage.seconds:.1f} | "
                     f"{first:.4g} → {last:.4g} ({stage.eval_loss_name}) |")
    lines += [
        "",
        f"Mean replaced-layer MSE {mean_layer_mse(result.before):.4g} → {mean_layer_mse(result.after):.4g}; "
        f"KL {result.before['kl']:.4g} → {result.after['kl']:.4g}.",
        "",
        f"![loss curves]({PLOT_NAME})",
        "",
    ]
    return "\n".join(lines)


def plot_curves(stages: list[StageLog], path: str | Path) -> None:
    """One panel per stage: the training loss at every step and the held-out loss at each evaluation (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = max(1, len(stages))
    figure, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    for axis, stage in zip(axes[0], stages):
        if stage.train:
            steps, losses = zip(*stage.train)
            axis.plot(steps, losses, color="tab:blue", alpha=0.6, linewidth=1, label=stage.train_loss_name)
        steps, losses = zip(*stage.eval)
        axis.plot(steps, losses, "o-", color="tab:orange", label=stage.eval_loss_name)
        axis.set_yscale("log")
        axis.set_title(stage.name)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend()
    if not stages:
        axes[0][0].set_title("no training stage ran")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
