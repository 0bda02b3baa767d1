"""Where `quantize` may write, and how: OUT is built in a marked temporary folder and moved into place.

Rules that keep a user's data safe:
- SRC and OUT may not overlap in either direction (real paths, symlinks followed): replacing OUT
  must never remove the source, and writing into the source would modify it.
- `--force` replaces a folder only when it is empty or every entry in it is a file that its
  manifest lists, unchanged (manifest.foreign_entry); anything else is refused, naming the entry.
- A temporary folder is named `.OUT.tmp-<pid>-<process start>-<random>` (a long OUT name is
  shortened there, so the name stays within the file system's 255 bytes) and holds a marker file
  while it is incomplete; a run removes the temporary folders of its OUT whose writer is gone
  (killed with SIGKILL, or a machine that went down), so nothing is left behind for good. An old
  OUT set aside by a writer that died before the new one took its place is put back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
from pathlib import Path

from llmint8_cli.checkpoint.format import QUANT_METHOD, check_block, config_block
from llmint8_cli.checkpoint.manifest import MANIFEST, PARTIAL_MARKER, SET_ASIDE_MARKER, foreign_entry
from llmint8_cli.errors import CheckpointError, InvalidArgumentError, OutputExistsError

_WORKING = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-(?P<start>\d+)-[0-9a-f]{8}")
_NAME_BYTES = 160  # of OUT's name inside a working name; the rest (~60 bytes) keeps it under 255


def _tag(name: str) -> str:
    """OUT's name as it appears in its working folders' names: a long one cut, with a hash of the whole."""
    if len(name.encode()) <= _NAME_BYTES:
        return name
    cut = name.encode()[: _NAME_BYTES - 17].decode(errors="ignore")
    return f"{cut}~{hashlib.sha256(name.encode()).hexdigest()[:16]}"


SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str, option: str | None = None) -> int:
    """'2GB', '500MB', '1GiB', '1TiB' or a byte count; `option` names the flag in the error."""
    where = f"{option}: " if option else ""
    raw = text.strip().upper()
    number = raw.rstrip("KMGTIB")
    try:
        value = int(float(number) * SIZE_UNITS[raw[len(number):]])
    except (ValueError, KeyError, OverflowError):
        raise InvalidArgumentError(f"{where}not a size: {text!r} (e.g. 2GB, 500MB)") from None
    if value <= 0:
        raise InvalidArgumentError(f"{where}a size must be positive, got {text!r}")
    return value


def human_size(count: float) -> str:
    """Bytes as a person reads them: 812 B, 3.4 KiB, 120.5 MiB, 13.2 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def _process_start(pid: int) -> int:
    """The kernel's start time of a process (clock ticks since boot), 0 where /proc does not tell.

    With the pid it tells a live writer from a later process that reused the pid.
    """
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return 0


def _writer_alive(pid: int, start: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return start == 0 or _process_start(pid) in (0, start)


def missing_folders(folder: Path) -> list[Path]:
    """`folder` and those of its parents that do not exist yet, innermost first: what making it makes."""
    return [path for path in (folder, *folder.parents) if not os.path.lexists(path)]


def remove_empty(folders: list[Path]) -> None:
    """Remove what a run made (missing_folders) where it is empty again, innermost first."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def _overlap(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def not_whole_output(folder: Path) -> str | None:
    """Why a folder whose entries its manifest lists is still no output of ours (None: it is one):
    an output has a config.json with llmint8's block (or the bitsandbytes 8-bit block `export`
    writes) and the weights it loads, model.safetensors or an index with every shard it names. A
    manifest alone can be written by anyone over anything."""
    config = folder / "config.json"
    block = config_block(folder)
    if block is None or block.get("quant_method") not in (QUANT_METHOD, "bitsandbytes"):
        return f"{config} (no quantization_config of an llmint8 output)"
    if block["quant_method"] == QUANT_METHOD:
        try:
            check_block(config, block)
        except CheckpointError as exc:
            return f"{config} (an invalid llmint8 block: {exc})"
    elif not block.get("load_in_8bit"):
        return f"{config} (not the bitsandbytes 8-bit block llmint8 export writes)"
    if (folder / "model.safetensors").is_file():
        return None
    try:
        shards = set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{folder} (no model.safetensors, nor an index of its shards)"
    missing = sorted(name for name in shards if not (isinstance(name, str) and (folder / name).is_file()))
    return f"{folder} (the index names shard {missing[0]!r}, which is not there)" if missing else None


def check_output(out: Path, source_path: Path | None, force: bool) -> Path:
    """Refuse an OUT that would lose or modify data; returns OUT's real path (where to write).

    source_path is the local model folder or file (None for a Hub id, fetched into the Hub cache).
    """
    real = out.resolve()
    if source_path is not None:
        src = source_path.resolve()
        if _overlap(real, src):
            where = "inside the source" if src in real.parents or real == src else "a folder that holds the source"
            raise InvalidArgumentError(f"{out} is {where} {src}; choose an output that neither holds nor lies inside it")
    if not os.path.lexists(out):
        return real
    if not force:
        raise OutputExistsError(f"{out} exists already; pass --force to replace an earlier llmint8 output")
    if not real.is_dir():
        raise OutputExistsError(f"{out} exists and is not a folder; --force replaces only an earlier llmint8 output")
    foreign = foreign_entry(real) or (not_whole_output(real) if any(real.iterdir()) else None)
    if foreign is not None:
        raise OutputExistsError(f"{out} is not an llmint8 output that --force may replace (only those, or an empty folder): {foreign}; nothing was changed")
    return real


def remove_stale(out: Path) -> list[Path]:
    """Remove the temporary folders of OUT left by writers that are gone; returns what was removed.

    Only folders of our naming scheme are touched, and only those that are ours for sure: a
    temporary folder with its marker, or an old OUT set aside for replacement (all of its entries
    ours). Such an old OUT is put back instead where its writer died before OUT was in place again.
    """
    removed = []
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return removed
    for path in entries:
        match = _WORKING.fullmatch(path.name)
        if not match or match["name"] != _tag(out.name) or path.is_symlink() or not path.is_dir():
            continue
        if _writer_alive(int(match["pid"]), int(match["start"])) or not _left_by_us(path, match):
            continue
        if match["kind"] == "old" and not os.path.lexists(out):
            path.rename(out)
            (out / SET_ASIDE_MARKER).unlink()
        else:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def marker_text(kind: str, name: str) -> str:
    """What our marker in a working folder says: its kind and the folder's own name, so that a
    user's folder named like ours is never taken for one (a copied marker names another folder)."""
    what = "an incomplete output, removed by the next run" if kind == "tmp" else "an earlier output set aside while its replacement takes its place"
    return f"llmint8: {name}: {what}\n"


