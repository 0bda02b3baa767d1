"""Convert a transformers causal LM in place: every linear layer but the LM head becomes Int8Linear."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn

from llmint8_cli.core.methods import DEFAULT_METHOD, DEFAULT_SMOOTH_ALPHA, Method, check_alpha, check_rotation_block, get_method
from llmint8_cli.core.reference import ROTATION_BLOCK
from llmint8_cli.errors import InvalidArgumentError
from llmint8_cli.nn.linear import Int8Linear

try:  # GPT-2 style models use transformers' Conv1D (weight stored [in, out]) for their linears
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = ()


def as_linear(module: nn.Module) -> nn.Linear:
    """An nn.Linear view of a Linear or Conv1D layer (Conv1D's weight is transposed)."""
    if isinstance(module, nn.Linear):
        return module
    linear = nn.Linear(module.weight.shape[0], module.weight.shape[1], bias=module.bias is not None, device="meta")
    linear.weight = nn.Parameter(module.weight.detach().t(), requires_grad=False)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
    return linear


def quantizable_layers(model: nn.Module, skip: Iterable[str] = ()) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of each linear layer to quantize: not the LM head, not matching a skip pattern."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    patterns = list(skip)
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, Conv1D)) or module is head:
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        yield name, module


NOT_LINEAR = "not a linear layer"


def kept_in_16_bit(model: nn.Module, kept_linears: Mapping[str, str] | None = None) -> dict[str, dict]:
    """Weight matrices that stay 16-bit for no reason a user chose, with the reason: not a linear
    layer (those are quantized or --skip'ped), or a linear layer the model does not use as one
    (`kept_linears`, nn/probe.py); embeddings and the LM head are the paper's rule. Mixture-of-experts
    blocks keep their router as a matrix, for example.
    {module name, layer numbers as *: {"parameters": n, "reason": why}}."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    kept_linears = kept_linears or {}
    kept: dict[str, dict] = {}
    for name, module in model.named_modules():
        if name in kept_linears:
            reason = kept_linears[name]
        elif isinstance(module, (nn.Linear, Conv1D, Int8Linear, nn.Embedding)) or module is head:
            continue
        else:
            reason = NOT_LINEAR
        count = sum(p.numel() for p in module.parameters(recurse=False) if p.dim() >= 2)
        if count:
            entry = kept.setdefault(re.sub(r"\.\d+(?=\.|$)", ".*", name), {"parameters": 0, "reason": reason})
            entry["parameters"] += count
    return kept


def parameter_report(model: nn.Module, int8_layers: Iterable[nn.Module], kept_linears: Mapping[str, str] | None = None) -> dict:
    """How many of the model's parameters are int8, and which matrices stay 16-bit unasked and why (for the JSON)."""
    int8_layers = list(int8_layers)
    int8 = sum(m.weight.numel() for m in int8_layers)
    tied = getattr(model, "all_tied_weights_keys", None) or {}  # {alias: the tensor stored once}; on meta a tie may be two tensors
    distinct = {id(p): p.numel() for name, p in model.named_parameters(remove_duplicate=False) if name not in tied}
    total = sum(distinct.values()) + sum(m.weight.numel() for m in int8_layers if isinstance(m, Int8Linear))  # tied once; int8 rows are buffers
    return {"total": total, "int8": int8, "int8_share": round(int8 / max(total, 1), 4), "kept_16bit": kept_in_16_bit(model, kept_linears)}


def kept_line(report: dict) -> str | None:
    """One stderr line naming what stays 16-bit unasked, why, and its share of the parameters; None if nothing does."""
    kept = report["kept_16bit"]
    if not kept:
        return None
    parts = ", ".join(f"{name} ({100 * entry['parameters'] / report['total']:.1f} % of parameters: {entry['reason']})"
                      for name, entry in sorted(kept.items(), key=lambda item: -item[1]["parameters"]))
    return f"kept in 16-bit: {parts}; {100 * report['int8_share']:.1f} % of parameters are int8"


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


