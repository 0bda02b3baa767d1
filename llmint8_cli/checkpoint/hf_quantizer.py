"""transformers integration: `AutoModelForCausalLM.from_pretrained(OUT)` of an llmint8 folder.

`import llmint8_cli` registers the quantization config and the HfQuantizer for quant_method
"llmint8". Without them transformers skips an unknown quantization with a warning and casts the
int8 rows into 16-bit Linear weights: a silently wrong model. The quantizer builds Int8Linear
shells sized from the checkpoint files (the number of stored outlier columns differs per layer)
before transformers loads the tensors into them by name, so the model equals `llmint8_cli.load`.
It verifies the folder against its manifest first and the loaded values after, as `load` does;
LLMINT8_NO_VERIFY=1 skips the manifest check (the value checks always run).
"""

from __future__ import annotations

import functools
import sys
import types
from pathlib import Path

from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from llmint8_cli.checkpoint.format import QUANT_METHOD, check_block, config_block, refuse_lost_block
from llmint8_cli.checkpoint.manifest import verification_wanted, verify, write_manifest
from llmint8_cli.errors import CheckpointError
from llmint8_cli.nn.attention import use_native_attention
from llmint8_cli.nn.experts import unfuse_experts


class LLMInt8Config(QuantizationConfigMixin):
    """The `quantization_config` block of an llmint8 folder (FORMAT.md), kept field for field."""

    def __init__(self, **block):
        self.__dict__.update(block)
        self.quant_method = QUANT_METHOD
        check_block(Path("quantization_config"), self.__dict__)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class LLMInt8HfQuantizer(HfQuantizer):
    """Loads pre-quantized llmint8 folders; quantizing at load time is `llmint8 quantize`'s job."""

    requires_calibration = True  # only pre-quantized folders

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, dtype=None, **kwargs):
        """Verify the folder as `llmint8_cli.load` does (LLMINT8_NO_VERIFY=1 skips the hashes), then shells."""
        from llmint8_cli.checkpoint.load import install_shells, stored_tensors

        files = [Path(f) for f in checkpoint_files or []]
        if not files:
            raise CheckpointError("an llmint8 folder without safetensors weights")
        self.folder = files[0].parent
        if verification_wanted():
            verify(self.folder)
        unfuse_experts(model)  # the format stores each expert's layers as linear layers
        install_shells(model, self.quantization_config.to_dict(), stored_tensors(files), dtype or model.dtype, self.folder)

    def _process_model_after_weight_loading(self, model, **kwargs):
        from llmint8_cli.checkpoint.load import check_loaded

        check_loaded(model, self.folder)
        keep_saving_valid(model)
        return use_native_attention(model)

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        """Adapters (peft LoRA, nn/lora.py) train on it, as on bitsandbytes 8-bit; the int8 weights stay frozen."""
        return True

    @property
    def is_compileable(self) -> bool:
        """Int8Linear is one torch op with a fake implementation (ops.py): generate may compile the model."""
        return True


def keep_saving_valid(model) -> None:
    """`save_pretrained` of this model writes an llmint8 folder `load` accepts: the block records
    the dtype the 16-bit tensors are saved in, and the manifest, written after the files, lists
    the files this save wrote (not a user's own files already in the folder, which `--force`
    must never count as ours)."""
    save = type(model).save_pretrained

    def save_pretrained(self, save_directory, *args, **kwargs):
        block = self.config.quantization_config
        block.dtype = str(self.dtype).removeprefix("torch.")
        folder = Path(save_directory)
        before = file_states(folder)
        save(self, save_directory, *args, **kwargs)
        written = {name for name, state in file_states(folder).items() if before.get(name) != state}
        write_manifest(folder, names=written)

    model.save_pretrained = types.MethodType(save_pretrained, model)


def file_states(folder: Path) -> dict[str, tuple[int, int]]:
    """{file name: (size, modification time in ns)} of a folder's files (empty if it does not exist)."""
    if not folder.is_dir():
        return {}
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()}


def attach(model, block: dict) -> None:
    """Make a model quantized in memory (quantize_model) look like one transformers loaded with the
    quantizer, so that save_pretrained writes an llmint8 folder."""
    config = LLMInt8Config(**block)
    model.config.quantization_config = config
    model.hf_quantizer = LLMInt8HfQuantizer(config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    keep_saving_valid(model)


def checked_before_building(get_hf_quantizer):
    """transformers' `get_hf_quantizer`, the last step of `from_pretrained` before it builds the
    model, followed by what must be refused before then: a local folder holding llmint8 tensors
    whose config lost its block (it would load as a 16-bit model holding int8 values), and a config
    that asks for more layers than the weights hold (a config of 10^6 layers builds for hours)."""
    if getattr(get_hf_quantizer, "llmint8_checked", False):
        return get_hf_quantizer

    @functools.wraps(get_hf_quantizer)
    def checked(config, *args, **kwargs):
        from llmint8_cli import models
        from llmint8_cli.checkpoint.sources import safetensors_keys

        hf_quantizer, config, device_map = get_hf_quantizer(config, *args, **kwargs)
        folder = Path(str(getattr(config, "name_or_path", "") or ""))
        if str(folder) and folder.is_dir() and not kwargs.get("gguf_file"):  # a GGUF file's folder may hold anything beside it
            keys = safetensors_keys(folder)
            if not isinstance(hf_quantizer, LLMInt8HfQuantizer):
                refuse_lost_block(folder, config_block(folder), keys)
            models.check_layer_count(config, keys, folder / "config.json")
        return hf_quantizer, config, device_map

    checked.llmint8_checked = True
    return checked


def install_checks() -> None:
    """checked_before_building in place of transformers' own, where from_pretrained calls it."""
    for name in ("transformers.quantizers.auto", "transformers.modeling_utils"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "get_hf_quantizer"):
            module.get_hf_quantizer = checked_before_building(module.get_hf_quantizer)


AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(QUANT_METHOD, LLMInt8Config)
AUTO_QUANTIZER_MAPPING.setdefault(QUANT_METHOD, LLMInt8HfQuantizer)
install_checks()