def _left_by_us(path: Path, match) -> bool:
    """A working folder that our own marker names, and (an earlier output) whole and unchanged."""
    marker = path / (PARTIAL_MARKER if match["kind"] == "tmp" else SET_ASIDE_MARKER)
    try:
        if marker.is_symlink() or marker.read_text() != marker_text(match["kind"], path.name):
            return False
    except (OSError, UnicodeDecodeError):
        return False
    return match["kind"] == "tmp" or (foreign_entry(path, (SET_ASIDE_MARKER,)) is None and not_whole_output(path) is None)


def _working_name(out: Path, kind: str) -> Path:
    pid = os.getpid()
    return out.parent / f".{_tag(out.name)}.{kind}-{pid}-{_process_start(pid)}-{secrets.token_hex(4)}"


def make_temporary(out: Path) -> Path:
    """Create OUT's marked temporary folder: proves early (before calibration) that OUT is writable."""
    tmp = _working_name(out, "tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        (tmp / PARTIAL_MARKER).write_text(marker_text("tmp", tmp.name))
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write to {out.parent}: {exc.strerror or exc}") from None
    return tmp


def check_free_space(tmp: Path, needed: int) -> None:
    try:
        free = shutil.disk_usage(tmp).free
    except OSError:  # the OS does not tell: the write itself will say
        return
    if free < needed:
        raise CheckpointError(f"not enough free space in {tmp.parent}: the output needs about {human_size(needed)}, {human_size(free)} free")


def install(tmp: Path, out: Path, force: bool) -> None:
    """Move the finished folder into place; an old OUT (with --force) is removed only after that.

    OUT is checked again here: another run may have written it while this one worked.
    """
    (tmp / PARTIAL_MARKER).unlink()
    if not os.path.lexists(out):
        tmp.rename(out)
        return
    check_output(out, None, force)
    old = _working_name(out, "old")
    out.rename(old)
    try:
        (old / SET_ASIDE_MARKER).write_text(marker_text("old", old.name))  # what lets a later run put it back, were this one to die now
        tmp.rename(out)
    except BaseException:
        if not os.path.lexists(out):
            old.rename(out)
            (out / SET_ASIDE_MARKER).unlink(missing_ok=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")


def copy_side_files(folder: Path, dest: Path) -> None:
    """A model folder's tokenizer, generation and template files; not its weights, config or manifest."""
    for path in folder.iterdir():
        if path.is_file() and not path.name.endswith((*WEIGHT_SUFFIXES, ".index.json")) and path.name not in ("config.json", MANIFEST):
            shutil.copyfile(path, dest / path.name)


@contextlib.contextmanager
def writing(out: Path, force: bool):
    """A marked temporary folder beside OUT (a killed writer's debris removed first), moved into
    place when the block ends; on any failure it is removed and OUT is left as it was."""
    remove_stale(out)
    made = missing_folders(out.parent)  # what make_temporary creates
    tmp = None
    try:
        tmp = make_temporary(out)
        yield tmp
        install(tmp, out, force)
    except BaseException as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        remove_empty(made)  # what this run made for OUT goes too
        if isinstance(exc, OSError):
            raise CheckpointError(f"writing {out} failed: {exc.strerror or exc}") from None
        raise
