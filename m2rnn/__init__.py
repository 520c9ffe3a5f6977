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

# default LoRA targets for `LoraConfig()`, registered with PEFT when (and only if) PEFT gets imported
from .training import install_peft_defaults  # noqa: E402

install_peft_defaults()

# `Trainer(use_liger_kernel=True)` support, registered with liger-kernel when (and only if) it gets imported
from .training import install_liger_registration  # noqa: E402

install_liger_registration()

__version__ = "0.1.0"
__all__ = ["M2RNNCache", "M2RNNConfig", "M2RNNForCausalLM", "M2RNNModel", "M2RNNPreTrainedModel", "M2RNNStaticCache"]
