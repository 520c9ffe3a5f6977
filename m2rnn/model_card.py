"""Model cards for M2RNN checkpoints, rendered from a config plus optional conversion metadata and results.

The template is `m2rnn/assets/model_cards/m2rnn.md` (Jinja2, the format of huggingface_hub's `ModelCard.from_template`);
this module computes what goes into it: the YAML metadata, the layer pattern, the cache sizes, how the model was
made, usage snippets and the evaluation table.

Conversion metadata is a dict (given explicitly, or stored as `config.conversion` by a converter):

    {"source": "Qwen/Qwen3.5-0.8B",           # repo id of the converted checkpoint → `base_model`
     "source_model_type": "qwen3_5",
     "swapped_layers": [0, 12],                # layers whose mixer was replaced by M2RNN
     "init": "q/k/v/out_proj copied from the GDN layer, W = I",
     "healing": {"tokens": "200M", "dataset": "HuggingFaceFW/fineweb-edu", "steps": 2000},   # or a string
     "datasets": ["HuggingFaceFW/fineweb-edu"], "license": "apache-2.0"}

Results are lm-eval's output JSON (`{"results": {task: {"acc,none": 0.5, "acc_stderr,none": 0.01}}}`) or a plain
`{task: {metric: value}}` / `{task: value}` mapping.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .training import default_lora_targets

if TYPE_CHECKING:
    from .configuration_m2rnn import M2RNNConfig

TEMPLATE_PATH = Path(__file__).resolve().parent / "assets" / "model_cards" / "m2rnn.md"
CARD_MARKER = "<!-- m2rnn-model-card"  # opens the comment every generated card carries; user-written cards lack it
DEFAULT_LICENSE = "apache-2.0"
PAPER_URL = "https://arxiv.org/abs/2603.14360"
MIXER_LETTERS = {"m2rnn": "M", "gated_deltanet": "G", "full_attention": "A"}
MIXER_NAMES = {"m2rnn": "M2RNN", "gated_deltanet": "Gated DeltaNet", "full_attention": "attention"}
CONTEXT_LENGTHS = (4096, 32768, 131072)
CONVERSION_KEYS = ("source", "source_model_type", "swapped_layers", "init", "healing", "datasets", "license")


class ModelCardError(ValueError):
    """Bad card inputs (results or conversion metadata); the message names the offending key."""


@dataclass
class LayerMemory:
    """Cache footprint of one layer for one sequence, in bytes."""

    index: int
    mixer: str
    state_shape: str  # e.g. "4 × 16 × 8" (heads × K × V), "" for attention
    state_bytes: int  # recurrent state, float32, constant in the sequence length
    conv_bytes: int  # short-conv state, constant
    kv_bytes_per_token: int  # attention keys and values, grows with the sequence


# ---------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------
def normalize_results(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """`{task: {metric: value}}` from lm-eval output or a plain mapping; stderr entries become `<metric>_stderr`."""
    if not isinstance(results, dict):
        raise ModelCardError(f"results must be a JSON object, got {type(results).__name__}")
    table = results.get("results", results)
    if not isinstance(table, dict):
        raise ModelCardError(f"results['results'] must be an object of tasks, got {type(table).__name__}")
    normalized: dict[str, dict[str, float]] = {}
    for task, metrics in table.items():
        if isinstance(metrics, (int, float)) and not isinstance(metrics, bool):
            metrics = {"score": metrics}
        if not isinstance(metrics, dict):
            raise ModelCardError(f"results[{task!r}] must be a number or an object of metrics, got {metrics!r}")
        row = {}
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # lm-eval's "alias", "samples", ...
            row[key.split(",")[0]] = float(value)  # lm-eval's "acc,none" → "acc", "acc_stderr,none" → "acc_stderr"
        if not any(not name.endswith("_stderr") for name in row):
            raise ModelCardError(f"results[{task!r}] has no numeric metric: {metrics!r}")
        normalized[task] = row
    return normalized


def _check_conversion(conversion: dict[str, Any] | None) -> dict[str, Any]:
    if conversion is None:
        return {}
    if not isinstance(conversion, dict):
        raise ModelCardError(f"conversion metadata must be a dict, got {type(conversion).__name__}")
    unknown = sorted(set(conversion) - set(CONVERSION_KEYS))
    if unknown:
        raise ModelCardError(f"conversion metadata: unknown keys {unknown}; known: {list(CONVERSION_KEYS)}")
    swapped = conversion.get("swapped_layers", [])
    if not isinstance(swapped, (list, tuple)) or not all(isinstance(i, int) for i in swapped):
        raise ModelCardError(f"conversion metadata: `swapped_layers`={swapped!r} must be a list of layer indices")
    return dict(conversion)


# ---------------------------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------------------------
def _dtype_bytes(config: M2RNNConfig) -> tuple[str, int]:
    import torch

    dtype = getattr(config, "dtype", None) or "float32"
    dtype = dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype).replace("torch.", ""), torch.float32)
    return str(dtype).replace("torch.", ""), torch.empty((), dtype=dtype).element_size()


def layer_memory(config: M2RNNConfig) -> list[LayerMemory]:
    """Per-layer cache sizes: recurrent states are float32, conv states and keys/values are in the model dtype."""
    _, width = _dtype_bytes(config)
    layers = []
    for index, mixer in enumerate(config.mixer_types):
        if mixer == "m2rnn":
            shape = f"{config.m2rnn_num_heads} × {config.m2rnn_key_head_dim} × {config.m2rnn_value_head_dim}"
            conv_channels = (config.m2rnn_num_q_heads + config.m2rnn_num_k_heads) * config.m2rnn_key_head_dim
            conv_channels += config.m2rnn_num_v_heads * config.m2rnn_value_head_dim
            conv = conv_channels * config.m2rnn_conv_kernel_size * width
        elif mixer == "gated_deltanet":
            shape = f"{config.linear_num_value_heads} × {config.linear_key_head_dim} × {config.linear_value_head_dim}"
            conv_channels = 2 * config.linear_num_key_heads * config.linear_key_head_dim
            conv_channels += config.linear_num_value_heads * config.linear_value_head_dim
            conv = conv_channels * config.linear_conv_kernel_dim * width
        else:
            shape, conv = "", 0
        kv = 2 * config.num_key_value_heads * config.head_dim * width if mixer == "full_attention" else 0
        layers.append(LayerMemory(index, mixer, shape, 4 * config.recurrent_state_size(mixer), conv, kv))
    return layers


def _format_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _format_count(count: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.1f}{suffix}"
    return str(count)


# ---------------------------------------------------------------------------------------------------------------
# Markdown pieces
# ---------------------------------------------------------------------------------------------------------------
def _layer_table(config: M2RNNConfig, memory: list[LayerMemory], swapped: set[int]) -> str:
    rows = ["| layer | mixer | MLP | recurrent state (heads × K × V, fp32) | conv state | KV cache per token |",
            "|---:|---|---|---|---:|---:|"]
    for layer in memory:
        mlp = f"MoE {config.num_experts}×top-{config.num_experts_per_tok}" if config.is_moe_layer(layer.index) else "SwiGLU"
        state = f"{layer.state_shape} = {_format_bytes(layer.state_bytes)}" if layer.state_bytes else "—"
        name = MIXER_NAMES[layer.mixer] + (" (swapped in)" if layer.index in swapped else "")
        rows.append(
            f"| {layer.index} | {name} | {mlp} | {state} | {_format_bytes(layer.conv_bytes) if layer.conv_bytes else '—'} "
            f"| {_format_bytes(layer.kv_bytes_per_token) if layer.kv_bytes_per_token else '—'} |"
        )
    return "\n".join(rows)


def _memory_summary(config: M2RNNConfig, memory: list[LayerMemory]) -> str:
    dtype, _ = _dtype_bytes(config)
    constant = sum(layer.state_bytes + layer.conv_bytes for layer in memory)
    per_token = sum(layer.kv_bytes_per_token for layer in memory)
    recurrent_layers = sum(1 for layer in memory if layer.state_bytes)
    lines = [
        f"- Recurrent layers ({recurrent_layers}): {_format_bytes(constant)} per sequence in total (float32 states, "
        f"{dtype} conv states), **constant in the sequence length**.",
    ]
    if per_token:
        attention_layers = sum(1 for layer in memory if layer.kv_bytes_per_token)
        at_lengths = ", ".join(f"{_format_bytes(per_token * n)} at {n:,} tokens" for n in CONTEXT_LENGTHS)
        lines.append(
            f"- Attention layers ({attention_layers}): KV cache of {_format_bytes(per_token)} per token ({dtype}): "
            f"{at_lengths}."
        )
        lines.append(
            f"- The whole recurrent state weighs as much as the KV cache of {constant / per_token:,.0f} tokens."
        )
    else:
        lines.append("- No attention layer: the cache does not grow with the sequence length.")
    return "\n".join(lines)


def hub_repo_id(source: Any) -> str | None:
    """`source` when it reads as a Hub repo id (`name` or `namespace/name`), None for a local path: only a repo id
    can be the card's `base_model` and a huggingface.co link."""
    if not isinstance(source, str) or source.startswith((".", "/", "~")):
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError:
        return None
    return source


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "; ".join(f"{key}: {_describe(item)}" for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_describe(item) for item in value)
    return str(value)


