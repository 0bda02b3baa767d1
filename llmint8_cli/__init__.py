"""llmint8: LLM.int8() (Dettmers et al., 2022) for Hugging Face causal LMs.

Importing the package registers quant_method "llmint8" with transformers (when transformers
loads its quantizers), so that
`AutoModelForCausalLM.from_pretrained(OUT)` of an llmint8 folder builds Int8Linear layers.
"""

import os

# The user's Inductor cache folder, read before any import can set it: torch writes its /tmp default
# into the environment the first time it asks (torchao's import does), and compilation.py would take that for the user's.
INDUCTOR_CACHE_GIVEN = os.environ.get("TORCHINDUCTOR_CACHE_DIR")

from llmint8_cli import hf_hook  # noqa: E402
from llmint8_cli.checkpoint.load import load  # noqa: E402
from llmint8_cli.checkpoint.manifest import write_manifest  # noqa: E402
from llmint8_cli.core.methods import DEFAULT_METHOD, DEFAULT_THRESHOLD, METHODS  # noqa: E402
from llmint8_cli.errors import LLMInt8Error  # noqa: E402
from llmint8_cli.nn import Int8Linear, quantize_model  # noqa: E402

__version__ = "0.1.0"

hf_hook.install()

__all__ = ["DEFAULT_METHOD", "DEFAULT_THRESHOLD", "METHODS", "Int8Linear", "LLMInt8Error", "load", "quantize_model", "write_manifest", "__version__"]
