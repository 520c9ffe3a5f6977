"""Heal a model after `swap_layers`: train the new M2RNN layers to stand in for the layers they replaced.

Teacher = the model before the swap; student = the swapped model (same size, vocabulary and depth; the swapped
layers' `mixer_types` entries changed to "m2rnn").

Stage 1, layer matching: for every swapped layer i, the teacher's mixer i reads x (the normed hidden state of
the teacher's own forward) and writes y. The student's new mixer i gets the same x and is trained on
MSE(mixer(x), y). Only the new mixers' parameters train; everything else stays bit for bit as it was. Each new
layer learns in isolation, on the inputs it will see once the rest of the model is unchanged.

Stage 2, distillation: the whole student learns the teacher's next-token distribution,
T² · KL(softmax(teacher / T) ‖ softmax(student / T)) per token (plus `ce_weight` × the usual LM loss), with LoRA
adapters (peft) on the usual projections and the new M2RNN layers fully trainable (see `HealSettings.new_layers`),
or with every parameter trainable (`stage2="full"`). LoRA adapters are merged at the end, so the healed model is a
plain M2RNN checkpoint.

Held-out numbers (before, after stage 1, after stage 2): the replaced-layer MSE (and MSE / mean y², "relative"),
KL(teacher ‖ student) at temperature 1 in nats per token, and both models' LM loss.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from m2rnn.modeling_m2rnn import M2RNNForCausalLM, M2RNNMixer
from m2rnn.training import default_lora_targets
from ..options import format_duration
from ..training_loop import Schedule, train_loop
from .data import HealError, TextBlocks, batches, eval_batches

STAGE2_MODES = ("lora", "full", "none")
NEW_LAYER_MODES = ("full", "lora")
# Linear layers that get LoRA adapters in stage 2, by name: every mixer's main projections and the MLP's (MoE
# experts included); the GDN gate projections in_proj_a / in_proj_b (one output per head) stay frozen.
DEFAULT_LORA_TARGETS = tuple(default_lora_targets(mlp=True))


# Defaults of what makes a run long, by device: a CPU run of a tiny model finishes in minutes on 2 cores; a GPU
# run does more of everything. `HealSettings()` carries the GPU values; `HealSettings.for_device` picks.
DEVICE_DEFAULTS = {
    "cpu": {"block_size": 64, "batch_size": 8, "stage1_steps": 60, "stage2_steps": 60, "eval_every": 20,
            "max_eval_blocks": 8},
    "gpu": {"block_size": 256, "batch_size": 8, "stage1_steps": 200, "stage2_steps": 200, "eval_every": 50,
            "max_eval_blocks": 64},
}


def device_kind(device: torch.device | str) -> str:
    """"cpu" or "gpu": which column of `DEVICE_DEFAULTS` a device uses."""
    return "cpu" if torch.device(device).type == "cpu" else "gpu"


@dataclass
class HealSettings:
    """What healing does and how long. `layers=None` finds the swapped layers from the two configs.

    `stage2`: "lora" (adapters on `lora_targets`, merged at the end), "full" (every parameter trains) or "none".
    `new_layers`: how the new M2RNN layers train in stage 2 with LoRA. "full" (default): all their parameters
    train, since they are new layers, not a pretrained base to keep close to, and their gate, state matrix W and
    residual D are not linear layers LoRA could adapt. "lora": adapters on their `in_proj` / `out_proj` only.
    """

    layers: Sequence[int] | None = None
    batch_size: int = 8
    stage1_steps: int = 200
    stage1_lr: float = 1e-3
    stage2: str = "lora"
    stage2_steps: int = 200
    stage2_lr: float = 5e-4
    temperature: float = 1.0
    ce_weight: float = 0.0
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: Sequence[str] = DEFAULT_LORA_TARGETS
    new_layers: str = "full"
    eval_every: int = 50
    max_eval_blocks: int | None = 64
    warmup_fraction: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    progress: bool = True

    @classmethod
    def for_device(cls, device: torch.device | str, **overrides: Any) -> HealSettings:
        """Settings with the device's defaults (`DEVICE_DEFAULTS`, block size excepted), then `overrides` (None
        values keep the default)."""
        defaults = {k: v for k, v in DEVICE_DEFAULTS[device_kind(device)].items() if k != "block_size"}
        return cls(**{**defaults, **{k: v for k, v in overrides.items() if v is not None}})

    def __post_init__(self) -> None:
        if self.stage2 not in STAGE2_MODES:
            raise HealError(f"stage2={self.stage2!r} must be one of {STAGE2_MODES}")
        if self.new_layers not in NEW_LAYER_MODES:
            raise HealError(f"new_layers={self.new_layers!r} must be one of {NEW_LAYER_MODES}")
        for key in ("batch_size", "eval_every", "lora_rank"):
            if getattr(self, key) < 1:
                raise HealError(f"{key}={getattr(self, key)!r} must be at least 1")
        for key in ("stage1_steps", "stage2_steps", "ce_weight", "weight_decay", "lora_dropout"):
            if getattr(self, key) < 0:
                raise HealError(f"{key}={getattr(self, key)!r} must not be negative")
        for key in ("stage1_lr", "stage2_lr", "temperature", "lora_alpha"):
            if not getattr(self, key) > 0:
                raise HealError(f"{key}={getattr(self, key)!r} must be positive")
        if not 0 <= self.warmup_fraction < 1:
            raise HealError(f"warmup_fraction={self.warmup_fraction!r} must be in [0, 1)")
        if self.max_eval_blocks is not None and self.max_eval_blocks < 1:
            raise HealError(f"max_eval_blocks={self.max_eval_blocks!r} must be at least 1 (or None for all)")


@dataclass
class StageLog:
    """One stage's curves: the training loss at every step, the held-out loss at step 0 and every `eval_every`."""

    name: str
    train_loss_name: str
    eval_loss_name: str
    train: list[tuple[int, float]] = field(default_factory=list)
    eval: list[tuple[int, float]] = field(default_factory=list)
    trainable_parameters: int = 0
    seconds: float = 0.0


