"""`--compile auto|on|off`: a model's forward compiled by torch.compile (Inductor), decoding through
transformers' static KV cache, so a decode step is one compiled graph in which each Int8Linear is
one native op (ops.compiled_linear: llmint8_cpu::rowwise_linear on the CPU).

The compiled code is cached on disk by Inductor (under llmint8's cache folder), so a second run of
the same model shape starts in seconds, not a minute. `auto` compiles where the run is long enough
to win the compile time back and falls back to eager, with a note, where Inductor cannot work (no
C++ compiler) or the model cannot be compiled; `on` makes either a one-line error.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from llmint8_cli import ops
from llmint8_cli.errors import InvalidArgumentError

CHOICES = ("auto", "on", "off")
HELP = ("torch.compile the model (Inductor; a static KV cache when decoding): on, off, or auto: on where the run is long enough "
        "to win back the compile time (tens of seconds the first time for a model shape, seconds once Inductor's cache holds it).")
AUTO_DECODE_TOKENS = 512  # generate compiles under auto from this many new tokens: a SmolLM2 step gains ~15 ms, a cold compile costs ~15-60 s
AUTO_PARAMETERS = 50_000_000  # bench compiles under auto from this size: a smaller model's whole run is shorter than its compile


def check_choice(choice: str, device: torch.device | None = None) -> str:
    """--compile's value, refused at once where it cannot run: `on` where Inductor cannot work for `device`."""
    if choice not in CHOICES:
        raise InvalidArgumentError(f"--compile: expected auto, on or off, got {choice!r}")
    problem = inductor_problem(device) if choice == "on" and device is not None else None
    if problem is not None:
        raise InvalidArgumentError(f"--compile on: {problem}")
    return choice


def cache_folder() -> Path:
    """Inductor's on-disk caches, beside llmint8's own (LLMINT8_CACHE_DIR or ~/.cache/llmint8), unless the user set TORCHINDUCTOR_CACHE_DIR."""
    import llmint8_cli
    from llmint8_cli import cache

    return Path(llmint8_cli.INDUCTOR_CACHE_GIVEN or cache.root() / "inductor")


def large_enough(model: nn.Module) -> bool:
    """Whether bench's `auto` compiles this model (AUTO_PARAMETERS; int8 weights count as parameters)."""
    return sum(t.numel() for t in (*model.parameters(), *model.buffers())) >= AUTO_PARAMETERS


def inductor_problem(device: torch.device) -> str | None:
    """Why Inductor cannot compile for `device` here, or None (on the CPU it needs a C++ compiler)."""
    if device.type != "cpu":
        return None
    from torch._inductor import cpp_builder

    try:
        cpp_builder.get_cpp_compiler()
    except Exception:  # torch raises InvalidCxxCompiler, or an OSError from the search
        return "Inductor needs a C++ compiler (g++, or the one $CXX names) and none runs here"
    return None


def decide(choice: str, device: torch.device, long_enough: bool, notes: list[str]) -> bool:
    """Whether to compile: `on` where Inductor works (else a one-line error), `auto` where it works
    and `long_enough` (else a note on why not), never for `off`."""
    if check_choice(choice, device) == "off" or (choice == "auto" and not long_enough):  # `on` where Inductor cannot work: refused there
        return False
    problem = inductor_problem(device) if choice == "auto" else None
    if problem is not None:
        notes.append(f"--compile auto: running eager ({problem})")
    return problem is None


def prepare_layers(model: nn.Module) -> None:
    """Each Int8Linear's prepared weight made now (what its first eager call would make), so that a
    graph compiled before any eager call already calls the native op (ops.compiled_linear)."""
    from llmint8_cli.backends import backend_for
    from llmint8_cli.nn.linear import Int8Linear

    for layer in model.modules():
        if isinstance(layer, Int8Linear) and ops.prepared_of(layer) is None:
            buffers = layer._buffers
            ops.prepared(backend_for(layer.weight.device), layer.method, buffers["weight"], buffers["weight_scale"], buffers["weight_zero"],
                         buffers["outlier_idx"], buffers["outlier_weight"], buffers["input_smooth"], rotation_block=layer.rotation_block, owner=layer)