def _provenance(conversion: dict[str, Any]) -> str:
    if not conversion:
        return (
            "Built with the `m2rnn` package from an `M2RNNConfig` with the paper's initialisation "
            "(N(0, 0.02), residual outputs scaled by 1/√(2L), state weight W = I, D = 1)."
        )
    source = conversion.get("source")
    kind = f" (`{conversion['source_model_type']}`)" if conversion.get("source_model_type") else ""
    if hub_repo_id(source):
        lines = [f"- **Converted from** [{source}](https://huggingface.co/{source}){kind} with `m2rnn` conversion."]
    elif source:
        lines = [f"- **Converted from** `{source}`{kind} (a local checkpoint) with `m2rnn` conversion."]
    else:
        lines = [f"- **Converted from** an unnamed checkpoint{kind}."]
    swapped = conversion.get("swapped_layers") or []
    if swapped:
        lines.append(f"- **Swapped layers** (mixer replaced by M2RNN): {', '.join(map(str, swapped))}.")
    if conversion.get("init"):
        lines.append(f"- **Initialisation of the new layers:** {conversion['init']}")
    healing = conversion.get("healing")
    if isinstance(healing, dict):
        lines.append("- **Healing:** " + "; ".join(f"{key} = {_describe(value)}" for key, value in healing.items()) + ".")
    elif healing:
        lines.append(f"- **Healing:** {healing}")
    else:
        lines.append("- **Healing:** none recorded.")
    return "\n".join(lines)