@dataclass
class HealResult:
    """Which layers were healed, the held-out numbers before / after each stage, and the curves."""

    layers: list[int]
    before: dict[str, Any]
    after_stage1: dict[str, Any]
    after: dict[str, Any]
    stages: list[StageLog]
    settings: dict[str, Any]
    data: dict[str, Any]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------------
# Which layers: teacher config vs student config
# ---------------------------------------------------------------------------------------------------------------
PAIRED_KEYS = ("num_hidden_layers", "vocab_size", "hidden_size")


def swapped_layers(teacher_config: Any, student_config: Any, layers: Sequence[int] | None = None) -> list[int]:
    """The layers to heal: `layers` if given (each must be an M2RNN layer of the student), else every layer whose
    mixer type is "m2rnn" in the student and something else in the teacher. Raises `HealError` naming the key
    when the two models do not pair."""
    for config, role in ((teacher_config, "teacher"), (student_config, "student")):
        if getattr(config, "mixer_types", None) is None:
            raise HealError(
                f"the {role} is model_type={getattr(config, 'model_type', None)!r}, not an M2RNN-family model "
                "(convert it first: m2rnn convert)"
            )
    for key in PAIRED_KEYS:
        teacher_value, student_value = getattr(teacher_config, key), getattr(student_config, key)
        if teacher_value != student_value:
            raise HealError(f"teacher and student differ in `{key}`: teacher {teacher_value}, student {student_value}")
    teacher_types, student_types = list(teacher_config.mixer_types), list(student_config.mixer_types)
    changed = [i for i, (t, s) in enumerate(zip(teacher_types, student_types)) if t != s]
    for i in changed:
        if student_types[i] != "m2rnn":
            raise HealError(
                f"`mixer_types[{i}]` is {teacher_types[i]!r} in the teacher and {student_types[i]!r} in the student; "
                "only layers swapped to 'm2rnn' can be healed"
            )
    if layers is None:
        if not changed:
            raise HealError(
                f"no swapped layer found: the student's `mixer_types` equal the teacher's ({student_types}); "
                "pass `layers` (--layers) to name M2RNN layers to heal"
            )
        return changed
    layers = list(layers)
    if not layers:
        raise HealError("`layers` is empty")
    if len(set(layers)) != len(layers):
        raise HealError(f"`layers`={layers} repeats a layer")
    for i in layers:
        if not isinstance(i, int) or not 0 <= i < len(student_types):
            raise HealError(f"`layers` entry {i!r} is outside 0..{len(student_types) - 1}")
        if student_types[i] != "m2rnn":
            raise HealError(f"`layers` entry {i}: the student's layer {i} is {student_types[i]!r}, not 'm2rnn'")
    return sorted(layers)


