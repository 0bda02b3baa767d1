"""Hooks on linear-layer inputs: the outlier statistics behind calibration and `llmint8 outliers`.

A feature (input column of a linear layer) is an outlier when some |x| >= threshold (paper §3.2).
The same collector feeds `quantize --calib-samples` (which columns to store in 16-bit) and the
§4 analysis of `llmint8 outliers` (how many layers and positions each feature touches).

For models larger than memory, LayerStreamer loads each decoder layer's weights from the source
checkpoint just before the layer runs and drops them right after, so a calibration pass holds
one decoder layer at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn


SYSTEMATIC_LAYER_SHARE = 0.25  # a systematic feature touches at least this share of the layers (paper §4)
SYSTEMATIC_POSITION_SHARE = 0.06  # and of the sequence positions


class ActivationStats:
    """Per layer: max |x| of each input column, and how many rows reached the threshold there."""

    def __init__(self, threshold: float, hidden_size: int | None = None):
        self.threshold = threshold
        self.hidden_size = hidden_size  # the width of the residual stream: which layers read it (systematic features)
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

    def hidden_state_layers(self) -> list[str]:
        """The layers whose input is the (normalized) residual stream, where emergent features live."""
        if self.hidden_size is None:
            return []
        return [name for name, m in self.col_max.items() if reads_hidden_state(name, m.numel(), self.hidden_size)]

    def standing_out(self, ratio: float) -> dict[str, torch.Tensor]:
        """Per layer reading the hidden state, a mask of the columns whose max |x| is at least
        `ratio` times the layer's median column max (none where that median is 0: no typical
        column to stand above)."""
        masks = {}
        for name in self.hidden_state_layers():
            median = self.col_max[name].median()
            masks[name] = (self.col_max[name] >= ratio * median) & (median > 0)
        return masks

    def systematic_columns(self, ratio: float, layer_share: float = SYSTEMATIC_LAYER_SHARE) -> dict[str, torch.Tensor]:
        """Per layer reading the hidden state, a mask of the columns of systematic features: hidden
        dimensions that stand `ratio` times above the layer's typical column there and do so in at
        least `layer_share` of those layers (the paper's 25 %, §4). Emergent features are known by
        that shape, not their size: one of 30 in layers whose columns peak near 0.5 is one. A column
        far above the rest in a single layer is left to the threshold, so models without such
        features store what the threshold alone stores."""
        standing = self.standing_out(ratio)
        if not standing:
            return {}
        systematic = torch.stack(list(standing.values())).float().mean(0) >= layer_share
        return {name: mask & systematic for name, mask in standing.items()}

    def outlier_columns(self, threshold: float | None = None, ratio: float = 0.0) -> dict[str, torch.Tensor]:
        """Sorted indices of the columns to store, per layer: those that reached the threshold (the
        collector's, or a higher one) and, with `ratio` > 0, the systematic features' columns."""
        threshold = self.threshold if threshold is None else threshold
        systematic = self.systematic_columns(ratio) if ratio > 0 else {}
        return {name: torch.nonzero((m >= threshold) | systematic.get(name, False)).flatten() for name, m in self.col_max.items()}


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


def hidden_size_of(model: nn.Module) -> int:
    """The width of the residual stream: the (text) config's hidden size, else the embeddings' (OPT-350m embeds in 512 and projects to 1024)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(config, "hidden_size", None) or model.get_input_embeddings().weight.shape[-1]


@torch.inference_mode()
def collect(model: nn.Module, batches: Iterable[torch.Tensor], layer_names: Iterable[str], threshold: float, streamer: LayerStreamer | None = None, on_batch: Callable[[int], None] | None = None) -> ActivationStats:
    """Run the model's base (no LM head) over the batches with hooks on the named layers.

    on_batch(rows done so far) is called after each batch (calibration's progress).
    """
    stats = ActivationStats(threshold, hidden_size=hidden_size_of(model))
    handles = stats.attach(model, layer_names) + (streamer.attach() if streamer else [])
    base = getattr(model, "base_model", model)
    device = model.get_input_embeddings().weight.device
    device = torch.device("cpu") if device.type == "meta" else device  # streamed: the embeddings come to the CPU
    try:
        done = 0
        for ids in batches:
            base(input_ids=ids.to(device), use_cache=False)
            done += len(ids)
            if on_batch is not None:
                on_batch(done)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def outlier_summary(outliers: Mapping[str, torch.Tensor]) -> dict[str, int]:
    return {name: int(idx.numel()) for name, idx in outliers.items()}


ATTENTION_WORDS = ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value", "c_proj.attn")


OUTPUT_PROJECTIONS = ("o_proj", "out_proj", "down_proj", "fc2", "c_proj", "dense_4h_to_h", "attention.dense")


def reads_hidden_state(name: str, in_features: int, hidden_size: int) -> bool:
    """Whether a layer's input is the (normalized) residual stream, not an output projection's input."""
    return in_features == hidden_size and not any(word in name for word in OUTPUT_PROJECTIONS)


def layer_kind(name: str) -> str:
    """'attention' or 'ffn' from a linear layer's module name."""
    return "attention" if any(word in name for word in ATTENTION_WORDS) else "ffn"


def analyze(stats: ActivationStats, layer_shapes: Mapping[str, tuple[int, int]], ratio: float, layer_share: float = SYSTEMATIC_LAYER_SHARE,
            position_share: float = SYSTEMATIC_POSITION_SHARE) -> dict:
    """The paper's §4 view of the collected statistics.

    Per layer: outlier columns and largest magnitude. Per feature dimension of the hidden state
    (over the layers whose input is the hidden state): the share of those layers where it is an
    outlier and the share of their (layer, position) pairs where |x| >= threshold; it is
    systematic when it reaches both `layer_share` (25 %) and `position_share` (6 %). Beside it,
    the calibration's view: how far the feature stands above its layers' typical column
    (`times_median`) and the share of layers where it stands `ratio` times above, which makes it
    systematic for an outlier ratio whatever its size (ActivationStats.systematic_columns).
    Also the share of activations and of linear parameters the decomposition keeps in 16-bit.
    """
    columns = stats.outlier_columns()
    layers, kept_acts, all_acts, kept_params, all_params = {}, 0, 0, 0, 0
    for name, idx in columns.items():
        out_f, in_f = layer_shapes[name]
        rows = stats.rows[name]
        layers[name] = {"kind": layer_kind(name), "in_features": in_f, "outlier_columns": int(idx.numel()), "max_abs": round(float(stats.col_max[name].max()), 3)}
        kept_acts += int(idx.numel()) * rows
        all_acts += in_f * rows
        kept_params += int(idx.numel()) * out_f
        all_params += in_f * out_f
    hidden_layers = stats.hidden_state_layers()
    per_dim = []
    if hidden_layers:
        is_outlier = torch.stack([stats.col_max[n] >= stats.threshold for n in hidden_layers]).float()
        hits = torch.stack([stats.col_hits[n].float() for n in hidden_layers]).sum(0)
        rows = sum(stats.rows[n] for n in hidden_layers)
        layers_affected = is_outlier.mean(0)
        positions_affected = hits / max(rows, 1)
        above_median = torch.stack([stats.col_max[n] / stats.col_max[n].median().clamp(min=torch.finfo(torch.float32).tiny) for n in hidden_layers])
        standing = torch.stack(list(stats.standing_out(ratio).values())).float().mean(0)
        for dim in torch.nonzero((layers_affected > 0) | (standing > 0)).flatten().tolist():
            share_l, share_p, share_s = float(layers_affected[dim]), float(positions_affected[dim]), float(standing[dim])
            per_dim.append({
                "dim": dim, "layer_share": round(share_l, 4), "position_share": round(share_p, 5),
                "max_abs": round(max(float(stats.col_max[n][dim]) for n in hidden_layers), 3),
                "systematic": share_l >= layer_share and share_p >= position_share,
                "times_median": round(float(above_median[:, dim].max()), 1), "standing_share": round(share_s, 4), "systematic_by_ratio": share_s >= layer_share,
            })
        per_dim.sort(key=lambda d: (-d["layer_share"], -d["standing_share"], -d["position_share"]))
    return {
        "threshold": stats.threshold,
        "criteria": {"layer_share": layer_share, "position_share": position_share},
        "hidden_size": stats.hidden_size,
        "hidden_state_layers": len(hidden_layers),
        "layers": layers,
        "features": per_dim,
        "systematic_features": [d["dim"] for d in per_dim if d["systematic"]],
        "outlier_ratio": ratio,
        "systematic_by_ratio": [d["dim"] for d in per_dim if d["systematic_by_ratio"]],
        "activation_share_16bit": round(kept_acts / max(all_acts, 1), 6),
        "parameter_share_16bit": round(kept_params / max(all_params, 1), 6),
        "outlier_columns_by_kind": {
            kind: sum(v["outlier_columns"] for v in layers.values() if v["kind"] == kind) for kind in ("attention", "ffn")
        },
    }
