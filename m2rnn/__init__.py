"""M2RNN hybrids for Hugging Face transformers. Importing the package registers the Auto classes."""

from .configuration_m2rnn import M2RNNConfig

__all__ = ["M2RNNConfig"]
