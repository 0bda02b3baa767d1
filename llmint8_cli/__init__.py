"""llmint8: LLM.int8() (Dettmers et al., 2022) for Hugging Face causal LMs."""

from llmint8_cli.core.methods import DEFAULT_METHOD, DEFAULT_THRESHOLD, METHODS
from llmint8_cli.errors import LLMInt8Error
from llmint8_cli.nn import Int8Linear, quantize_model

__version__ = "0.1.0"

__all__ = ["DEFAULT_METHOD", "DEFAULT_THRESHOLD", "METHODS", "Int8Linear", "LLMInt8Error", "quantize_model", "__version__"]
