"""The exact int8 x int8 -> int32 products of the CPU backend, and which one this machine runs.

Paths (each exact; they differ only in speed, which depends on the CPU far more than on flags):
- `onednn-prepacked`: oneDNN's int8 linear (`torch.ops.onednn.qlinear_pointwise`, what
  Inductor's x86 int8 path uses) on a weight reordered once into its blocked layout. It takes
  uint8 activations with a zero point, so q maps exactly to q + 128 with zero point 128. It
  returns float32 holding float(int32 sum), the one rounding the reference makes too: exact as
  the row-wise linear's input, not as an int32 beyond 2^24, so only the fused row-wise linear
  uses it.
- `onednn-nk` / `onednn-kn`: `torch._int_mm` (oneDNN) on W [n, k] as a transposed view, or on a
  copy laid out [k, n]; oneDNN prefers one or the other depending on the CPU and m.
- `llmint8-amx`: llmint8's own AMX-INT8 tile kernel (kernels/cpu/amx_gemm.cpp) on a weight
  reordered once into tiles; Intel Sapphire Rapids and later, Linux 5.16+.
- `llmint8-avx2`: llmint8's own kernel (kernels/cpu/int8_gemm.cpp, compiled on first use into
  torch's extension cache, ~30 s once); `llmint8-scalar` where it builds without AVX2.
A path is offered only where it proves exact on this CPU (`exact_here`): without VNNI, oneDNN's
u8 x s8 kernel adds pairs of products in int16 with saturation (vpmaddubsw), so the prepacked
path is off by up to ~3e5 on AVX2-only CPUs such as a Zen 3 EPYC, and is not used there.
The choice is measured: a few tens of milliseconds of micro-benchmark the first time on a machine
(CPU model, flags, threads, torch version), kept in a small JSON cache, and made per token count
(one path for decoding, another for prefill where that is faster). `LLMINT8_CPU_GEMM=NAME`
forces a path.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from llmint8_cli import cache
from llmint8_cli.errors import InvalidArgumentError

FORCE_ENV = "LLMINT8_CPU_GEMM"
LEGACY_NAMES = {"torch": "onednn-nk", "native": "llmint8-avx2"}  # earlier values of LLMINT8_CPU_GEMM


@functools.cache
def native_build() -> tuple[list[str], list[str], str]:
    """The native kernels' sources, compiler flags and build name, named by everything the build
    depends on (sources, flags, compiler, torch's headers and version): checkouts and venvs that
    would build the same share one build, and two that would not never rebuild each other's (the
    build folder's build.ninja names one torch's include path); a new kernel is measured afresh by
    `decision`."""
    folder = resources.files("llmint8_cli.kernels") / "cpu"
    sources, headers = [folder / "int8_gemm.cpp", folder / "amx_gemm.cpp", folder / "attention.cpp"], [folder / "amx_gemm.h", folder / "attention.h"]
    # no FMA contraction: an element gets the same float operations in every epilogue and path
    flags, capability = ["-O3", "-ffp-contract=off"], torch.backends.cpu.get_cpu_capability()
    if capability in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma", "-mf16c"]
    if capability == "AVX512":  # torch says so only where F, BW, VL and DQ are all present
        flags += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
    if "parallel backend: OpenMP" in torch.__config__.parallel_info() and sys.platform.startswith("linux"):
        # at::parallel_for is inline OpenMP: without the flag every kernel runs on one thread.
        # Not linked (no -fopenmp at link time): GOMP_* resolve to torch's own libgomp.
        flags += ["-fopenmp"]
    from torch.utils import cpp_extension

    toolchain = [os.environ.get("CXX") or shutil.which("c++") or "c++", torch.__version__, *cpp_extension.include_paths()]
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in [*sources, *headers]) + "\n".join([*flags, *toolchain]).encode()).hexdigest()[:12]
    return [str(s) for s in sources], flags, f"llmint8_cpu_kernels_{digest}"


def load_extension(what: str, name: str, sources: list[str], **options):
    """torch's cpp_extension.load, saying so on stderr when it compiles (a minute of silence would look like a hang)."""
    from torch.utils import cpp_extension

    if not (Path(cpp_extension._get_build_directory(name, verbose=False)) / f"{name}.so").is_file():
        cache.note(f"compiling {what} (once per machine and version, about 30-60 s)")
    with contextlib.ExitStack() as stack:
        if sys.stdout is None:  # a process started with stdout closed: torch flushes sys.stdout
            stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
        return cpp_extension.load(name=name, sources=sources, verbose=False, **options)