@contextlib.contextmanager
def inductor_cache() -> Iterator[None]:
    """Inductor's caches in llmint8's cache folder for the duration (the default, /tmp, is lost at reboot)."""
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_folder())
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous


def inductor_options() -> dict:
    """torch.compile's options: 16-bit intermediates rounded where eager rounds them (else Inductor
    keeps bf16 chains in fp32 and greedy tokens drift from eager's; with it a SmolLM2 decode step's
    logits are eager's bit for bit). Dynamo's guards stay whole: skipping those on modules saved
    2-4 ms of a 25 ms step, and ran a second model of the same class through the first one's graph."""
    return {"emulate_precision_casts": True}


RECOMPILE_LIMIT = 64  # graphs dynamo keeps per code object: bench compiles each model class's forward for 3 models x 4 shapes


def allow_recompiles() -> None:
    """Room for every shape of every model a command compiles: the models share their classes' code
    objects, and past dynamo's default limit of 8 a fullgraph compile fails."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT)


def generate_options(model: nn.Module) -> dict:
    """generate()'s options for a compiled decode step: transformers' static cache and its automatic
    compilation of the one-token forward (fullgraph: a graph break is an error, not a silent slowdown)."""
    from transformers import CompileConfig

    prepare_layers(model)
    allow_recompiles()
    config = CompileConfig(fullgraph=True, dynamic=False, mode=None, options=inductor_options())
    config._compile_all_devices = True  # transformers compiles on GPUs only unless told
    return {"cache_implementation": "static", "compile_config": config}


def compiled_forward(model: nn.Module) -> Callable:
    """The model's forward compiled for the shapes it is called with (one graph per shape: bench's
    prompts repeat theirs)."""
    prepare_layers(model)
    allow_recompiles()
    return torch.compile(model, fullgraph=True, dynamic=False, options=inductor_options())


def compile_failure(exc: BaseException) -> bool:
    """Whether an exception came from torch.compile (dynamo or Inductor), not from the model's own code."""
    from torch._dynamo import exc as dynamo_exc

    return isinstance(exc, (dynamo_exc.TorchDynamoException, dynamo_exc.Unsupported)) or type(exc).__module__.startswith(("torch._dynamo", "torch._inductor"))


def run_or_fall_back(run: Callable[[bool], object], compiled: bool, choice: str, notes: list[str]):
    """run(compiled), and under `auto` run(False) with a note where compiling failed; under `on` the
    failure is one line."""
    if not compiled:
        return run(False)
    try:
        with inductor_cache():
            return run(True)
    except Exception as exc:
        if not compile_failure(exc):
            raise
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        if choice == "on":
            raise InvalidArgumentError(f"--compile on: the model cannot be compiled ({reason})") from None
        torch._dynamo.reset()
        notes.append(f"--compile auto: running eager, the model cannot be compiled ({reason})")
        return run(False)


def first_call(name: str, compiled: Callable[[], object], eager: Callable[[], object], choice: str, notes: list[str]) -> tuple[Callable[[], object], float | None]:
    """(the call to time, seconds its compiling first call took): `compiled` called once now, or
    `eager` where that fails under `auto` (a note names `name`); None seconds where eager."""
    def run(compiling: bool):
        started = time.perf_counter()
        (compiled if compiling else eager)()
        return (compiled, round(time.perf_counter() - started, 2)) if compiling else (eager, None)

    failures_before = len(notes)
    call, seconds = run_or_fall_back(run, True, choice, notes)
    if len(notes) > failures_before:
        notes[-1] = f"{name}: {notes[-1]}"
    return call, seconds


class StepClock:
    """A generate() streamer that only notes when each token arrives: the first decode step holds
    the compile, the steps after it give the steady rate."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def figures(self) -> dict:
        """first_decode_step_s (with its compile), steady_tokens_per_s (the steps after it)."""
        if len(self.times) < 3:  # the prompt and the prefill's token: no decode step
            return {}
        steady = len(self.times) - 3
        return {"first_decode_step_s": round(self.times[2] - self.times[1], 3),
                "steady_tokens_per_s": round(steady / (self.times[-1] - self.times[2]), 1) if steady else None}
