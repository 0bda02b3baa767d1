"""Does a converted model compute what its 16-bit model computes, up to the quantization's own error?

`quantize`, evaluations on the fly and `export` run this before they commit what they made. A
few tokens go through the converted model; each of its decoder blocks is also run in 16-bit on the
very same input, and the converted block's output may differ from the 16-bit one only as much as
its int8 layers' own errors explain (each layer's output against its 16-bit map of the same input,
measured in the same pass: a coarse method explains a large error, llm.int8() a small one). A block
beyond that, a block that raises, or logits that are not finite, is a fault: the layer at fault is
the int8 layer whose 16-bit original, put back alone, makes the block pass. The rows of the batch
are the same tokens twice: row 0 runs the converted model, row 1 the 16-bit blocks, so one pass
also gives the 16-bit logits the report compares with.

Models held as skeletons (quantize streams a model larger than memory) come in block by block
through `fetch` functions, as calibration streams them (activations.LayerStreamer).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

from llmint8_cli.activations import decoder_layers
from llmint8_cli.errors import ConversionError, one_line
from llmint8_cli.nn.convert import replace_module
from llmint8_cli.nn.linear import Int8Linear
from llmint8_cli.nn.probe import linear_map, linear_map_problem, own_forward

CHECK_TOKENS = 64  # calibration tokens the check runs
EXPLAINED_FACTOR = 8.0  # a block's error may be this many times its worst int8 layer's error (measured: healthy blocks stay under 4.5x, MoE routing flips included)
ROUNDING_ERROR = 0.25  # and this much more (the 16-bit rounding of what is not int8: norms, biases; a routing flip)

Fetch = Callable[[str], torch.Tensor | None]


def relative_error(value: torch.Tensor, expected: torch.Tensor) -> float:
    difference = (value.float() - expected.float()).norm()
    return float(difference / expected.float().norm().clamp(min=torch.finfo(torch.float32).tiny))


def first_tensor(output) -> torch.Tensor:
    """A decoder block's hidden states: its output, or the first item of the tuple it returns."""
    return output if isinstance(output, torch.Tensor) else output[0]


def with_first(output, tensor: torch.Tensor):
    return tensor if isinstance(output, torch.Tensor) else type(output)([tensor, *output[1:]])


def layer_fault(name: str, detail: str) -> ConversionError:
    """The one line naming the int8 layer at fault, and how to keep it 16-bit (in every block: layer numbers as *)."""
    pattern = re.sub(r"\.\d+(?=\.|$)", ".*", name)
    return ConversionError(f"{name}: the converted model fails its check: {detail}; `llmint8 quantize --skip '{pattern}'` keeps it 16-bit")


class Streamed:
    """A skeleton's tensors loaded module by module from `fetch`, and set back to meta after."""

    def __init__(self, model: nn.Module, fetch: Fetch | None):
        from accelerate.utils import set_module_tensor_to_device

        self.model, self.fetch, self._set = model, fetch, set_module_tensor_to_device

    def load(self, prefix: str, module: nn.Module, recurse: bool = True) -> list[str]:
        """Every meta tensor of `module` (named from `prefix`) that `fetch` has (None where it has
        none); returns the names loaded."""
        if self.fetch is None:
            return []
        loaded = []
        for name, tensor in [*module.named_parameters(recurse=recurse), *module.named_buffers(recurse=recurse)]:
            value = self.fetch(f"{prefix}{name}") if tensor.device.type == "meta" else None
            if value is not None:
                self._set(self.model, f"{prefix}{name}", "cpu", value=value)
                loaded.append(f"{prefix}{name}")
        return loaded

    def release(self, names: list[str]) -> None:
        for name in names:
            self._set(self.model, name, "meta")


