"""nn modules: Int8Linear and in-place conversion of transformers models."""

from llmint8_cli.nn.convert import quantizable_layers, quantize_model
from llmint8_cli.nn.linear import Int8Linear

__all__ = ["Int8Linear", "quantizable_layers", "quantize_model"]
