"""Which linear layers the model uses as linear layers, observed while the 16-bit model runs.

A layer becomes Int8Linear only where the model treats it as one: it is called as a module, what it
returns is its linear map of its input, and no other code reads its weight or bias. Two kinds of
layer break that, and would break the converted model: an nn.Linear subclass whose own forward
returns something else (PhiMoE's router returns three values), and a layer whose weight the model
reads directly (Mamba's mixer computes `dt_proj.weight @ x`). Both stay 16-bit, named with the
reason. The same rule serves `quantize`, evaluations on the fly and, through the quantized layers
a folder lists, `export`.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from llmint8_cli.nn.convert import Conv1D

PROBE_TOKENS = 8  # a forward of this many tokens shows how the model uses its linear layers


def own_forward(module: nn.Module) -> bool:
    """A linear layer whose class replaces nn.Linear's (or Conv1D's) forward with its own."""
    base = nn.Linear if isinstance(module, nn.Linear) else Conv1D
    return type(module).forward is not base.forward


def linear_map(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    weight = module.weight.t() if isinstance(module, Conv1D) else module.weight
    return nn.functional.linear(x.to(weight.dtype), weight, module.bias)


def linear_map_problem(module: nn.Module, x: torch.Tensor, output) -> str | None:
    """Why `output`, what a linear layer's own forward returned for `x`, is not its linear map; None if it is."""
    if not isinstance(output, torch.Tensor):
        return f"its forward ({type(module).__name__}) returns {type(output).__name__}, not its linear map"
    expected = linear_map(module, x)
    if output.shape != expected.shape or not torch.allclose(output.float(), expected.float(), rtol=1e-2, atol=1e-3):
        return f"its forward ({type(module).__name__}) is not its linear map"
    return None


class LinearUseProbe(TorchFunctionMode):
    """Watches a forward pass: every torch call that takes a watched layer's weight or bias outside
    that layer's own forward, and what the layers with a forward of their own return.

    A tensor is matched to a layer by identity, against what the layer holds at that moment, among
    the children of the modules whose forward runs: layers streamed in and out
    (activations.LayerStreamer) are watched as they come, and placeholders on the meta device are
    read by no one."""

    def __init__(self, layers: dict[str, nn.Module]):
        super().__init__()
        self.names = {id(module): name for name, module in layers.items()}
        self.children: dict[int, list[nn.Module]] = {}  # id(module) -> its watched children
        self.running: list[nn.Module] = []  # the modules whose forward runs, innermost last
        self.checking = False  # our own comparison of a layer's output with its linear map
        self.reasons: dict[str, str] = {}  # layer name -> why it stays 16-bit

    def watch(self, model: nn.Module) -> list:
        """Hooks on every module of `model`; returns the handles to remove."""
        handles = []
        for parent in model.modules():
            watched = [child for child in parent.children() if id(child) in self.names]
            if watched:
                self.children[id(parent)] = watched
            handles.append(parent.register_forward_pre_hook(lambda module, args: self.running.append(module)))
            handles.append(parent.register_forward_hook(self._leave, always_call=True))
        return handles

    def _owner(self, tensor: torch.Tensor) -> nn.Module | None:
        """The watched layer holding `tensor` as its weight or bias now, among the running modules' children."""
        for module in reversed(self.running):
            for child in self.children.get(id(module), ()):
                if child._parameters.get("weight") is tensor or child._parameters.get("bias") is tensor:
                    return child
        return None

    def _leave(self, module: nn.Module, args, output) -> None:
        if self.running and self.running[-1] is module:
            self.running.pop()
        name = self.names.get(id(module))
        if name is None or name in self.reasons or not own_forward(module) or not args or not isinstance(args[0], torch.Tensor):
            return
        self.checking = True
        try:
            problem = linear_map_problem(module, args[0], output)
        finally:
            self.checking = False
        if problem:
            self.reasons[name] = problem

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.checking and self.running:
            values = [*args, *kwargs.values()]
            for value in [*values, *(item for v in values if isinstance(v, (list, tuple)) for item in v)]:
                if not isinstance(value, nn.Parameter) or value.device.type == "meta":
                    continue
                owner = self._owner(value)
                if owner is None or owner is self.running[-1] or self.names[id(owner)] in self.reasons:
                    continue
                reader = type(self.running[-1]).__name__
                self.reasons[self.names[id(owner)]] = f"{reader} reads its {'weight' if value.dim() > 1 else 'bias'} directly, not through the layer"
        return func(*args, **kwargs)


@contextlib.contextmanager
def watching(model: nn.Module, layers: dict[str, nn.Module]):
    """A LinearUseProbe over `layers` of `model` for the forward passes run inside the block."""
    probe = LinearUseProbe(layers)
    handles = probe.watch(model)
    try:
        with probe:
            yield probe
    finally:
        for handle in handles:
            handle.remove()


def probe_ids(model: nn.Module, count: int = PROBE_TOKENS) -> torch.Tensor:
    """`count` token ids the model's vocabulary holds, spread over it (what they say does not matter, the code path does)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    vocab = getattr(config, "vocab_size", None) or model.get_input_embeddings().weight.shape[0]
    return ((torch.arange(count) * 7919 + 1) % vocab)[None]


def linear_use(model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, str]:
    """{layer name: why it stays 16-bit} for a model held in memory, from one short forward of its
    base model (in eval mode: the path evaluations and generation take)."""
    from llmint8_cli.models import input_device

    if not layers or not hasattr(model, "config") or not hasattr(model, "get_input_embeddings"):  # not a transformers model: nothing to run
        return {}
    base = getattr(model, "base_model", model)
    training = model.training
    model.eval()
    try:
        with watching(model, layers) as probe, torch.inference_mode():
            base(input_ids=probe_ids(model).to(input_device(model)), use_cache=False)
    finally:
        model.train(training)
    return probe.reasons