def _results_table(results: dict[str, dict[str, float]]) -> str:
    rows = ["| task | metric | value | stderr |", "|---|---|---:|---:|"]
    for task, metrics in sorted(results.items()):
        for metric, value in metrics.items():
            if metric.endswith("_stderr"):
                continue
            stderr = metrics.get(f"{metric}_stderr")
            rows.append(f"| {task} | {metric} | {value:.4f} | {'' if stderr is None else f'{stderr:.4f}'} |")
    return "\n".join(rows)


def _eval_results(results: dict[str, dict[str, float]]) -> list[EvalResult]:
    return [
        EvalResult(task_type="text-generation", dataset_type=task, dataset_name=task, metric_type=metric, metric_value=value)
        for task, metrics in sorted(results.items())
        for metric, value in metrics.items()
        if not metric.endswith("_stderr")
    ]


def results_from_card(card: ModelCard) -> dict[str, dict[str, float]]:
    """The results a generated card carries in its `model-index` (so a re-render keeps them)."""
    results: dict[str, dict[str, float]] = {}
    for result in card.data.eval_results or []:
        results.setdefault(result.dataset_type, {})[result.metric_type] = float(result.metric_value)
    return results


# ---------------------------------------------------------------------------------------------------------------
# Rendering and writing
# ---------------------------------------------------------------------------------------------------------------
def render_model_card(
    config: M2RNNConfig,
    *,
    results: dict[str, Any] | None = None,
    conversion: dict[str, Any] | None = None,
    repo_id: str | None = None,
    model_name: str | None = None,
    license: str | None = None,
    datasets: list[str] | None = None,
    num_parameters: int | None = None,
) -> ModelCard:
    """The model card of a checkpoint with this config. `conversion` defaults to `config.conversion`."""
    from . import __version__

    conversion = _check_conversion(conversion if conversion is not None else getattr(config, "conversion", None))
    results = normalize_results(results) if results else {}
    repo_id = repo_id or "<namespace>/<model>"
    model_name = model_name or repo_id.split("/")[-1]
    if num_parameters is None:
        from .meta import count_parameters

        num_parameters = count_parameters(config)
    mixers = config.mixer_types
    datasets = datasets or conversion.get("datasets")

    tags = ["m2rnn", "custom_code", "recurrent", "hybrid"]
    tags += [tag for mixer, tag in (("gated_deltanet", "gated-deltanet"), ("full_attention", "attention")) if mixer in mixers]
    tags += ["mixture-of-experts"] if config.num_experts else []
    tags += ["converted"] if conversion else []
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        license=license or conversion.get("license") or DEFAULT_LICENSE,
        tags=tags,
        base_model=hub_repo_id(conversion.get("source")),
        datasets=datasets or None,
        model_name=model_name if results else None,
        eval_results=_eval_results(results) or None,
    )
    memory = layer_memory(config)
    counts = {MIXER_NAMES[m]: mixers.count(m) for m in MIXER_NAMES if m in mixers}
    lora_targets = sorted(default_lora_targets(mixers, mlp=True))
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        marker=CARD_MARKER,
        version=__version__,
        model_name=model_name,
        repo_id=repo_id,
        num_parameters=_format_count(num_parameters),
        num_layers=config.num_hidden_layers,
        mixer_counts=", ".join(f"{name} × {count}" for name, count in counts.items()),
        pattern="".join(MIXER_LETTERS[m] for m in mixers),
        layer_table=_layer_table(config, memory, set(conversion.get("swapped_layers", []))),
        memory_summary=_memory_summary(config, memory),
        provenance=_provenance(conversion),
        lora_targets=json.dumps(lora_targets),
        eval_tasks=",".join(sorted(results)) or "hellaswag,arc_easy,lambada_openai",
        results_table=_results_table(results) if results else "",
        paper_url=PAPER_URL,
    )


