"""Healing after `swap_layers`: train the new M2RNN layers to stand in for the layers they replaced.

Stage 1 matches each replaced layer's mixer output on the teacher's hidden states (only the new layers train);
stage 2 distils the original model into the whole swapped model (KL on logits, LoRA or full fine-tuning).
See docs/healing.md.

    from m2rnn.apps.heal import HealSettings, TextSource, heal, heal_checkpoint, load_text_blocks
"""

from .data import HealError, TextBlocks, TextSource, load_text_blocks
from .healing import (
    DEFAULT_LORA_TARGETS,
    HealResult,
    HealSettings,
    StageLog,
    distillation_kl,
    evaluate,
    heal,
    heal_stage1,
    heal_stage2,
    replaced_layer_mse,
    swapped_layers,
)
from .report import write_results
from .run import heal_checkpoint
from m2rnn.tokenization import byte_level_tokenizer

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "HealError",
    "HealResult",
    "HealSettings",
    "StageLog",
    "TextBlocks",
    "TextSource",
    "byte_level_tokenizer",
    "distillation_kl",
    "evaluate",
    "heal",
    "heal_checkpoint",
    "heal_stage1",
    "heal_stage2",
    "load_text_blocks",
    "replaced_layer_mse",
    "swapped_layers",
    "write_results",
]
