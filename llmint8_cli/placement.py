"""Models larger than one device: accelerate's device maps, chosen before any weight is read.

`--device-map auto|balanced|balanced_low_0|sequential` lets accelerate place whole decoder layers
(the model's `_no_split_modules`) over the GPUs, the CPU and, past `--max-memory`, the disk
(`--offload-folder`); a JSON object (or a .json file) gives the map itself. The map is computed
here on a skeleton of the model (meta tensors, int8 shells for an llmint8 folder) so that a model
that does not fit is one line, exit 2, before transformers reads a weight; the explicit map is
then what transformers loads with, and what the commands print and record.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from llmint8_cli.checkpoint.output import human_size, missing_folders, parse_size, remove_empty
from llmint8_cli.errors import InvalidArgumentError

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
DEVICE_MAP_HELP = (
    "Spread the model over devices with accelerate, whole decoder layers each: auto or balanced (even over the GPUs), "
    "balanced_low_0 (less on GPU 0), sequential (fill GPU 0 first), or a JSON object / .json file of module -> device "
    "(0, cuda:1, cpu, disk). Layers past --max-memory go to the CPU, then to --offload-folder."
)
MAX_MEMORY_HELP = "Memory each device may hold for weights, e.g. 0=20GiB,1=20GiB,cpu=64GiB (with --device-map; default: what is free)."
OFFLOAD_HELP = "Folder for the layers that fit on no device (--device-map): read from disk at each forward pass, slowly."


@dataclass(frozen=True)
class Placement:
    """What the user asked for; `device_map` turns it into a map for one model."""

    strategy: str | None  # one of STRATEGIES, or None where `explicit` is given
    explicit: dict | None  # module name -> device
    max_memory: dict | None  # device (int GPU index, "cpu") -> bytes
    offload_folder: str | None
    from_python: bool = False  # asked for with load()'s arguments: messages name those, not the CLI's options

    @classmethod
    def of(cls, device_map: str | dict, max_memory: dict | None = None, offload_folder: str | None = None) -> Placement:
        """From the Python API's arguments, as transformers takes them ({0: "20GiB", "cpu": ...})."""
        if isinstance(device_map, (int, torch.device)) or (isinstance(device_map, str) and device_map not in STRATEGIES):
            device_map = {"": str(device_map)}  # one device, as transformers takes "cpu", "cuda:1" or 0
        explicit = {key: parse_device(device, "device_map") for key, device in device_map.items()} if isinstance(device_map, dict) else None
        memory = None if max_memory is None else {
            parse_device(device, "max_memory"): size if isinstance(size, int) else parse_size(str(size), "max_memory") for device, size in max_memory.items()
        }
        return cls(None if explicit is not None else device_map, explicit, memory, None if offload_folder is None else str(offload_folder), from_python=True)

    def main_device(self) -> torch.device:
        """Where inputs start: the first GPU the placement may use, else the CPU."""
        if self.explicit is not None:
            return main_device(self.explicit)
        gpus = [d for d in self.max_memory if isinstance(d, int)] if self.max_memory is not None else list(range(torch.cuda.device_count()))
        return torch.device("cuda", min(gpus)) if gpus else torch.device("cpu")

    def device_map(self, model: torch.nn.Module, dtype: torch.dtype, label: str, buffers_are_weights: bool = False) -> dict:
        """module -> device for `model` (a skeleton on meta is enough): checked devices, every
        parameter covered, and the disk used only with an offload folder. `buffers_are_weights`:
        the model's weights are buffers (Int8Linear's int8 rows), placed and offloaded as weights."""
        if self.explicit is not None:
            device_map = self.explicit
            covered = lambda name: any(name == key or name.startswith(key + ".") or key == "" for key in device_map)  # noqa: E731
            missing = next((name for name, _ in model.named_parameters() if not covered(name)), None)
            if missing:
                raise InvalidArgumentError(f"--device-map names no device for {missing} (give its module or a parent, or \"\" for the rest)")
        else:
            device_map = infer(model, self.strategy, self.max_memory, dtype, buffers_are_weights)
        if "disk" in device_map.values() and not self.offload_folder:
            memory = ", ".join(f"{device}={human_size(size)}" for device, size in (self.max_memory or {}).items()) or "what is free on this machine"
            more = "max_memory={...}, or offload_folder=DIR" if self.from_python else "--max-memory, or --offload-folder DIR"
            raise InvalidArgumentError(f"{label} ({human_size(model_bytes(model, dtype))} of weights in {str(dtype).removeprefix('torch.')}) does not fit in "
                                       f"{memory}: give more with {more} to keep the rest on disk")
        return device_map


def infer(model: torch.nn.Module, strategy: str, max_memory: dict | None, dtype: torch.dtype, offload_buffers: bool) -> dict:
    """accelerate's map, as transformers computes it for the same strategy."""
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    no_split = list(getattr(model, "_no_split_modules", None) or [])
    if strategy != "sequential":
        max_memory = get_balanced_memory(model, max_memory, no_split, dtype, low_zero=strategy == "balanced_low_0")
    return infer_auto_device_map(model, max_memory, no_split, dtype, offload_buffers=offload_buffers)


