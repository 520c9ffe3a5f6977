"""Import Gated DeltaNet hybrid checkpoints exactly into the M2RNN family, then swap layers to M2RNN.

Families (by `model_type`): fla `gated_deltanet`, `qwen3_5` / `qwen3_5_text`, `qwen3_5_moe` / `qwen3_5_moe_text`,
`qwen3_next`, `olmo_hybrid`, lm-engine `gpt_base` (docs/checkpoint-formats.md). See `convert_checkpoint`,
`import_checkpoint` and `swap_layers`.
"""

from .convert import ConversionResult, convert_checkpoint, import_checkpoint, plan_import
from .io import ConversionError
from .swap import swap_layers

__all__ = [
    "ConversionError",
    "ConversionResult",
    "convert_checkpoint",
    "import_checkpoint",
    "plan_import",
    "swap_layers",
]
