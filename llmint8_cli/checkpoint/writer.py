"""A streaming safetensors writer: headers are planned from shapes, data is written tensor by tensor.

safetensors' own save_file needs a whole shard in memory; planning the layout first lets the
quantizer hold only the tensors in hand (peak memory ~ two of the largest tensor), and the
sha256 of each file is computed while it is written.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

SAFETENSORS_DTYPES = {
    torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
    torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL",
}


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class Group:
    """Output tensors made together from one source tensor (kept in one shard)."""

    entries: list[Entry]
    produce: Callable[[], dict[str, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)


@dataclass
class Shard:
    groups: list[Group] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(g.nbytes for g in self.groups)


def plan_shards(groups: Iterable[Group], max_shard_bytes: int) -> list[Shard]:
    shards = [Shard()]
    for group in groups:
        if shards[-1].groups and shards[-1].nbytes + group.nbytes > max_shard_bytes:
            shards.append(Shard())
        shards[-1].groups.append(group)
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def _header(shard: Shard) -> bytes:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for group in shard.groups:
        for entry in group.entries:
            header[entry.name] = {"dtype": SAFETENSORS_DTYPES[entry.dtype], "shape": list(entry.shape), "data_offsets": [offset, offset + entry.nbytes]}
            offset += entry.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_shard(path: Path, shard: Shard, on_group: Callable[[Group], None] | None = None) -> str:
    """Write one shard, producing each group's tensors only when its turn comes; returns sha256.

    The next group is produced (read from the source and quantized) in a worker thread while the
    current one is written and hashed: reading waits on the disk and the rest on the CPU, so the
    two overlap. At most two groups are in memory at once.
    """
    digest = hashlib.sha256()
    groups = shard.groups
    with path.open("wb") as handle, ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmint8-produce") as worker:
        head = _header(shard)
        handle.write(head)
        digest.update(head)
        pending = worker.submit(groups[0].produce) if groups else None
        for index, group in enumerate(groups):
            tensors = pending.result()
            pending = worker.submit(groups[index + 1].produce) if index + 1 < len(groups) else None
            for entry in group.entries:
                tensor = tensors[entry.name]
                if tensor.dtype != entry.dtype or tuple(tensor.shape) != entry.shape:
                    raise RuntimeError(f"{entry.name}: produced {tensor.dtype} {tuple(tensor.shape)}, planned {entry.dtype} {entry.shape}")
                data = memoryview(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
                handle.write(data)
                digest.update(data)
            del tensors
            if on_group is not None:
                on_group(group)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_tensors(folder: Path, groups: list[Group], max_shard_bytes: int, progress: Callable[[int, int], None] | None = None) -> dict[str, str]:
    """Write the groups as model.safetensors (or shards + index) into folder; {file: sha256}.

    `progress(done, total)` in bytes, after each group.
    """
    shards = plan_shards(groups, max_shard_bytes)
    names = shard_names(len(shards))
    total, done, hashes = sum(s.nbytes for s in shards), 0, {}
    for file, shard in zip(names, shards):
        def advance(group: Group) -> None:
            nonlocal done
            done += group.nbytes
            if progress:
                progress(done, total)

        hashes[file] = write_shard(folder / file, shard, advance)
    if len(shards) > 1:
        weight_map = {e.name: file for file, s in zip(names, shards) for g in s.groups for e in g.entries}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1) + "\n")
    return hashes