def is_generated_card(path: str | os.PathLike) -> bool:
    """True when `path` is a README that m2rnn wrote (so it may be regenerated)."""
    path = Path(path)
    return path.is_file() and CARD_MARKER in path.read_text(encoding="utf-8", errors="replace")


def m2rnn_config(folder: str | os.PathLike) -> M2RNNConfig:
    """The config of the M2RNN checkpoint in `folder`; `ModelCardError` naming the folder when it is none (no
    config.json, not JSON, or another `model_type`), so no card is ever invented for a folder that is not ours."""
    from .configuration_m2rnn import M2RNNConfig

    path = Path(folder) / "config.json"
    if not Path(folder).is_dir():
        raise ModelCardError(f"{str(folder)!r} is not a folder")
    if not path.is_file():
        raise ModelCardError(f"{str(folder)!r} holds no config.json: not a saved model (save it with save_pretrained, "
                             "or m2rnn convert it)")
    try:
        model_type = json.loads(path.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, AttributeError) as error:
        raise ModelCardError(f"{path}: not a JSON object ({error})") from error
    if model_type != M2RNNConfig.model_type:
        raise ModelCardError(f"{path}: model_type={model_type!r}, not an M2RNN checkpoint ('m2rnn'); "
                             "convert it first (m2rnn convert)")
    return M2RNNConfig.from_pretrained(folder)


def folder_card(
    folder: str | os.PathLike,
    *,
    config: M2RNNConfig | None = None,
    overwrite_user_card: bool = False,
    **render_kwargs: Any,
) -> str | None:
    """The text `write_model_card` would write into `folder`/README.md, or None when that README is the user's and
    is kept. Nothing is written. Results already in a generated card (and its license and datasets) are kept when
    no new ones are given."""
    folder = Path(folder)
    readme = folder / "README.md"
    if readme.exists() and not overwrite_user_card and not is_generated_card(readme):
        return None
    config = config if config is not None else m2rnn_config(folder)
    if is_generated_card(readme):  # keep what only the previous render knew
        previous = ModelCard.load(readme)
        for key, value in (("results", results_from_card(previous) or None),
                           ("license", previous.data.license), ("datasets", previous.data.datasets)):
            if render_kwargs.get(key) is None:
                render_kwargs[key] = value
    render_kwargs.setdefault("model_name", folder.resolve().name)
    return str(render_model_card(config, **render_kwargs))


def write_model_card(
    folder: str | os.PathLike,
    *,
    config: M2RNNConfig | None = None,
    overwrite_user_card: bool = False,
    **render_kwargs: Any,
) -> Path | None:
    """Render the card of the checkpoint in `folder` (its config.json unless `config` is given) into README.md.

    A README that m2rnn did not write is kept unless `overwrite_user_card`; returns None when it was kept. The card
    is rendered in full before anything is written (`folder_card`), then written to a temporary file and renamed
    over README.md, so a failure leaves the old one intact.
    """
    from .remote_code import atomic_write_text

    text = folder_card(folder, config=config, overwrite_user_card=overwrite_user_card, **render_kwargs)
    if text is None:
        return None
    readme = Path(folder) / "README.md"
    atomic_write_text(readme, text)
    return readme