def _check_models(teacher: nn.Module, student: nn.Module) -> None:
    for model, role in ((teacher, "teacher"), (student, "student")):
        if not isinstance(model, M2RNNForCausalLM):
            raise HealError(f"the {role} is a {type(model).__name__}; healing needs two M2RNNForCausalLM models")
    teacher_device, student_device = _device(teacher), _device(student)
    if teacher_device != student_device:
        raise HealError(f"teacher is on {teacher_device} and student on {student_device}; put both on one device")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def new_mixer(student: M2RNNForCausalLM, layer: int) -> M2RNNMixer:
    return student.model.layers[layer].mixer


# ---------------------------------------------------------------------------------------------------------------
# What a teacher mixer reads and writes
# ---------------------------------------------------------------------------------------------------------------
class _StopForward(Exception):
    """Raised by a hook once the deepest needed layer has run, so the rest of the forward is skipped."""


@contextlib.contextmanager
def record_mixers(
    model: M2RNNForCausalLM, layers: Sequence[int], stop_after_last: bool = False
) -> Iterator[dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Within the block, every forward of `model` fills `{layer: (mixer input, mixer output)}` for `layers`.

    The input is what the mixer was called with: for the usual pre-norm block, `input_layernorm(hidden state)`.
    With `stop_after_last`, the forward is cut short (`_StopForward`) after the deepest of `layers`.
    """
    records: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    last = max(layers)

    def hook_for(layer: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            records[layer] = (hidden.detach(), (output[0] if isinstance(output, tuple) else output).detach())
            if stop_after_last and layer == last:
                raise _StopForward

        return hook

    handles = [
        model.model.layers[i].mixer.register_forward_hook(hook_for(i), with_kwargs=True) for i in layers
    ]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def teacher_mixer_io(
    teacher: M2RNNForCausalLM, input_ids: torch.Tensor, layers: Sequence[int]
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """`{layer: (x, y)}`: what the teacher's mixer of each layer reads and writes on `input_ids` (the forward stops
    after the deepest layer)."""
    with record_mixers(teacher, layers, stop_after_last=True) as records:
        try:
            teacher.model(input_ids=input_ids, use_cache=False)
        except _StopForward:
            pass
    return dict(records)


# ---------------------------------------------------------------------------------------------------------------
# Held-out measures
# ---------------------------------------------------------------------------------------------------------------
def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """T² · KL(softmax(teacher / T) ‖ softmax(student / T)), averaged over tokens (nats per token at T = 1)."""
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1).flatten(0, -2)
    teacher_log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=-1).flatten(0, -2)
    kl = F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="batchmean")
    return kl * temperature**2


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of `logits` on `input_ids` (nats per token)."""
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), input_ids[:, 1:].flatten())


@torch.no_grad()
def replaced_layer_mse(
    teacher: M2RNNForCausalLM, student: M2RNNForCausalLM, blocks: torch.Tensor, layers: Sequence[int],
    batch_size: int = 8,
) -> dict[int, dict[str, float]]:
    """Per layer: MSE between the student's new mixer and the teacher's mixer on the teacher's mixer inputs,
    and that MSE divided by the mean square of the teacher mixer's output ("relative_mse")."""
    was_training = student.training
    student.eval()
    squared_error = {i: 0.0 for i in layers}
    power = {i: 0.0 for i in layers}
    for ids in eval_batches(blocks, batch_size):
        records = teacher_mixer_io(teacher, ids.to(_device(teacher)), layers)
        for i, (x, y) in records.items():
            squared_error[i] += (new_mixer(student, i)(x).float() - y.float()).pow(2).sum().item()
            power[i] += y.float().pow(2).sum().item()
    student.train(was_training)
    count = blocks.numel() * teacher.config.hidden_size
    return {
        i: {"mse": squared_error[i] / count, "relative_mse": squared_error[i] / max(power[i], 1e-30)} for i in layers
    }


