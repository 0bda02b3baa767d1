"""Hooks on linear-layer inputs: the outlier statistics behind calibration and `llmint8 outliers`.

A feature (input column of a linear layer) is an outlier when some |x| >= threshold (paper §3.2).
The same collector feeds `quantize --calib-samples` (which columns to store in 16-bit) and the
§4 analysis of `llmint8 outliers` (how many layers and positions each feature touches).

For models larger than memory, LayerStreamer loads each decoder layer's weights from the source
checkpoint just before the layer runs and drops them right after, so a calibration pass holds
one decoder layer at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn


class ActivationStats:
    """Per layer: max |x| of each input column, and how many rows reached the threshold there."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.col_max: dict[str, torch.Tensor] = {}
        self.col_hits: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}

    def observe(self, name: str, x: torch.Tensor) -> None:
        mag = x.detach().reshape(-1, x.shape[-1]).float().abs()
        col_max = torch.nan_to_num(mag, nan=float("inf")).amax(dim=0).cpu()
        hits = (~(mag < self.threshold)).sum(dim=0).cpu()
        if name in self.col_max:
            torch.maximum(self.col_max[name], col_max, out=self.col_max[name])
            self.col_hits[name] += hits
            self.rows[name] += mag.shape[0]
        else:
            self.col_max[name], self.col_hits[name], self.rows[name] = col_max, hits, mag.shape[0]

    def attach(self, model: nn.Module, names: Iterable[str]) -> list:
        """Register a forward pre-hook on each named layer; returns the handles to remove."""
        handles = []
        for name in names:
            hook = lambda module, args, name=name: self.observe(name, args[0])  # noqa: E731
            handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
        return handles

    def outlier_columns(self) -> dict[str, torch.Tensor]:
        """Sorted indices of the columns that reached the threshold, per layer."""
        return {name: torch.nonzero(m >= self.threshold).flatten() for name, m in self.col_max.items()}


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of decoder blocks: its ModuleList holding the most parameters."""
    best, best_size = None, -1
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = (name, module), size
    if best is None:
        raise ValueError("no stack of decoder layers found in the model")
    return best


class LayerStreamer:
    """Load each decoder layer's parameters from `fetch(name)` before it runs; set them to meta after."""

    def __init__(self, model: nn.Module, fetch):
        from accelerate.utils import set_module_tensor_to_device

        self._set = set_module_tensor_to_device
        self.model, self.fetch = model, fetch
        prefix, self.layers = decoder_layers(model)
        self.prefix = prefix + "." if prefix else ""

    def _names(self, index: int) -> list[str]:
        return [f"{self.prefix}{index}.{n}" for n, _ in self.layers[index].named_parameters()]

    def attach(self) -> list:
        handles = []
        for index, layer in enumerate(self.layers):
            handles.append(layer.register_forward_pre_hook(lambda m, a, i=index: self._load(i)))
            handles.append(layer.register_forward_hook(lambda m, a, o, i=index: self._drop(i)))
        return handles

    def _load(self, index: int) -> None:
        for name in self._names(index):
            self._set(self.model, name, "cpu", value=self.fetch(name))

    def _drop(self, index: int) -> None:
        for name in self._names(index):
            self._set(self.model, name, "meta")

    def layer_parameter_names(self) -> set[str]:
        return {name for index in range(len(self.layers)) for name in self._names(index)}


@torch.inference_mode()
def collect(model: nn.Module, batches: Iterable[torch.Tensor], layer_names: Iterable[str], threshold: float, streamer: LayerStreamer | None = None) -> ActivationStats:
    """Run the model's base (no LM head) over the batches with hooks on the named layers."""
    stats = ActivationStats(threshold)
    handles = stats.attach(model, layer_names) + (streamer.attach() if streamer else [])
    base = getattr(model, "base_model", model)
    try:
        for ids in batches:
            base(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def outlier_summary(outliers: Mapping[str, torch.Tensor]) -> dict[str, int]:
    return {name: int(idx.numel()) for name, idx in outliers.items()}
