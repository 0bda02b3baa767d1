"""Read a checkpoint's tensors one at a time, without loading the whole model."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from llmint8_cli.errors import ModelLoadError


class TensorSource:
    """name -> tensor, read lazily: shape and dtype without data, data one tensor at a time."""

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, key: str) -> torch.dtype:
        raise NotImplementedError

    def get(self, key: str) -> torch.Tensor:
        raise NotImplementedError


class SafetensorsSource(TensorSource):
    """model.safetensors, or shards listed by model.safetensors.index.json (memory-mapped)."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ModelLoadError(f"{index}: not a valid safetensors index") from None
            files = sorted(set(weight_map.values()))
        else:
            files = ["model.safetensors"]
        self._handles, self._where = {}, {}
        for name in files:
            path = folder / name
            if not path.is_file():
                raise ModelLoadError(f"{path}: shard listed in the index is missing")
            try:
                handle = safe_open(str(path), framework="pt")
                keys = list(handle.keys())
            except Exception as exc:
                raise ModelLoadError(f"{path}: corrupt or truncated safetensors file ({str(exc).splitlines()[0]})") from None
            self._handles[name] = handle
            self._where.update({k: name for k in keys})

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[key]].get_slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        from llmint8_cli.checkpoint.writer import SAFETENSORS_DTYPES

        name = self._handles[self._where[key]].get_slice(key).get_dtype()
        return {v: k for k, v in SAFETENSORS_DTYPES.items()}[name]

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._handles[self._where[key]].get_tensor(key)
        except Exception as exc:
            raise ModelLoadError(f"{self._where[key]}: cannot read tensor {key} ({str(exc).splitlines()[0]})") from None


class DictSource(TensorSource):
    """Tensors already indexed by name (memory-mapped or in memory)."""

    _tensors: dict[str, torch.Tensor]

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._tensors[key].dtype

    def get(self, key: str) -> torch.Tensor:
        return self._tensors[key]


class TorchBinSource(DictSource):
    """pytorch_model*.bin read with weights_only=True: plain tensors only, never pickled code."""

    def __init__(self, folder: Path):
        files = sorted(folder.glob("pytorch_model*.bin"))
        self._tensors: dict[str, torch.Tensor] = {}
        for path in files:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except pickle.UnpicklingError:
                raise ModelLoadError(f"{path}: refusing to load: the file holds pickled objects other than tensors (possible code)") from None
            except Exception as exc:
                raise ModelLoadError(f"{path}: unreadable PyTorch checkpoint ({str(exc).splitlines()[0]})") from None
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise ModelLoadError(f"{path}: not a state dict of tensors")
            self._tensors.update(state)


class ModelSource(DictSource):
    """An in-memory model's state dict (GGUF files are expanded by transformers on load)."""

    def __init__(self, model: torch.nn.Module):
        self._tensors = dict(model.state_dict())


def open_folder(folder: Path) -> TensorSource:
    if (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file():
        return SafetensorsSource(folder)
    if any(folder.glob("pytorch_model*.bin")):
        return TorchBinSource(folder)
    raise ModelLoadError(f"{folder}: no safetensors or pytorch_model*.bin weights")
