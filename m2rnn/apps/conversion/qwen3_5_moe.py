"""Qwen3.5-MoE (`qwen3_5_moe` composite VLM checkpoints and `qwen3_5_moe_text`).

As Qwen3.5 dense (see `qwen3_5`), except that every layer's MLP is a sparse MoE block: softmax router over all
experts in fp32, top-k always renormalised, SwiGLU experts stored per expert on disk
(`mlp.experts.{e}.{gate,up,down}_proj`; the fused in-memory layout `experts.gate_up_proj`/`down_proj` is read too),
plus a shared expert with a sigmoid gate (`shared_expert_gate`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import ImportPlan
from .io import CheckpointReader
from .qwen3_5 import (
    load_reference,
    load_text_config,
    qwen_base_config,
    qwen_ignored,
    renaming_plan,
    text_prefix,
    tied_embeddings,
)

MODEL_TYPES = ("qwen3_5_moe", "qwen3_5_moe_text")
__all__ = ["MODEL_TYPES", "build_plan", "load_reference"]


def moe_overrides(text: Any, norm_topk_prob: bool = True, mlp_only_layers: list[int] | None = None) -> dict[str, Any]:
    """Our MoE config keys from a Qwen text config."""
    return dict(
        num_experts=text.num_experts,
        num_experts_per_tok=text.num_experts_per_tok,
        moe_intermediate_size=text.moe_intermediate_size,
        norm_topk_prob=norm_topk_prob,
        shared_expert_intermediate_size=text.shared_expert_intermediate_size,
        shared_expert_gated=True,
        router_aux_loss_coef=getattr(text, "router_aux_loss_coef", 0.001),
        mlp_only_layers=mlp_only_layers or [],
    )


def build_plan(folder: str | Path, raw: dict[str, Any], reader: CheckpointReader) -> ImportPlan:
    text = load_text_config(folder)
    prefix = text_prefix(reader)
    config = qwen_base_config(
        text, tied_embeddings(text, raw, reader, prefix), intermediate_size=text.moe_intermediate_size,
        **moe_overrides(text),
    )
    return ImportPlan(config, renaming_plan(config, reader, prefix), qwen_ignored(config))
