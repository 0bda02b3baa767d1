"""llmint8's ops, registered with torch.library: what torch.compile, torch.export and autograd see.

    llmint8::int8_linear(x, weight, weight_scale, weight_zero, outlier_idx, outlier_weight,
                         input_smooth, bias, method, threshold, rotation_block) -> Tensor

Y = X W^T + b by one of the methods (core/reference.py is the spec), from the tensors an
Int8Linear holds. Its kernel is the backend of x's device (backends.backend_for: the CPU engine,
the CUDA engine, the reference elsewhere), with the weight-side work (packing, fp32 outlier rows)
done once per weight and kept by the layer until a tensor of it changes. Its fake implementation
gives Y's shape and dtype, so a compiled or exported model keeps the op whole, one node per layer.
Its gradient with respect to X is grad_Y W, W the layer's dequantized int8 weight in the original
basis with its stored outlier columns exact in 16-bit (what bitsandbytes' MatMul8bitLt computes);
the weights are frozen (a LoRA adapter beside the layer trains as usual).

    llmint8::dequantized_weight(weight, weight_scale, weight_zero, outlier_idx, outlier_weight,
                                input_smooth, rotation_block) -> Tensor   (fp32 [n, k])

The W above: what the layer multiplies X by, as one 16-bit-free matrix (the backward's operand).
"""

from __future__ import annotations

import weakref

import torch

from llmint8_cli.backends import backend_for
from llmint8_cli.core import reference
from llmint8_cli.core.methods import get_method
from llmint8_cli.core.reference import Quantized, QuantizedWeight

Tensor = torch.Tensor
_LAYERS: weakref.WeakSet = weakref.WeakSet()  # every layer that holds an int8 weight (register_layer)
_OWNERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # id(weight) -> the layer holding it


def quantized_weight(weight: Tensor, weight_scale: Tensor, weight_zero: Tensor | None, outlier_idx: Tensor, outlier_weight: Tensor,
                     input_smooth: Tensor | None, rotation_block: int) -> QuantizedWeight:
    """A layer's tensors as the reference's QuantizedWeight (no copies but the index's widening)."""
    return QuantizedWeight(Quantized(weight, weight_scale, weight_zero), outlier_idx.long(), outlier_weight, input_smooth, rotation_block)


def register_layer(layer: torch.nn.Module) -> None:
    """A layer (Int8Linear) whose `weight` buffer the op may be given: the layer keeps that weight's
    prepared state, so the state goes with the layer (no table of ours keeps a weight alive)."""
    _LAYERS.add(layer)


def owner_of(weight: Tensor):
    """The registered layer whose `weight` buffer is this tensor (None: a tensor no layer holds, such
    as an exported program's copy, prepared again at each call)."""
    layer = _OWNERS.get(id(weight))
    if layer is None or layer._buffers.get("weight") is not weight:
        layer = next((candidate for candidate in list(_LAYERS) if candidate._buffers.get("weight") is weight), None)
        if layer is not None:
            _OWNERS[id(weight)] = layer
    return layer


def _stamp(tensor: Tensor | None) -> tuple | None:
    """Where a tensor lies and how often it was changed in place (an inference tensor cannot be: no counter)."""
    if tensor is None:
        return None
    return tensor.device, tensor.data_ptr(), 0 if tensor.is_inference() else tensor._version


def prepared(backend, method, weight: Tensor, *rest: Tensor | None, rotation_block: int, owner=None):
    """The backend's prepared weight, kept by the layer that holds it and made again whenever one of
    its tensors was replaced, moved or changed in place (their addresses and versions are its key)."""
    owner = owner if owner is not None else owner_of(weight)
    key = (backend.name, method.name, rotation_block, *(_stamp(t) for t in (weight, *rest)))
    held = owner.__dict__.get("_prepared") if owner is not None else None
    if held is not None and held[0] == key:
        return held[1]
    state = backend.prepare(quantized_weight(weight, *rest, rotation_block), method)
    if owner is not None:
        owner.__dict__["_prepared"] = (key, state)
    return state


def prepared_of(layer: torch.nn.Module):
    """The state a layer's weight was last prepared with (None if it never ran), e.g. to count its bytes."""
    held = layer.__dict__.get("_prepared")
    return held[1] if held is not None else None