def model_bytes(model: torch.nn.Module, dtype: torch.dtype) -> int:
    from accelerate.utils import compute_module_sizes

    return compute_module_sizes(model, dtype=dtype)[""]


def parse_device(value, option: str):
    """0, "0", "cuda", "cuda:1" -> GPU index; "cpu", "disk" as they are; a GPU this machine lacks is refused."""
    text = str(value).strip().lower()
    if text in ("cpu", "disk"):
        return text
    index = "0" if text == "cuda" else text.removeprefix("cuda:")
    if not index.isdigit():
        raise InvalidArgumentError(f"{option}: unknown device {value!r} (a GPU index such as 0 or cuda:1, cpu or disk)")
    if int(index) >= torch.cuda.device_count():
        raise InvalidArgumentError(f"{option}: GPU {index} asked for, but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return int(index)


def parse_max_memory(text: str) -> dict:
    """'0=20GiB,1=20GiB,cpu=64GiB' -> {0: bytes, 1: bytes, "cpu": bytes}."""
    memory = {}
    for part in text.split(","):
        device, sep, size = part.partition("=")
        if not sep:
            raise InvalidArgumentError(f"--max-memory: {part.strip()!r} is not DEVICE=SIZE (e.g. 0=20GiB,cpu=64GiB)")
        key = parse_device(device, "--max-memory")
        if key == "disk":
            raise InvalidArgumentError("--max-memory: the disk has no limit here; give --offload-folder for it")
        memory[key] = parse_size(size, "--max-memory")
    return memory


def parse_explicit(text: str) -> dict:
    path = Path(text)
    try:
        source = path.read_text(encoding="utf-8") if text.endswith(".json") and path.is_file() else text
        mapping = json.loads(source)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, nested past Python's stack
        raise InvalidArgumentError(f"--device-map must be one of {', '.join(STRATEGIES)}, a JSON object or a .json file; got {text[:60]!r}") from None
    except OSError as exc:
        raise InvalidArgumentError(f"--device-map {text}: cannot read it ({exc.strerror or exc})") from None
    if not isinstance(mapping, dict) or not mapping or not all(isinstance(key, str) for key in mapping):
        raise InvalidArgumentError("--device-map: the JSON must be an object of module name -> device")
    return {key: parse_device(device, "--device-map") for key, device in mapping.items()}


def parse(device_map: str | None, max_memory: str | None, offload_folder: str | None) -> Placement | None:
    """The options as one Placement (None: the whole model on one device, as --device says)."""
    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise InvalidArgumentError(f"{'--max-memory' if max_memory is not None else '--offload-folder'} places a model with --device-map; give one (e.g. --device-map auto)")
        return None
    if offload_folder is not None and Path(offload_folder).exists() and not Path(offload_folder).is_dir():
        raise InvalidArgumentError(f"--offload-folder {offload_folder}: not a folder")
    explicit = None if device_map in STRATEGIES else parse_explicit(device_map)
    return Placement(None if explicit else device_map, explicit, parse_max_memory(max_memory) if max_memory is not None else None, offload_folder)


def for_this_run(chosen: Placement | None, at_end) -> Placement | None:
    """The CLI's placement: what accelerate offloads goes to a folder of this run inside
    --offload-folder, removed by `at_end` (a callback registrar: when the command ends, Ctrl-C and
    SIGTERM too), and the --offload-folder itself with it where the run made it; the disk is left
    as it was found."""
    if chosen is None or chosen.offload_folder is None:
        return chosen
    folder = Path(chosen.offload_folder).absolute()
    made = missing_folders(folder)
    try:  # a folder that cannot be written is one line now, not an error from accelerate after the model was read
        folder.mkdir(parents=True, exist_ok=True)
        run = Path(tempfile.mkdtemp(prefix="llmint8-offload-", dir=folder))
    except OSError as exc:
        remove_empty(made)
        raise InvalidArgumentError(f"--offload-folder {chosen.offload_folder}: cannot write there ({exc.strerror or exc})") from None

    def remove() -> None:
        shutil.rmtree(run, ignore_errors=True)
        remove_empty(made)

    at_end(remove)
    return replace(chosen, offload_folder=str(run))


def main_device(device_map: dict) -> torch.device:
    """Where inputs start and results are read: the first GPU of the map, else the CPU."""
    gpus = sorted(d for d in device_map.values() if isinstance(d, int))
    return torch.device("cuda", gpus[0]) if gpus else torch.device("cpu")


def describe(device_map: dict) -> dict:
    """For the JSON: the map itself and the number of modules on each device."""
    shown = {key: (f"cuda:{device}" if isinstance(device, int) else device) for key, device in device_map.items()}
    return {"device_map": shown, "modules_per_device": dict(Counter(shown.values()))}


def line(label: str, device_map: dict) -> str:
    """One stderr line: where a model's modules went."""
    counts = describe(device_map)["modules_per_device"]
    return f"placement of {label}: " + ", ".join(f"{n} module{'s' * (n > 1)} on {device}" for device, n in counts.items())
