"""Does a converted model compute what its 16-bit model computes, up to the quantization's own error?

`quantize`, evaluations and generation on the fly, `export` and bitsandbytes imports run this before
they commit what they made. A few tokens go through the converted model; each of its decoder
blocks is run again on the very same input with its converted layers' originals put back (the
16-bit block), and the converted block may differ from that only as much as its converted layers'
own errors explain (each layer's output against its original's on the same input, measured in the
same pass: a coarse method explains a large error, llm.int8() a small one). A block beyond that, a
block that raises, or logits that are not finite, is a fault: the layer at fault is the converted
layer whose original, put back alone, makes the block pass; an nn.Linear subclass whose forward is
not its linear map is one at once. The rows of the batch are the same tokens twice: row 0 runs the
converted model, row 1 goes on through the 16-bit blocks, so one pass also gives the 16-bit logits
the report compares with.

The originals need not be a model of their own: a dict of the layers the conversion replaced
(generation converts its model in place). Skeletons (quantize streams a model larger than memory)
come in block by block through `fetch` functions, as calibration streams them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch
from torch import nn

from llmint8_cli.activations import decoder_layers
from llmint8_cli.errors import ConversionError, one_line
from llmint8_cli.nn.convert import replace_module
from llmint8_cli.nn.probe import linear_map, linear_map_problem, own_forward

CHECK_TOKENS = 64  # tokens the check runs
EXPLAINED_FACTOR = 8.0  # a block's error may be this many times its worst converted layer's (measured: healthy blocks stay under 4.5x)
ROUNDING_ERROR = 0.25  # and this much more: the 16-bit rounding of what is not int8 (norms, biases), a routing flip (0.10 measured on a tiny gpt-oss)

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
    """The one line naming the converted layer at fault, and how to keep it 16-bit (in every block: layer numbers as *)."""
    pattern = re.sub(r"\.\d+(?=\.|$)", ".*", name)
    return ConversionError(f"{name}: the converted model fails its check: {detail}; `llmint8 quantize --skip '{pattern}'` keeps it 16-bit")


class Streamed:
    """Modules' meta tensors loaded from `fetch` (by their names in the model), and set back to meta after."""

    def __init__(self, fetch: Fetch | None):
        from accelerate.utils import set_module_tensor_to_device

        self.fetch, self._set = fetch, set_module_tensor_to_device
        self.loaded: list[tuple[nn.Module, str]] = []

    def load(self, prefix: str, module: nn.Module, recurse: bool = True) -> None:
        """Every meta tensor of `module` (named `prefix` + its name in the module) that `fetch` has (None where it has none)."""
        if self.fetch is None:
            return
        for name, tensor in [*module.named_parameters(recurse=recurse), *module.named_buffers(recurse=recurse)]:
            value = self.fetch(f"{prefix}{name}") if tensor.device.type == "meta" else None
            if value is not None:
                self._set(module, name, "cpu", value=value)
                self.loaded.append((module, name))

    def release(self) -> None:
        for module, name in self.loaded:
            self._set(module, name, "meta")
        self.loaded = []


