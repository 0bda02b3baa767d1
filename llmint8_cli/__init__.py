"""llmint8: LLM.int8() (Dettmers et al., 2022) for Hugging Face causal LMs.

Importing the package registers quant_method "llmint8" with transformers (when transformers
loads its quantizers), so that
`AutoModelForCausalLM.from_pretrained(OUT)` of an llmint8 folder builds Int8Linear layers.
"""

from llmint8_cli import hf_hook
from llmint8_cli.checkpoint.load import load
from llmint8_cli.checkpoint.manifest import write_manifest
from llmint8_cli.core.methods import DEFAULT_METHOD, DEFAULT_THRESHOLD, METHODS
from llmint8_cli.errors import LLMInt8Error
from llmint8_cli.nn import Int8Linear, quantize_model

__version__ = "0.1.0"

hf_hook.install()

__all__ = ["DEFAULT_METHOD", "DEFAULT_THRESHOLD", "METHODS", "Int8Linear", "LLMInt8Error", "load", "quantize_model", "write_manifest", "__version__"]