@functools.cache
def native_kernels():
    """The compiled extension module (GEMM, activation quantization, epilogue), or None."""
    try:
        sources, flags, name = native_build()
        module = load_extension("the CPU kernels", name, sources, extra_cflags=flags)
    except Exception as exc:  # no compiler, no ninja, read-only cache...
        print(f"llmint8: native CPU kernels unavailable ({type(exc).__name__}); using oneDNN and the torch reference", file=sys.stderr)
        return None
    for op, shape in (("rowwise_linear", rowwise_linear_shape), ("prompt_attention", attention_shape), ("decode_attention", attention_shape)):
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"llmint8_cpu::{op}", "Meta"):
            torch.library.register_fake(f"llmint8_cpu::{op}")(shape)
    return module


def rowwise_linear_shape(x, w_q, *_):
    """llmint8_cpu::rowwise_linear's output as compilers and exporters see it: [m, n] in x's dtype."""
    return x.new_empty(x.shape[0], w_q.shape[0])


def attention_shape(q, k, v, mask, scale):
    """llmint8_cpu::prompt_attention's and decode_attention's output as compilers see it: [batch, length, heads, dim]."""
    return q.new_empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3])


@dataclass(frozen=True)
class GemmPath:
    """One way to compute A[m, k] · W[n, k]^T exactly; `pack` lays W out once at load."""

    name: str
    int32: bool = True  # False: the product comes back as float32 = float(int32 sum)
    own_layout: bool = False  # True: `pack` makes a copy of W (more memory); False: W as stored
    finishes_layer: bool = False  # True: `linear` runs the product and the native epilogue in one pass
    whole_layer: bool = False  # True: the native rowwise_linear runs the activation side, this product and the epilogue in one call

    def runs(self) -> bool:
        """Whether this build and CPU can run the path at all."""
        raise NotImplementedError

    def available(self) -> bool:
        """Runs here and gives the exact sums here: the only paths chosen, forced or tested."""
        return self.runs() and exact_here(self.name)

    def pack(self, q: torch.Tensor):
        return q.contiguous()

    def run(self, a: torch.Tensor, packed) -> torch.Tensor:
        raise NotImplementedError

    def one_call_product(self, packed) -> tuple[torch.Tensor | None, bool]:
        """rowwise_linear's (w_kn, onednn) for a whole-layer path: llmint8's own tile (None, False), or
        oneDNN's product on W as stored (None, True) or on the path's [k, n] copy (the copy, True)."""
        return None, False


class IntMmNK(GemmPath):
    def runs(self) -> bool:
        return hasattr(torch, "_int_mm")

    def run(self, a, packed):
        return torch._int_mm(a.contiguous(), packed.t())

    def one_call_product(self, packed):
        return None, True


class IntMmKN(IntMmNK):
    def pack(self, q):
        return q.t().contiguous()

    def run(self, a, packed):
        return torch._int_mm(a.contiguous(), packed)

    def one_call_product(self, packed):
        return packed, True


class OneDnnPrepacked(GemmPath):
    def runs(self) -> bool:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_prepack")

    def pack(self, q):
        n = q.shape[0]
        return torch.ops.onednn.qlinear_prepack(q.contiguous(), None), torch.ones(n), torch.zeros(n, dtype=torch.long)

    def run(self, a, packed):
        weight, ones, zeros = packed
        shifted = a.contiguous().view(torch.uint8) ^ 0x80  # q + 128 as uint8, exactly
        return torch.ops.onednn.qlinear_pointwise(shifted, 1.0, 128, weight, ones, zeros, None, 1.0, 0, torch.float32, "none", [], "")