@torch.no_grad()
def distillation_kl(teacher: nn.Module, student: nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """KL(teacher ‖ student) at temperature 1, nats per token, over `blocks`."""
    was_training = student.training
    student.eval()
    total = 0.0
    for ids in eval_batches(blocks, batch_size):
        ids = ids.to(_device(teacher))
        teacher_logits = teacher(input_ids=ids, use_cache=False).logits
        student_logits = student(input_ids=ids, use_cache=False).logits
        total += distillation_loss(student_logits, teacher_logits).item() * ids.numel()
    student.train(was_training)
    return total / blocks.numel()


@torch.no_grad()
def evaluate(
    teacher: M2RNNForCausalLM, student: M2RNNForCausalLM, blocks: torch.Tensor, layers: Sequence[int],
    batch_size: int = 8,
) -> dict[str, Any]:
    """All held-out numbers: replaced-layer MSE per layer, KL(teacher ‖ student), both models' LM loss."""
    was_training = student.training
    student.eval()
    kl = student_loss = teacher_loss = 0.0
    for ids in eval_batches(blocks, batch_size):
        ids = ids.to(_device(teacher))
        teacher_logits = teacher(input_ids=ids, use_cache=False).logits
        student_logits = student(input_ids=ids, use_cache=False).logits
        kl += distillation_loss(student_logits, teacher_logits).item() * ids.numel()
        student_loss += lm_loss(student_logits, ids).item() * ids.numel()
        teacher_loss += lm_loss(teacher_logits, ids).item() * ids.numel()
    student.train(was_training)
    tokens = blocks.numel()
    return {
        "replaced_layer_mse": {str(i): value for i, value in replaced_layer_mse(
            teacher, student, blocks, layers, batch_size).items()},
        "kl": kl / tokens,
        "student_lm_loss": student_loss / tokens,
        "teacher_lm_loss": teacher_loss / tokens,
    }


def mean_layer_mse(measures: dict[str, Any]) -> float:
    """The replaced-layer MSE averaged over the healed layers (what stage 1 minimises)."""
    values = [entry["mse"] for entry in measures["replaced_layer_mse"].values()]
    return sum(values) / len(values)


# ---------------------------------------------------------------------------------------------------------------
# Training loop shared by both stages
# ---------------------------------------------------------------------------------------------------------------
def _run_stage(
    log: StageLog,
    model: nn.Module,
    step_loss: Callable[[torch.Tensor], torch.Tensor],
    held_out_loss: Callable[[], float],
    train_blocks: torch.Tensor,
    steps: int,
    lr: float,
    settings: HealSettings,
) -> StageLog:
    """AdamW on the model's trainable parameters for `steps` batches (`train_loop`: linear warm-up over
    `warmup_fraction` of the steps, then cosine decay to 10% of `lr`), with periodic held-out loss."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    log.trainable_parameters = sum(p.numel() for p in parameters)
    if not parameters:
        raise HealError(f"{log.name}: nothing to train")
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=settings.weight_decay)
    schedule = Schedule(steps, warmup=max(1, round(settings.warmup_fraction * steps)), floor=0.1)
    generator = torch.Generator().manual_seed(settings.seed)
    stream = batches(train_blocks, settings.batch_size, generator)
    start = time.perf_counter()
    log.eval.append((0, held_out_loss()))
    for done in train_loop(model, optimizer, schedule, lambda step: step_loss(next(stream)),
                           max_grad_norm=settings.max_grad_norm, progress=settings.progress, description=log.name):
        step = done.index + 1
        log.train.append((step, done.loss.item()))
        if step % settings.eval_every == 0 or step == steps:
            log.eval.append((step, held_out_loss()))
        done.show(train=f"{log.train[-1][1]:.4g}", eval=f"{log.eval[-1][1]:.4g}")
    log.seconds = time.perf_counter() - start
    return log


# ---------------------------------------------------------------------------------------------------------------
# The two stages
# ---------------------------------------------------------------------------------------------------------------
def heal_stage1(
    teacher: M2RNNForCausalLM, student: M2RNNForCausalLM, blocks: TextBlocks, layers: Sequence[int],
    settings: HealSettings,
) -> StageLog:
    """Train only the new mixers of `layers` on MSE against the teacher's mixers, on the teacher's mixer inputs."""
    eval_blocks = blocks.eval[: settings.max_eval_blocks]
    student.requires_grad_(False)
    for i in layers:
        new_mixer(student, i).requires_grad_(True)
    device = _device(student)

    def step_loss(ids: torch.Tensor) -> torch.Tensor:
        records = teacher_mixer_io(teacher, ids.to(device), layers)
        losses = [F.mse_loss(new_mixer(student, i)(x).float(), y.float()) for i, (x, y) in records.items()]
        return torch.stack(losses).mean()

    def held_out_loss() -> float:
        per_layer = replaced_layer_mse(teacher, student, eval_blocks, layers, settings.batch_size)
        return sum(entry["mse"] for entry in per_layer.values()) / len(per_layer)

    log = StageLog("stage 1: layer matching", "mixer MSE (train)", "mixer MSE (held-out)")
    try:
        return _run_stage(log, student, step_loss, held_out_loss, blocks.train, settings.stage1_steps,
                          settings.stage1_lr, settings)
    finally:
        student.requires_grad_(True)  # the freeze is this stage's business only


def lora_target_names(student: M2RNNForCausalLM, layers: Sequence[int], settings: HealSettings) -> list[str]:
    """Full names of the linear layers that get LoRA adapters (the new mixers' only with `new_layers="lora"`)."""
    new_prefixes = tuple(f"model.layers.{i}.mixer." for i in layers)
    names = []
    for name, module in student.named_modules():
        if not isinstance(module, nn.Linear) or name.rsplit(".", 1)[-1] not in settings.lora_targets:
            continue
        if settings.new_layers == "full" and name.startswith(new_prefixes):
            continue
        names.append(name)
    if not names:
        raise HealError(f"lora_targets={list(settings.lora_targets)} match no linear layer of the student")
    return names


def attach_lora(student: M2RNNForCausalLM, layers: Sequence[int], settings: HealSettings) -> nn.Module:
    """The student wrapped by peft with LoRA adapters; with `new_layers="full"` the new mixers train in full."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise HealError("stage2='lora' needs peft (pip install peft); or use stage2='full'") from error
    config = LoraConfig(
        r=settings.lora_rank, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
        target_modules=lora_target_names(student, layers, settings), task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():  # peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing`
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(student, config)
    if settings.new_layers == "full":
        for i in layers:
            new_mixer(student, i).requires_grad_(True)  # `student` is the model peft wraps, modified in place
    return model


def heal_stage2(
    teacher: M2RNNForCausalLM, student: M2RNNForCausalLM, blocks: TextBlocks, layers: Sequence[int],
    settings: HealSettings,
) -> tuple[M2RNNForCausalLM, StageLog]:
    """Distil the teacher into the whole student (LoRA or full); returns the student (adapters merged) and the log."""
    eval_blocks = blocks.eval[: settings.max_eval_blocks]
    if settings.stage2 == "lora":
        model = attach_lora(student, layers, settings)
    else:
        student.requires_grad_(True)
        model = student
    device = _device(student)

    def step_loss(ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(device)
        with torch.no_grad():
            teacher_logits = teacher(input_ids=ids, use_cache=False).logits
        student_logits = model(input_ids=ids, use_cache=False).logits
        loss = distillation_loss(student_logits, teacher_logits, settings.temperature)
        if settings.ce_weight:
            loss = loss + settings.ce_weight * lm_loss(student_logits, ids)
        return loss

    def held_out_loss() -> float:
        return distillation_kl(teacher, model, eval_blocks, settings.batch_size)

    train_name = f"T²·KL at T={settings.temperature:g}"
    if settings.ce_weight:
        train_name += f" + {settings.ce_weight:g}·CE"
    log = StageLog(f"stage 2: distillation ({settings.stage2})", f"{train_name} (train)", "KL at T=1 (held-out)")
    _run_stage(log, model, step_loss, held_out_loss, blocks.train, settings.stage2_steps, settings.stage2_lr, settings)
    if settings.stage2 == "lora":
        student = model.merge_and_unload()
    return student, log


# ---------------------------------------------------------------------------------------------------------------
# What a run will do, and how long it will take
# ---------------------------------------------------------------------------------------------------------------
def _seconds(function: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def estimate_seconds(
    teacher: M2RNNForCausalLM, student: M2RNNForCausalLM, blocks: TextBlocks, layers: Sequence[int],
    settings: HealSettings,
) -> float:
    """A rough duration of `heal`, from timing one teacher forward and one student forward + backward on one batch
    (the student's weights do not change; its gradients are cleared)."""
    device = _device(student)
    batch = blocks.train[: settings.batch_size].to(device)
    with torch.no_grad():
        forward = _seconds(lambda: teacher(input_ids=batch, use_cache=False), device)

    def train_step() -> None:
        student(input_ids=batch, labels=batch, use_cache=False).loss.backward()

    was_training = student.training
    student.train()
    train = _seconds(train_step, device)
    student.zero_grad(set_to_none=True)
    student.train(was_training)
    depth = teacher.config.num_hidden_layers
    share = len(layers) / depth  # stage 1 trains the new mixers alone, after a forward cut at the deepest one
    stage1_step = forward * (max(layers) + 1) / depth + train * share
    eval_batches = math.ceil(min(len(blocks.eval), settings.max_eval_blocks or len(blocks.eval)) / settings.batch_size)
    measure = 3 * forward * eval_batches  # teacher and student forward, plus the truncated one for the layer MSE
    evals = {n: (n // settings.eval_every + 2) if n else 0 for n in (settings.stage1_steps, settings.stage2_steps)}
    stage2_steps = settings.stage2_steps if settings.stage2 != "none" else 0
    total = 3 * measure + settings.stage1_steps * stage1_step + evals[settings.stage1_steps] * forward * eval_batches
    total += stage2_steps * (forward + train) + (evals[settings.stage2_steps] if stage2_steps else 0) * 2 * forward * eval_batches
    return total


def describe_plan(
    teacher: M2RNNForCausalLM, student: M2RNNForCausalLM, blocks: TextBlocks, settings: HealSettings,
    source: str = "the text",
) -> list[str]:
    """Lines saying what `heal` will do (layers, data, steps, lengths) and about how long it will take."""
    layers = swapped_layers(teacher.config, student.config, settings.layers)
    device, dtype = _device(student), next(student.parameters()).dtype
    per_epoch = math.ceil(len(blocks.train) / settings.batch_size)
    measured = min(len(blocks.eval), settings.max_eval_blocks or len(blocks.eval))
    stage2 = (f"stage 2 (distillation, {settings.stage2}): {settings.stage2_steps} steps at lr {settings.stage2_lr:g}"
              if settings.stage2 != "none" and settings.stage2_steps else "no stage 2")
    seconds = estimate_seconds(teacher, student, blocks, layers, settings)
    return [
        f"healing layers {layers} of a {teacher.config.num_hidden_layers}-layer model "
        f"({student.num_parameters():,} parameters) on {device} ({str(dtype).replace('torch.', '')})",
        f"data: {blocks.train.numel() + blocks.eval.numel():,} tokens from {source} -> {len(blocks.train)} training "
        f"and {len(blocks.eval)} held-out blocks of {blocks.block_size} tokens; batch {settings.batch_size} "
        f"({per_epoch} steps per epoch)",
        f"stage 1 (layer matching): {settings.stage1_steps} steps at lr {settings.stage1_lr:g}; {stage2}; held-out "
        f"check every {settings.eval_every} steps on {measured} blocks",
        f"estimate: about {format_duration(seconds)} (from one timed batch); fewer --stage1-steps / --stage2-steps "
        "or a smaller --block-size / --batch-size run faster",
    ]


# ---------------------------------------------------------------------------------------------------------------
# Both stages
# ---------------------------------------------------------------------------------------------------------------
def heal(
    teacher: M2RNNForCausalLM, student: M2RNNForCausalLM, blocks: TextBlocks, settings: HealSettings | None = None
) -> tuple[M2RNNForCausalLM, HealResult]:
    """Heal `student` (trained in place; with LoRA the returned model is the merged one) against `teacher`.

    Returns the healed student and a `HealResult` with held-out numbers before, after stage 1 and after stage 2.
    """
    settings = settings or HealSettings()
    _check_models(teacher, student)
    layers = swapped_layers(teacher.config, student.config, settings.layers)
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    teacher.eval().requires_grad_(False)
    eval_blocks = blocks.eval[: settings.max_eval_blocks]

    def measure() -> dict[str, Any]:
        return evaluate(teacher, student, eval_blocks, layers, settings.batch_size)

    before = measure()
    stages = []
    if settings.stage1_steps:
        stages.append(heal_stage1(teacher, student, blocks, layers, settings))
    after_stage1 = measure()
    if settings.stage2 != "none" and settings.stage2_steps:
        student, stage2_log = heal_stage2(teacher, student, blocks, layers, settings)
        stages.append(stage2_log)
    student.requires_grad_(True).eval()
    after = measure()
    result = HealResult(
        layers=layers, before=before, after_stage1=after_stage1, after=after, stages=stages,
        settings={**asdict(settings), "layers": layers, "lora_targets": list(settings.lora_targets)},
        data={**blocks.summary(), "eval_blocks_measured": len(eval_blocks)},
        seconds=time.perf_counter() - started,
    )
    return student, result
