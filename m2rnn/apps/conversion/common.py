"""What every importer produces (an `ImportPlan`: our config plus one recipe per output tensor) and shared helpers."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from m2rnn.configuration_m2rnn import M2RNNConfig
from m2rnn.meta import expected_tensors

from .io import CheckpointReader, ConversionError

Getter = Callable[[str], torch.Tensor]


@dataclass(frozen=True)
class TensorSpec:
    """How to build one output tensor: the source tensors it reads, and a function of a getter that builds it.
    `copied`: the tensor is its one source as stored (so its stored shape can be checked before any work)."""

    sources: tuple[str, ...]
    build: Callable[[Getter], torch.Tensor]
    copied: bool = False


@dataclass
class ImportPlan:
    """A source checkpoint seen as an M2RNN model: our config, a recipe per tensor (our names), and the source
    tensor-name prefixes that are deliberately dropped (vision tower, multi-token-prediction head)."""

    config: M2RNNConfig
    tensors: dict[str, TensorSpec]
    ignored_prefixes: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)
    source_model_type: str = ""


def copy(name: str) -> TensorSpec:
    return TensorSpec((name,), lambda get: get(name), copied=True)


def concat(names: Iterable[str], dim: int = 0) -> TensorSpec:
    names = tuple(names)
    return TensorSpec(names, lambda get: torch.cat([get(n) for n in names], dim=dim))


def derived(sources: Iterable[str], fn: Callable[..., torch.Tensor]) -> TensorSpec:
    """`fn(*source_tensors)`."""
    sources = tuple(sources)
    return TensorSpec(sources, lambda get: fn(*(get(n) for n in sources)))


def require(condition: bool, key: str, value: Any, why: str) -> None:
    """Refuse a source config value that the M2RNN family cannot reproduce exactly."""
    if not condition:
        raise ConversionError(f"source config `{key}`={value!r}: {why}")


def default_rope(rope_parameters: dict[str, Any] | None, key: str = "rope_parameters") -> dict[str, Any] | None:
    """Our `rope_parameters` (theta, partial factor) from a transformers-style dict; None (NoPE) stays None."""
    if rope_parameters is None or rope_parameters.get("rope_theta") is None:
        return None
    rope_type = rope_parameters.get("rope_type", "default")
    require(rope_type == "default", f"{key}.rope_type", rope_type, "only plain RoPE ('default') is supported")
    return {
        "rope_theta": float(rope_parameters["rope_theta"]),
        "partial_rotary_factor": float(rope_parameters.get("partial_rotary_factor", 1.0)),
    }


def moe_expert_specs(
    reader: CheckpointReader, src: str, dst: str, num_experts: int, intermediate_size: int
) -> dict[str, TensorSpec]:
    """Routed experts `dst.experts.{e}.{gate,up,down}_proj.weight` from per-expert tensors on disk, or from the
    fused `experts.gate_up_proj [E, 2·I, H]` (gate rows first) and `experts.down_proj [E, H, I]` layout."""
    specs: dict[str, TensorSpec] = {}
    fused_gate_up, fused_down = f"{src}experts.gate_up_proj", f"{src}experts.down_proj"
    for e in range(num_experts):
        out = f"{dst}experts.{e}."
        if fused_gate_up in reader:
            specs[out + "gate_proj.weight"] = derived([fused_gate_up], lambda t, e=e: t[e, :intermediate_size])
            specs[out + "up_proj.weight"] = derived([fused_gate_up], lambda t, e=e: t[e, intermediate_size:])
            specs[out + "down_proj.weight"] = derived([fused_down], lambda t, e=e: t[e])
        else:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                specs[out + f"{proj}.weight"] = copy(f"{src}experts.{e}.{proj}.weight")
    return specs


def check_plan(plan: ImportPlan, reader: CheckpointReader) -> None:
    """Refuse a plan that misses an output tensor, reads a tensor the checkpoint lacks, or leaves a source tensor
    unused (a source tensor we do not map would make the conversion inexact)."""
    expected = expected_tensors(plan.config)
    missing_outputs = sorted(set(expected) - set(plan.tensors))
    extra_outputs = sorted(set(plan.tensors) - set(expected))
    if missing_outputs or extra_outputs:
        raise ConversionError(f"internal: plan lacks {missing_outputs[:5]} / has unknown {extra_outputs[:5]}")
    used = {name for spec in plan.tensors.values() for name in spec.sources}
    missing = sorted(name for name in used if name not in reader)
    if missing:
        raise ConversionError(
            f"{reader.folder}: {len(missing)} tensor(s) the config implies are missing, e.g. {missing[:5]}"
        )
    for name, spec in plan.tensors.items():
        if spec.copied and reader.shape(spec.sources[0]) != expected[name]:
            raise ConversionError(
                f"{reader.folder}: tensor {spec.sources[0]!r} has shape {reader.shape(spec.sources[0])}, but the "
                f"config implies {expected[name]}; config.json does not match the weights"
            )
    unused = sorted(n for n in reader.keys() if n not in used and not n.startswith(plan.ignored_prefixes))
    if unused:
        raise ConversionError(
            f"{reader.folder}: {len(unused)} tensor(s) have no place in the converted model, e.g. {unused[:5]} "
            "(an option the importer does not support, or a config that does not match the weights)"
        )
    for name in sorted(used):
        dtype = reader.dtype(name)
        if not dtype.is_floating_point:
            raise ConversionError(
                f"{reader.folder}: tensor {name!r} is stored as {dtype}; quantized weights are not converted "
                "(use the unquantized checkpoint)"
            )