class Native(GemmPath):
    def runs(self) -> bool:
        native = native_kernels()
        return native is not None and native.has_avx2() == (self.name == "llmint8-avx2")

    def run(self, a, packed):
        return native_kernels().int8_gemm(a.contiguous(), packed)


class NativeAmx(GemmPath):
    def runs(self) -> bool:
        native = native_kernels()
        return native is not None and native.has_amx()

    def pack(self, q):
        return native_kernels().amx_pack(q.contiguous()), q.shape[0]

    def run(self, a, packed):
        tiles, n = packed
        return native_kernels().amx_gemm(a.contiguous(), tiles, n)

    def linear(self, a, packed, *epilogue):
        """dequantize_sequences(run(a, packed), *epilogue), each block finished while in cache."""
        tiles, n = packed
        return native_kernels().amx_linear(a.contiguous(), tiles, n, *epilogue)


def exactness_probe() -> tuple[torch.Tensor, torch.Tensor]:
    """Operands that expose a path that is not exact: the extremes ±127 side by side (a pair of
    u8 x s8 products reaches 2 x 255 x 127 = 64770, beyond int16) and random values."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (6, 256), dtype=torch.int8, generator=g)
    w = torch.randint(-127, 128, (8, 256), dtype=torch.int8, generator=g)
    a[0], a[1], a[2, ::2] = 127, -127, 127
    w[0], w[1], w[2, 1::2] = 127, -127, -127
    return a, w


@functools.cache
def exact_here(name: str) -> bool:
    """Whether a path's product equals the int64 one (as float32 for the float path) on this CPU."""
    path = PATHS[name]
    a, w = exactness_probe()
    exact = (a.long() @ w.long().t()).int()
    got = path.run(a, path.pack(w))
    return bool(torch.equal(got, exact if path.int32 else exact.float()))


PATHS = {
    p.name: p for p in (
        OneDnnPrepacked("onednn-prepacked", int32=False, own_layout=True), IntMmNK("onednn-nk", whole_layer=True),
        IntMmKN("onednn-kn", own_layout=True, whole_layer=True),
        NativeAmx("llmint8-amx", own_layout=True, finishes_layer=True), Native("llmint8-avx2", whole_layer=True), Native("llmint8-scalar", whole_layer=True),
    )
}


@dataclass(frozen=True)
class GemmPlan:
    """The path a weight runs at each token count: (largest m or None for the rest, path name)."""

    steps: tuple[tuple[int | None, str], ...]

    @property
    def paths(self) -> list[GemmPath]:
        return list(dict.fromkeys(PATHS[name] for _, name in self.steps))

    @property
    def int32(self) -> bool:
        return all(p.int32 for p in self.paths)

    @property
    def name(self) -> str:
        if len(self.steps) == 1:
            return self.steps[0][1]
        return ", ".join(f"{name} (m <= {top})" if top is not None else f"{name} (larger m)" for top, name in self.steps)

    def pack(self, q: torch.Tensor) -> dict:
        return {p.name: p.pack(q) for p in self.paths}

    def path_for(self, m: int) -> GemmPath:
        return PATHS[next(name for top, name in self.steps if top is None or m <= top)]

    def run(self, a: torch.Tensor, packed: dict) -> torch.Tensor:
        path = self.path_for(a.shape[0])
        return path.run(a, packed[path.name])

    def linear(self, a: torch.Tensor, packed: dict, *epilogue) -> torch.Tensor:
        """The row-wise linear's product and native epilogue (dequantize_sequences' arguments after acc)."""
        path = self.path_for(a.shape[0])
        if path.finishes_layer:
            return path.linear(a, packed[path.name], *epilogue)
        return native_kernels().dequantize_sequences(path.run(a, packed[path.name]), *epilogue)


@functools.cache
def native_bf16() -> bool:
    """Whether the CPU multiplies bf16 natively (AMX-BF16 or AVX512-BF16), from /proc/cpuinfo."""
    return bool({"amx_bf16", "avx512_bf16"} & set(machine_key()["cpu_flags"]))


