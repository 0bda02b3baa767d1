"""Pure numerics: the method table and the torch reference (the spec)."""

from llmint8_cli.core.methods import DEFAULT_METHOD, DEFAULT_THRESHOLD, METHODS, Method, check_threshold, get_method, parse_methods
from llmint8_cli.core.reference import Quantized, QuantizedWeight, quantize, quantize_weight

__all__ = [
    "DEFAULT_METHOD", "DEFAULT_THRESHOLD", "METHODS", "Method", "Quantized", "QuantizedWeight",
    "check_threshold", "get_method", "parse_methods", "quantize", "quantize_weight",
]