class ConversionCheck:
    """One checked pass of `converted` against `originals`, {name: the layer the conversion replaced}."""

    def __init__(self, converted: nn.Module, originals: Mapping[str, nn.Module], fetch_converted: Fetch | None = None, fetch_originals: Fetch | None = None):
        prefix, self.blocks = decoder_layers(converted)
        self.prefix = f"{prefix}." if prefix else ""
        self.converted, self.originals = converted, dict(originals)
        self.layers = {name: converted.get_submodule(name) for name in self.originals}
        self.streamed_converted, self.streamed_originals = Streamed(fetch_converted), Streamed(fetch_originals)
        self.layer_errors: dict[str, float] = {}
        self.block_errors: list[dict] = []
        self.running: tuple[int, tuple, dict] | None = None  # the block running now: (index, args, kwargs)
        self.quiet = False  # our own reruns are not measured

    def block_name(self, index: int) -> str:
        return f"{self.prefix}{index}"

    def layers_of(self, index: int) -> list[str]:
        inside = f"{self.block_name(index)}."
        return [name for name in self.layers if name.startswith(inside)]

    def tolerance(self, layers: list[str]) -> tuple[float, float]:
        """(the error a block may show, what its converted layers explain) for a block whose converted layers are `layers`."""
        explained = max((self.layer_errors.get(name, 0.0) for name in layers), default=0.0)
        return ROUNDING_ERROR + EXPLAINED_FACTOR * explained, explained

    def run_block(self, index: int, args, kwargs, originals: list[str]) -> torch.Tensor:
        """Block `index` on its saved input with the originals of `originals` put back, unmeasured."""
        self.quiet = True
        try:
            for name in originals:
                replace_module(self.converted, name, self.originals[name])
            return first_tensor(self.blocks[index].forward(*args, **kwargs))
        finally:
            for name in originals:
                replace_module(self.converted, name, self.layers[name])
            self.quiet = False

    def original_output(self, original: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A 16-bit original's linear map of `x`; an int8 original's own output (export and import
        check bitsandbytes' layers and ours against each other)."""
        if original.weight.is_floating_point():
            return linear_map(original, x)
        self.quiet = True
        try:
            return original(x)
        finally:
            self.quiet = False

    @staticmethod
    def block_error(converted: torch.Tensor, expected: torch.Tensor, args, kwargs) -> float:
        """The converted block's error relative to what the 16-bit block adds to its input (the
        residual stream passing through would hide a layer's fault)."""
        x = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("hidden_states")
        if isinstance(x, torch.Tensor) and x.shape[1:] == expected.shape:
            return relative_error(converted - x[0], expected - x[0])
        return relative_error(converted, expected)

    def _measure_layer(self, name: str):
        """Each converted layer's error against its original on the same input; an original whose
        forward is not its linear map (an nn.Linear subclass of its own) is a fault at once."""
        def hook(module, args, output):
            if self.quiet or not args or not isinstance(args[0], torch.Tensor):
                return
            original = self.originals[name]
            self.layer_errors[name] = max(self.layer_errors.get(name, 0.0), relative_error(output, self.original_output(original, args[0])))
            if original.weight.is_floating_point() and own_forward(original):
                self.quiet = True
                try:
                    problem = linear_map_problem(original, args[0], original(args[0]))
                finally:
                    self.quiet = False
                if problem:
                    raise layer_fault(name, f"{problem}, so its int8 version computes something else")
        return hook

    def _enter_block(self, index: int):
        def hook(module, args, kwargs):
            if not self.quiet:
                self.running = (index, args, kwargs)
                self.streamed_converted.load(f"{self.block_name(index)}.", module)
                for name in self.layers_of(index):
                    self.streamed_originals.load(f"{name}.", self.originals[name])
        return hook

    def _leave_block(self, index: int):
        def hook(module, args, kwargs, output):
            if self.quiet:
                return None
            layers = self.layers_of(index)
            expected = self.run_block(index, args, kwargs, layers)
            converted = first_tensor(output)
            allowed, explained = self.tolerance(layers)
            error = self.block_error(converted[0], expected[0], args, kwargs)
            self.block_errors.append({"block": self.block_name(index), "error": round(error, 5), "explained": round(explained, 5)})
            if not bool(torch.isfinite(converted[0]).all()):
                self.diagnose(index, args, kwargs, "gives values that are not finite")
            if error > allowed:
                self.diagnose(index, args, kwargs, f"differs from the 16-bit block by {error:.1%} of what that adds to its input, where its converted "
                                                   f"layers explain at most {allowed:.1%}")
            self.release_block()
            mixed = converted.clone()
            mixed[1] = expected[1]  # row 1 goes on through the 16-bit blocks
            return with_first(output, mixed)
        return hook

    def release_block(self) -> None:
        self.running = None
        self.streamed_converted.release()
        self.streamed_originals.release()

    def diagnose(self, index: int, args, kwargs, problem: str) -> None:
        """Raise ConversionError naming the converted layer of block `index` whose original, put
        back alone, makes the block pass; or the block, where no single layer does."""
        layers = self.layers_of(index)
        expected = self.run_block(index, args, kwargs, layers)
        for name in layers:
            allowed, _ = self.tolerance([other for other in layers if other != name])
            try:
                output = self.run_block(index, args, kwargs, [name])[0]
                passes = bool(torch.isfinite(output).all()) and self.block_error(output, expected[0], args, kwargs) <= allowed
            except Exception:
                passes = False
            if passes:
                raise layer_fault(name, f"{self.block_name(index)} {problem}, and passes with this layer in 16-bit")
        raise ConversionError(f"{self.block_name(index)}: the converted model fails its check: the block {problem}, and no single converted layer of it "
                              "explains that")

    def run(self, ids: torch.Tensor) -> dict:
        """Check the converted model on token ids [1, T]; returns the check's report for the JSON."""
        handles = []
        for index, block in enumerate(self.blocks):
            handles.append(block.register_forward_pre_hook(self._enter_block(index), with_kwargs=True))
            handles.append(block.register_forward_hook(self._leave_block(index), with_kwargs=True))
        handles += [module.register_forward_hook(self._measure_layer(name)) for name, module in self.layers.items()]
        outside = Streamed(self.streamed_converted.fetch), Streamed(self.streamed_originals.fetch)
        try:
            self.load_outside_blocks(*outside)
            with torch.inference_mode():
                return self._run(ids)
        finally:
            for handle in handles:
                handle.remove()
            self.release_block()
            for streamed in outside:
                streamed.release()

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

    def load_outside_blocks(self, converted: Streamed, originals: Streamed) -> None:
        """A skeleton's tensors outside the decoder blocks (embeddings, norms, head; the originals
        of converted layers outside the blocks), ties made again."""
        inside = self.prefix or "\0"
        for name, module in self.converted.named_modules():
            if name != self.prefix.rstrip(".") and not name.startswith(inside):
                converted.load(f"{name}." if name else "", module, recurse=False)
        if converted.loaded and hasattr(self.converted, "tie_weights"):
            self.converted.tie_weights()  # a tied head shares the embeddings just loaded
        for name, original in self.originals.items():
            if not name.startswith(inside):
                originals.load(f"{name}.", original)


def originals_in(reference: nn.Module, converted: nn.Module, names: list[str] | None = None) -> dict[str, nn.Module]:
    """{name: `reference`'s layer} for the converted layers of `converted`: `names`, or its Int8Linear layers."""
    from llmint8_cli.nn.linear import Int8Linear

    names = [name for name, module in converted.named_modules() if isinstance(module, Int8Linear)] if names is None else names
    return {name: reference.get_submodule(name) for name in names}


def check_conversion(converted: nn.Module, originals: Mapping[str, nn.Module], ids: torch.Tensor, fetch_converted: Fetch | None = None,
                     fetch_originals: Fetch | None = None) -> dict:
    """Check `converted` against the `originals` of its converted layers on `ids` (ConversionCheck);
    raises ConversionError on a fault."""
    return ConversionCheck(converted, originals, fetch_converted, fetch_originals).run(ids)