def machine_key() -> dict:
    """What the choice depends on: the CPU, its flags, the threads and torch."""
    model, flags = platform.processor() or platform.machine(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx", "fma", "f16c")))
                break
    except OSError:
        pass
    return {"cpu": model, "cpu_flags": flags, "threads": torch.get_num_threads(), "torch": torch.__version__}


def cache_file() -> Path:
    return cache.root() / "cpu_gemm.json"


MICRO_TOKENS = (1, 16, 128)
LARGEST_MEASURED = 4096  # weights are measured at their shape, each side clamped to this
BUCKET_TOPS = (4, 45, None)  # a call with m rows goes by the measured token count nearest in log scale
CACHE_VERSION = 3  # 2: inexact paths (oneDNN u8 x s8 without VNNI) are no longer measured; 3: streamed weights timed cold
EVICT_BYTES = 64 << 20  # written before each call timed cold: twice a large L3
LAYOUT_GAIN = 1.1  # a path with its own copy of W must beat the stored-layout paths by 10 % somewhere


def evict_cache(buffer: torch.Tensor) -> None:
    """Write `buffer` (larger than the caches) through them: the next call reads its weight from memory."""
    buffer.add_(1)


def measure(paths: list[GemmPath], shape: tuple[int, int], repeat: int = 5, streamed: bool = False) -> dict[str, dict[int, float]]:
    """Best-of-`repeat` ms of each path on an int8 weight of `shape` at a few token counts.

    The paths take turns call by call, so a burst of noise on a shared machine hits them alike.
    `streamed`: the weight stands for a larger one (measured_shape), which a decode step reads from
    memory: at decode sizes the cache is flushed before each call. A cache-resident slice of
    SmolLM2's 49152 x 576 int8 head made oneDNN's product look faster at one row; from memory
    llmint8's tile reads the whole head ~2x as fast.
    """
    n, k = shape
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    packed = {p.name: p.pack(w) for p in paths}
    timings = {p.name: {} for p in paths}
    flush = torch.zeros(EVICT_BYTES if streamed else 0, dtype=torch.uint8)
    for m in MICRO_TOKENS:
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
        samples = {p.name: [] for p in paths}
        for turn in range(repeat + 1):  # the first turn warms up
            for p in paths:
                if streamed and m <= BUCKET_TOPS[0]:
                    evict_cache(flush)
                started = time.perf_counter()
                p.run(a, packed[p.name])
                if turn:
                    samples[p.name].append((time.perf_counter() - started) * 1e3)
        for name, values in samples.items():
            timings[name][m] = min(values)
    return timings


def plan_for(timings: dict[str, dict[int, float]], names: list[str]) -> list[list]:
    """Per token count the fastest path, with at most one path that keeps its own copy of W.

    Each such path is tried in turn (and none); it joins only where it beats the paths that use
    W as stored by LAYOUT_GAIN, so no weight is held twice for a marginal gain. The plan with
    the smallest mean slowdown against the fastest path at each token count wins.
    """
    stored = [n for n in names if not PATHS[n].own_layout]
    fastest = {m: min(timings[n][m] for n in names) for m in MICRO_TOKENS}

    def build(copy: str | None) -> list[str]:
        chosen = []
        for m in MICRO_TOKENS:
            best = min(stored, key=lambda n: timings[n][m]) if stored else copy
            if copy is not None and timings[copy][m] * LAYOUT_GAIN < timings[best][m]:
                best = copy
            chosen.append(best)
        return chosen

    options = ([None] if stored else []) + [n for n in names if PATHS[n].own_layout]
    per_m = min((build(c) for c in options), key=lambda chosen: statistics.fmean(timings[n][m] / fastest[m] for n, m in zip(chosen, MICRO_TOKENS)))
    steps: list[list] = []
    for name, top in zip(per_m, BUCKET_TOPS):
        if steps and steps[-1][1] == name:
            steps[-1][0] = top
        else:
            steps.append([top, name])
    return steps


def measured_shape(n: int, k: int) -> tuple[int, int]:
    return min(n, LARGEST_MEASURED), min(k, LARGEST_MEASURED)


def valid_entry(entry, available: list[GemmPath]) -> bool:
    """A cached decision measured over exactly the available paths, whose plans name only paths
    that may serve them (the int32 plan, exact-int32 paths): anything else (an older version,
    another torch, an edited file) is measured again and written over."""
    def valid_plan(plan, names: set[str]) -> bool:
        return (isinstance(plan, list) and bool(plan) and all(isinstance(step, list) and len(step) == 2 and step[1] in names
                                                               and (step[0] is None or type(step[0]) is int) for step in plan))

    names = {p.name for p in available}
    return (isinstance(entry, dict) and isinstance(entry.get("timings_ms"), dict) and set(entry["timings_ms"]) == names
            and valid_plan(entry.get("fused"), names) and valid_plan(entry.get("int32"), {p.name for p in available if p.int32}))


@functools.cache
def decision(shape: tuple[int, int], streamed: bool = False) -> dict:
    """This machine's timings and plans for a weight shape (`streamed`: standing for a larger one,
    see measure), from the cache or measured now.

    Per shape, because the fastest path depends on it: on a 2-core Zen 4 the prepacked oneDNN
    weight wins at 4096 x 4096 from 16 tokens on, while `_int_mm` wins at SmolLM2's 576-wide ones.
    """
    key = {**machine_key(), "native_kernels": native_build()[2]}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    label = "x".join(map(str, shape)) + (" streamed" if streamed else "")
    path = cache_file()
    try:
        machine_entry = json.loads(path.read_text()).get(digest) or {}
    except (OSError, ValueError, AttributeError):
        machine_entry = {}
    available = [p for p in PATHS.values() if p.available()]
    shapes = machine_entry.get("shapes") if isinstance(machine_entry, dict) and machine_entry.get("version") == CACHE_VERSION else None
    cached = shapes.get(label) if isinstance(shapes, dict) else None
    if valid_entry(cached, available):
        return cached
    timings = measure(available, shape, streamed=streamed)
    entry = {
        "timings_ms": {n: {str(m): round(t, 4) for m, t in ms.items()} for n, ms in timings.items()},
        "fused": plan_for(timings, [p.name for p in available]),
        "int32": plan_for(timings, [p.name for p in available if p.int32]),
    }
    try:
        everything = json.loads(path.read_text()) if path.is_file() else {}
        everything = everything if isinstance(everything, dict) else {}
        machine_entry = everything.get(digest) if isinstance(everything.get(digest), dict) and everything[digest].get("version") == CACHE_VERSION else {}
        machine_entry.update({"version": CACHE_VERSION, "machine": key})
        if not isinstance(machine_entry.get("shapes"), dict):
            machine_entry["shapes"] = {}
        machine_entry["shapes"][label] = entry
        everything[digest] = machine_entry
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(everything, indent=1) + "\n")
        tmp.replace(path)
    except (OSError, ValueError, AttributeError):  # an unwritable or foreign cache: measure again next time
        pass
    return entry


