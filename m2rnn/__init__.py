"""M2RNN hybrids for Hugging Face transformers.

Importing the package registers `M2RNNConfig` with `AutoConfig` and the models with `AutoModel` and
`AutoModelForCausalLM`, so `from_pretrained` works without `trust_remote_code`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_m2rnn import M2RNNConfig
from .modeling_m2rnn import M2RNNCache, M2RNNForCausalLM, M2RNNModel, M2RNNPreTrainedModel, M2RNNStaticCache

AutoConfig.register(M2RNNConfig.model_type, M2RNNConfig, exist_ok=True)
AutoModel.register(M2RNNConfig, M2RNNModel, exist_ok=True)
AutoModelForCausalLM.register(M2RNNConfig, M2RNNForCausalLM, exist_ok=True)

# default LoRA targets for `LoraConfig()` in PEFT's per-model-type table: now if PEFT is already imported, else when a
# model is built (where PEFT is installed)
from .modeling_m2rnn import MODEL_BUILT_HOOKS  # noqa: E402
from .training import register_peft_defaults_if_imported, register_peft_defaults_where_installed  # noqa: E402

register_peft_defaults_if_imported()
if register_peft_defaults_where_installed not in MODEL_BUILT_HOOKS:
    MODEL_BUILT_HOOKS.append(register_peft_defaults_where_installed)

__version__ = "0.1.0"
__all__ = ["M2RNNCache", "M2RNNConfig", "M2RNNForCausalLM", "M2RNNModel", "M2RNNPreTrainedModel", "M2RNNStaticCache"]