def quantize_model(
    model: nn.Module,
    method: str = DEFAULT_METHOD,
    threshold: float | None = None,
    skip: Iterable[str] = (),
    outliers: Mapping[str, torch.Tensor] | None = None,
    input_max: Mapping[str, torch.Tensor] | None = None,
    alpha: float = DEFAULT_SMOOTH_ALPHA,
    rotation_block: int = ROTATION_BLOCK,
    kept: Mapping[str, str] | None = None,
) -> nn.Module:
    """Replace the model's linear layers by Int8Linear in place and return the model.

    Only layers the model uses as linear layers are converted (`kept`: {name: why not}, observed by
    nn.probe.linear_use, which runs here when `kept` is None; the verdicts are on the model as
    `llmint8_kept_16bit`). Embeddings, norms and the LM head stay 16-bit (tied weights stay tied). `outliers` maps a
    layer name to its calibrated outlier columns and `input_max` to its calibrated max |x| per
    input feature (what smoothing methods need, with `alpha`); rotation methods rotate in Hadamard
    blocks `rotation_block` wide; `threshold` None is the method's own (6.0, or 60 for
    llm.int8-rotate); `method="fp16"` leaves the model untouched.
    """
    spec = get_method(method)
    threshold = spec.threshold_or_default(threshold)
    if not spec.quantized:
        return model
    outliers, input_max = outliers or {}, input_max or {}
    if kept is None:
        from llmint8_cli.nn.probe import linear_use

        kept = linear_use(model, dict(quantizable_layers(model, skip)))
    model.llmint8_kept_16bit = dict(kept)
    layers = [(name, module) for name, module in quantizable_layers(model, skip) if name not in kept]
    if spec.rotation:
        check_rotation_block(rotation_block)
    if spec.smoothing:
        check_alpha(alpha)
        missing = [name for name, _ in layers if name not in input_max]
        if missing:
            raise InvalidArgumentError(f"method {method!r} needs calibrated input ranges; none for {missing[0]} (calibrate first)")
    for name, module in layers:
        layer = Int8Linear.from_linear(as_linear(module), method, threshold, outliers.get(name), input_max.get(name), alpha, rotation_block)
        replace_module(model, name, layer)
    return model


INT8_HEAD_HELP = ("Run the LM head in int8 too, with the model's method and threshold (run-time outlier columns only: nothing is calibrated "
                  "for it). Off by default: the paper keeps it 16-bit; eval-ppl --int8-head measures what it costs a model.")


INT8_HEAD_PLACED = "--int8-head: a model spread over devices (--device-map) keeps its 16-bit head"


def int8_head_label(name: str, int8_head: bool = True) -> str:
    """A method's name in tables and bench rows, marked where its LM head runs in int8 too."""
    return f"{name} + int8 head" if int8_head else name


def check_int8_head(methods: Iterable[str]) -> Method:
    """The method an int8 head would run (the first of `methods`, the int8 ones a command runs), or a one-line refusal."""
    methods = [get_method(name) for name in methods]
    if not methods or not all(m.quantized for m in methods):
        raise InvalidArgumentError("--int8-head: no int8 method to run the LM head with (a 16-bit model or method)")
    smoothing = next((m for m in methods if m.smoothing), None)
    if smoothing is not None:
        raise InvalidArgumentError(f"--int8-head: {smoothing.name} smooths each layer's input with calibrated ranges, which the LM head has none of")
    return methods[0]


def quantize_head(model: nn.Module) -> nn.Module:
    """The LM head as an Int8Linear of the method the model's int8 layers run, in place: an opt-in
    for speed (the head is a fifth of SmolLM2's weights and most of a decode step's 16-bit reads),
    never the default. A tied head gets int8 rows of its own; the embeddings stay 16-bit."""
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    method = check_int8_head([layers[0].method.name] if layers else [])
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear:
        raise InvalidArgumentError(f"--int8-head: the model's LM head is {type(head).__name__ if head is not None else 'missing'}, not a linear layer")
    if head.weight.device.type == "meta":
        raise InvalidArgumentError("--int8-head: the LM head is offloaded (--device-map); it is quantized on one device only")
    name = next(n for n, m in model.named_modules() if m is head)
    replace_module(model, name, Int8Linear.from_linear(head, method.name, layers[0].threshold, rotation_block=layers[0].rotation_block or ROTATION_BLOCK))
    model.config.get_text_config().tie_word_embeddings = False  # a later tie_weights() must not put the embeddings back in its place
    return model
