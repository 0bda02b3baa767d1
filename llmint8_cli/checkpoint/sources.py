"""Read a checkpoint's tensors one at a time, without loading the whole model."""

from __future__ import annotations

import json
import math
import pickle
import struct
import zipfile
from pathlib import Path

import torch

from llmint8_cli.checkpoint.manifest import is_plain_name
from llmint8_cli.checkpoint.writer import SAFETENSORS_DTYPES
from llmint8_cli.errors import ModelLoadError, one_line


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
    """model.safetensors, or shards listed by model.safetensors.index.json.

    Tensors are read with positioned reads into fresh buffers rather than memory-mapped: pages of
    a mapped multi-GB shard stay in the process's resident set, while read pages only pass through
    the page cache, so memory stays at about one tensor whatever the model size.
    """

    def __init__(self, folder: Path):
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError, TypeError, RecursionError):
                raise ModelLoadError(f"{index}: not a valid safetensors index (JSON with a \"weight_map\" object)") from None
            if not isinstance(weight_map, dict) or not all(isinstance(key, str) and is_plain_name(name) for key, name in weight_map.items()):
                raise ModelLoadError(f"{index}: \"weight_map\" must be an object of tensor name -> shard file name in the folder")
            files = sorted(set(weight_map.values()))
        else:
            files = ["model.safetensors"]
        self._entries: dict[str, tuple[Path, int, dict]] = {}
        for name in files:
            path = folder / name
            if not path.is_file():
                raise ModelLoadError(f"{path}: shard listed in the index is missing")
            for key, (start, entry) in read_header(path).items():
                self._entries[key] = (path, start, entry)

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entries[key][2]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return DTYPES[self._entries[key][2]["dtype"]]

    def get(self, key: str) -> torch.Tensor:
        path, start, entry = self._entries[key]
        begin, end = entry["data_offsets"]
        buffer = torch.empty(end - begin, dtype=torch.uint8)  # not zero-filled, unlike a bytearray
        try:
            with path.open("rb") as handle:
                handle.seek(start + begin)
                complete = handle.readinto(buffer.numpy()) == len(buffer)
        except OSError as exc:
            raise ModelLoadError(f"{path}: cannot read tensor {key} ({exc.strerror or exc})") from None
        if not complete:
            raise ModelLoadError(f"{path}: truncated while reading tensor {key}")
        return buffer.view(self.dtype(key)).reshape(entry["shape"])


DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


def read_header(path: Path) -> dict[str, tuple[int, dict]]:
    """{key: (absolute offset of the data section, header entry)}; corrupt or truncated files raise.

    Every entry is checked against the format (a dtype we read, a shape of non-negative integers,
    a byte range inside the file and exactly as long as the shape needs), so that a bad tensor is
    reported here, naming it, and never later as a failed reshape.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > size - 8 or length > 100 << 20:
                raise ValueError("header length beyond the file")
            header = json.loads(handle.read(length))
        if not isinstance(header, dict):
            raise ValueError(f"the header is a JSON {type(header).__name__}, not an object")
        start = 8 + length
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        for key, entry in entries.items():
            check_entry(key, entry, size - start)
        check_disjoint(entries)
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except (ValueError, struct.error, UnicodeDecodeError, RecursionError) as exc:
        raise ModelLoadError(f"{path}: corrupt or truncated safetensors file ({exc})") from None
    return {key: (start, entry) for key, entry in entries.items()}


def safetensors_keys(folder: Path) -> list[str]:
    """Every tensor name of a folder's safetensors files, from their headers (a bad file raises)."""
    return [key for file in sorted(Path(folder).glob("*.safetensors")) for key in read_header(file)]


def check_disjoint(entries: dict[str, dict]) -> None:
    """No two tensors share bytes: a header whose ranges overlap makes one tensor's data another's."""
    ranges = sorted((entry["data_offsets"][0], entry["data_offsets"][1], key) for key, entry in entries.items() if entry["data_offsets"][1] > entry["data_offsets"][0])
    for (_, end, first), (begin, _, second) in zip(ranges, ranges[1:]):
        if begin < end:
            raise ValueError(f"the data of tensors {first} and {second} overlap")


def check_entry(key: str, entry, data_size: int) -> None:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise ValueError(f"tensor {key}: the entry needs dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPES:
        raise ValueError(f"tensor {key}: unsupported dtype {dtype}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"tensor {key}: shape {shape} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets) and 0 <= offsets[0] <= offsets[1]):
        raise ValueError(f"tensor {key}: data_offsets {offsets} is not a [begin, end] byte range")
    if offsets[1] > data_size:
        raise ValueError(f"data of {key} runs past the end of the file")
    needed = math.prod(shape) * DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != needed:
        raise ValueError(f"tensor {key}: shape {shape} needs {needed} bytes, its data range holds {offsets[1] - offsets[0]}")


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


class ModelKeyedSource(TensorSource):
    """Another source's tensors under the model's own names (`parts`: name -> the source keys it
    is made of); a name made of several (an expert's gate and up rows) joins them along the first
    dimension, and a name in `slices` is one slice of a source tensor that holds every expert of a
    block (name -> (its index along the first dimension, whether the slice is stored transposed);
    the tensor read once for all its experts)."""

    def __init__(self, source: TensorSource, parts: dict[str, list[str]], slices: dict[str, tuple[int, bool]] | None = None):
        self.source, self.parts, self.slices = source, parts, slices or {}
        self._last: tuple[str, torch.Tensor] | None = None  # the block's tensor its experts are sliced from, read once

    def keys(self) -> list[str]:
        return list(self.parts)

    def shape(self, key: str) -> tuple[int, ...]:
        if key in self.slices:
            shape = tuple(self.source.shape(self.parts[key][0])[1:])
            return shape[::-1] if self.slices[key][1] else shape
        first, *rest = (self.source.shape(k) for k in self.parts[key])
        return (first[0] + sum(shape[0] for shape in rest), *first[1:])

    def dtype(self, key: str) -> torch.dtype:
        return self.source.dtype(self.parts[key][0])

    def get(self, key: str) -> torch.Tensor:
        keys = self.parts[key]
        if key in self.slices:
            if self._last is None or self._last[0] != keys[0]:
                self._last = (keys[0], self.source.get(keys[0]))
            index, transposed = self.slices[key]
            part = self._last[1][index]
            return part.t().contiguous() if transposed else part.clone()
        return self.source.get(keys[0]) if len(keys) == 1 else torch.cat([self.source.get(k) for k in keys])

    def described(self, key: str) -> str:
        """The source keys behind a name, for messages (a user knows their checkpoint's names)."""
        return f"{self.parts[key][0]}[{self.slices[key][0]}]" if key in self.slices else " + ".join(self.parts[key])


class TorchBinSource(DictSource):
    """pytorch_model*.bin read with weights_only=True: plain tensors only, never pickled code."""

    def __init__(self, folder: Path):
        files = sorted(folder.glob("pytorch_model*.bin"))
        self._tensors: dict[str, torch.Tensor] = {}
        for path in files:
            try:  # mmap needs the zip format of torch >= 1.6; an older file is read whole
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
            except pickle.UnpicklingError:
                raise ModelLoadError(f"{path}: refusing to load: the file holds pickled objects other than tensors (possible code)") from None
            except Exception as exc:
                raise ModelLoadError(f"{path}: unreadable PyTorch checkpoint ({one_line(exc)})") from None
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