def linear(x: Tensor, weight: Tensor, weight_scale: Tensor, weight_zero: Tensor | None, outlier_idx: Tensor, outlier_weight: Tensor,
           input_smooth: Tensor | None, bias: Tensor | None, method: str, threshold: float, rotation_block: int, owner=None) -> Tensor:
    """The op's computation; `owner`, the layer holding the weight where the caller knows it."""
    if not x.numel():  # an expert no token chose, in a compiled mixture-of-experts block
        return x.new_zeros(*x.shape[:-1], weight.shape[0])
    spec = get_method(method)
    backend = backend_for(x.device)
    state = prepared(backend, spec, weight, weight_scale, weight_zero, outlier_idx, outlier_weight, input_smooth, rotation_block=rotation_block, owner=owner)
    out = backend.linear(x, state, spec, threshold, bias)
    if out.data_ptr() == x.data_ptr():  # an op's output never aliases its input
        return out.clone()
    return out.detach()  # a reshaped result is a view of the kernel's own buffer; as a view, autograd would forbid an in-place add to it


def int8_linear_kernel(x: Tensor, weight: Tensor, weight_scale: Tensor, weight_zero: Tensor | None, outlier_idx: Tensor, outlier_weight: Tensor,
                       input_smooth: Tensor | None, bias: Tensor | None, method: str, threshold: float, rotation_block: int) -> Tensor:
    return linear(x, weight, weight_scale, weight_zero, outlier_idx, outlier_weight, input_smooth, bias, method, threshold, rotation_block)


int8_linear_op = torch.library.custom_op("llmint8::int8_linear", int8_linear_kernel, mutates_args=())


@int8_linear_op.register_fake
def _(x, weight, weight_scale, weight_zero, outlier_idx, outlier_weight, input_smooth, bias, method, threshold, rotation_block):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("llmint8::dequantized_weight", mutates_args=())
def dequantized_weight(weight: Tensor, weight_scale: Tensor, weight_zero: Tensor | None, outlier_idx: Tensor, outlier_weight: Tensor,
                       input_smooth: Tensor | None, rotation_block: int) -> Tensor:
    qweight = quantized_weight(weight, weight_scale, weight_zero, outlier_idx, outlier_weight, input_smooth, rotation_block)
    every = torch.arange(weight.shape[1], device=weight.device)
    w = reference.outlier_weight_columns(qweight, every)  # int8 rows dequantized (rotated back), the stored columns exact
    return w * input_smooth[None, :] if input_smooth is not None else w  # X·m meets W/m: W itself (m is 1 at the stored columns)


@dequantized_weight.register_fake
def _(weight, weight_scale, weight_zero, outlier_idx, outlier_weight, input_smooth, rotation_block):
    return weight.new_empty(weight.shape, dtype=torch.float32)


WEIGHT_ARGUMENTS = slice(1, 7)  # int8_linear's weight .. input_smooth: what dequantized_weight takes


def _keep_for_backward(ctx, inputs, output):
    x, *_, rotation_block = inputs
    ctx.x_dtype = x.dtype
    ctx.rotation_block = rotation_block
    ctx.save_for_backward(*inputs[WEIGHT_ARGUMENTS])


def _backward(ctx, grad):
    weight, weight_scale, weight_zero, outlier_idx, outlier_weight, input_smooth = ctx.saved_tensors
    w = dequantized_weight(weight, weight_scale, weight_zero, outlier_idx, outlier_weight, input_smooth, ctx.rotation_block)
    grad_x = (grad.to(w.dtype) @ w).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
    return grad_x, None, None, None, None, None, None, None, None, None, None


int8_linear_op.register_autograd(_backward, setup_context=_keep_for_backward)


def int8_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, weight_zero: Tensor | None, outlier_idx: Tensor, outlier_weight: Tensor,
                input_smooth: Tensor | None, bias: Tensor | None, method: str, threshold: float, rotation_block: int, owner=None) -> Tensor:
    """llmint8::int8_linear, computed directly where nothing traces it: a plain eager call with no
    gradient to record skips torch's dispatcher, which costs more than a decode step's GEMV."""
    args = (x, weight, weight_scale, weight_zero, outlier_idx, outlier_weight, input_smooth, bias, method, threshold, rotation_block)
    gradient = x.requires_grad and torch.is_grad_enabled()
    if torch.compiler.is_compiling() and not gradient and not torch.compiler.is_exporting():  # an exported program keeps the device-free op
        native = compiled_linear(x, owner, method, threshold, bias)
        if native is not None:
            return native
    if gradient or type(x) is not torch.Tensor or torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:  # fake, functional, a mode
        return int8_linear_op(*args)
    return linear(*args, owner=owner)


def compiled_linear(x: Tensor, owner, method: str, threshold: float, bias: Tensor | None) -> Tensor | None:
    """The layer in a graph being compiled as its backend's native op (backend.traced_linear), which
    the compiled code calls without Python in between; None where there is none, or where the layer
    has not run yet (its prepared state is made at its first eager call, or by `prepare_layers`)."""
    held = owner.__dict__.get("_prepared") if owner is not None else None
    if held is None:
        return None
    return backend_for(x.device).traced_linear(x, held[1], get_method(method), threshold, bias)