class ConversionCheck:
    """One checked pass of `converted` against `reference` (the same model in 16-bit, the same
    module names, the converted layers nn.Linear there)."""

    def __init__(self, reference: nn.Module, converted: nn.Module, fetch_reference: Fetch | None = None, fetch_converted: Fetch | None = None,
                 layers: list[str] | None = None):
        prefix, self.blocks = decoder_layers(converted)
        self.prefix = f"{prefix}." if prefix else ""
        self.reference, self.converted = reference, converted
        self.reference_blocks = reference.get_submodule(prefix) if prefix else reference
        self.streamed_reference, self.streamed_converted = Streamed(reference, fetch_reference), Streamed(converted, fetch_converted)
        self.int8 = ({name: module for name, module in converted.named_modules() if isinstance(module, Int8Linear)} if layers is None
                     else {name: converted.get_submodule(name) for name in layers})  # the converted layers (another library's int8 layers: `layers`)
        self.layer_errors: dict[str, float] = {}
        self.block_errors: list[dict] = []
        self.running: tuple[int, tuple, dict] | None = None  # the block running now: (index, args, kwargs)
        self.quiet = False  # our own reruns are not measured

    def block_name(self, index: int) -> str:
        return f"{self.prefix}{index}"

    def layers_of(self, index: int) -> list[str]:
        inside = f"{self.block_name(index)}."
        return [name for name in self.int8 if name.startswith(inside)]

    def tolerance(self, layers: list[str]) -> tuple[float, float]:
        """(the error the block may show, what its int8 layers explain) for a block whose int8 layers are `layers`."""
        explained = max((self.layer_errors.get(name, 0.0) for name in layers), default=0.0)
        return ROUNDING_ERROR + EXPLAINED_FACTOR * explained, explained

    def _measure_layer(self, name: str):
        """Each int8 layer's error against its 16-bit linear map of the same input; a layer whose
        16-bit forward is not that map (an nn.Linear subclass of its own) is a fault at once."""
        def hook(module, args, output):
            if self.quiet or not args or not isinstance(args[0], torch.Tensor):
                return
            original = self.reference.get_submodule(name)
            expected = self.reference_layer_output(original, args[0])
            self.layer_errors[name] = max(self.layer_errors.get(name, 0.0), relative_error(output, expected))
            if original.weight.is_floating_point() and own_forward(original):
                self.quiet = True
                try:
                    problem = linear_map_problem(original, args[0], original(args[0]))
                finally:
                    self.quiet = False
                if problem:
                    raise layer_fault(name, f"{problem}, so its int8 version computes something else")
        return hook

    def reference_layer_output(self, original: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A 16-bit layer's linear map of `x`; an int8 reference layer's own output (export and
        import check bitsandbytes' layers and ours against each other)."""
        if original.weight.is_floating_point():
            return linear_map(original, x)
        self.quiet = True
        try:
            return original(x)
        finally:
            self.quiet = False

    def _enter_block(self, index: int):
        def hook(module, args, kwargs):
            if not self.quiet:
                self.running = (index, args, kwargs)
                self.loaded = (self.streamed_converted.load(f"{self.block_name(index)}.", module),
                               self.streamed_reference.load(f"{self.block_name(index)}.", self.reference_blocks[index]))
        return hook

    def _leave_block(self, index: int):
        def hook(module, args, kwargs, output):
            if self.quiet:
                return None
            expected = self._reference_output(index, args, kwargs)
            converted = first_tensor(output)
            layers = self.layers_of(index)
            allowed, explained = self.tolerance(layers)
            error = self.block_error(converted[0], expected[0], args, kwargs)
            self.block_errors.append({"block": self.block_name(index), "error": round(error, 5), "explained": round(explained, 5)})
            if not bool(torch.isfinite(converted[0]).all()):
                self.diagnose(index, args, kwargs, "gives values that are not finite")
            if error > allowed:
                self.diagnose(index, args, kwargs, f"differs from the 16-bit block by {error:.1%} of what that adds to its input, where its int8 layers "
                                                   f"explain at most {allowed:.1%}")
            self.release_block()
            mixed = converted.clone()
            mixed[1] = expected[1]  # row 1 goes on through the 16-bit blocks
            return with_first(output, mixed)
        return hook

    def release_block(self) -> None:
        self.running = None
        converted, reference = getattr(self, "loaded", ([], []))
        self.streamed_converted.release(converted)
        self.streamed_reference.release(reference)
        self.loaded = ([], [])

    @staticmethod
    def block_error(converted: torch.Tensor, expected: torch.Tensor, args, kwargs) -> float:
        """The converted block's error relative to what the 16-bit block adds to its input (the
        residual stream passing through would hide a layer's fault)."""
        x = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("hidden_states")
        if isinstance(x, torch.Tensor) and x.shape[1:] == expected.shape:
            return relative_error(converted - x[0], expected - x[0])
        return relative_error(converted, expected)

    def _reference_output(self, index: int, args, kwargs) -> torch.Tensor:
        self.quiet = True
        try:
            return first_tensor(self.reference_blocks[index].forward(*args, **kwargs))
        finally:
            self.quiet = False

    def diagnose(self, index: int, args, kwargs, problem: str) -> None:
        """Raise ConversionError naming the int8 layer of block `index` whose 16-bit original, put
        back alone, makes the block pass; or the block, where no single layer does."""
        expected = self._reference_output(index, args, kwargs)
        block = self.blocks[index]
        layers = self.layers_of(index)
        self.quiet = True
        try:
            for name in layers:
                allowed, _ = self.tolerance([other for other in layers if other != name])
                replace_module(self.converted, name, self.reference.get_submodule(name))
                try:
                    output = first_tensor(block.forward(*args, **kwargs))[0]
                    passes = bool(torch.isfinite(output).all()) and self.block_error(output, expected[0], args, kwargs) <= allowed
                except Exception:
                    passes = False
                finally:
                    replace_module(self.converted, name, self.int8[name])
                if passes:
                    raise layer_fault(name, f"{self.block_name(index)} {problem}, and passes with this layer in 16-bit")
        finally:
            self.quiet = False
        raise ConversionError(f"{self.block_name(index)}: the converted model fails its check: the block {problem}, and no single int8 layer of it "
                              "explains that")

    def run(self, ids: torch.Tensor) -> dict:
        """Check the converted model on token ids [1, T]; returns the check's report for the JSON."""
        handles = []
        for index, block in enumerate(self.blocks):
            handles.append(block.register_forward_pre_hook(self._enter_block(index), with_kwargs=True))
            handles.append(block.register_forward_hook(self._leave_block(index), with_kwargs=True))
        handles += [module.register_forward_hook(self._measure_layer(name)) for name, module in self.int8.items()]
        outside = self.load_outside_blocks()
        try:
            with torch.inference_mode():
                return self._run(ids)
        finally:
            for handle in handles:
                handle.remove()
            self.release_block()
            self.streamed_converted.release(outside[0])
            self.streamed_reference.release(outside[1])

    def _run(self, ids: torch.Tensor) -> dict:
        try:
            device = self.converted.get_input_embeddings().weight.device
            logits = self.converted(input_ids=ids.repeat(2, 1).to(device), use_cache=False).logits.float()
        except ConversionError:
            raise
        except Exception as exc:
            if self.running is None:
                raise ConversionError(f"the converted model fails its check outside its decoder blocks: {type(exc).__name__}: {one_line(exc)}") from None
            index, args, kwargs = self.running
            self.diagnose(index, args, kwargs, f"raises {type(exc).__name__}: {one_line(exc)}")
        if not bool(torch.isfinite(logits[0]).all()):
            raise ConversionError("the converted model fails its check: its logits are not finite where every decoder block passed")
        worst = max(self.block_errors, key=lambda entry: entry["error"] - entry["explained"] * EXPLAINED_FACTOR, default=None)
        return {
            "tokens": int(ids.shape[-1]),
            "blocks": len(self.block_errors),
            "largest_block_error": worst,
            "logits_relative_error": round(relative_error(logits[0], logits[1]), 5),
            "top1_agreement": round(float((logits[0].argmax(-1) == logits[1].argmax(-1)).float().mean()), 4),
        }

    def load_outside_blocks(self) -> tuple[list[str], list[str]]:
        """A skeleton's tensors outside the decoder blocks (embeddings, norms, head; the 16-bit
        model's only where an int8 layer lives outside the blocks), ties made again."""
        blocks = self.prefix.rstrip(".")
        converted = []
        for name, module in self.converted.named_modules():
            if name != blocks and not name.startswith(self.prefix or "\0"):
                converted += self.streamed_converted.load(f"{name}." if name else "", module, recurse=False)
        if converted and hasattr(self.converted, "tie_weights"):
            self.converted.tie_weights()  # a tied head shares the embeddings just loaded
        reference = []
        for name in self.int8:
            if not name.startswith(self.prefix or "\0"):
                reference += self.streamed_reference.load(f"{name}.", self.reference.get_submodule(name))
        return converted, reference


def check_conversion(reference: nn.Module, converted: nn.Module, ids: torch.Tensor, fetch_reference: Fetch | None = None,
                     fetch_converted: Fetch | None = None, layers: list[str] | None = None) -> dict:
    """Check `converted` against `reference` on `ids` (ConversionCheck); raises ConversionError on a fault."""
    return ConversionCheck(reference, converted, fetch_reference, fetch_converted, layers).run(ids)