def forced() -> GemmPath | None:
    name = os.environ.get(FORCE_ENV)
    if not name:
        return None
    name = LEGACY_NAMES.get(name, name)
    if name not in PATHS:
        raise InvalidArgumentError(f"{FORCE_ENV}={name!r}: expected one of {', '.join(PATHS)}")
    if not PATHS[name].runs():
        raise InvalidArgumentError(f"{FORCE_ENV}={name!r}: that path cannot run on this machine")
    if not PATHS[name].available():
        raise InvalidArgumentError(f"{FORCE_ENV}={name!r}: that path is not exact on this CPU (its int8 sums differ from the int32 ones)")
    return PATHS[name]


def choose(shape: tuple[int, int], int32: bool) -> GemmPlan:
    """The plan for a weight of shape [n, k]: `int32` when the caller needs exact int32 sums
    (zero points, tensor-wise scales), else any path whose float32 product equals float(int32).
    A forced path that returns float32 serves only the callers that take it."""
    path = forced()
    if path is not None and (path.int32 or not int32):
        return GemmPlan(((None, path.name),))
    measured = measured_shape(*shape)
    plan = GemmPlan(tuple((top, name) for top, name in decision(measured, measured != tuple(shape))["int32" if int32 else "fused"]))
    CHOSEN["x".join(map(str, shape))] = plan.name
    return plan


CHOSEN: dict[str, str] = {}  # weight shape -> plan, for the JSON of the commands that computed
