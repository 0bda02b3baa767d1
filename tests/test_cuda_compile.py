"""The CUDA sources compile on every test run, without a GPU: NVRTC's program API needs no driver.

NVRTC comes from the cupy-cuda12x and nvidia-cuda-nvrtc-cu12 wheels, the headers (cuda_fp16.h,
cuda_bf16.h) from nvidia-cuda-runtime-cu12: the `cuda-compile` extra, which `make setup` installs. Every kernel instantiation the CUDA backend loads is compiled
to PTX for Ampere (compute_80) and Hopper (compute_90), with the backend's own options.
"""

import importlib.util
from pathlib import Path

import pytest

from llmint8_cli.backends import cuda

ARCHITECTURES = ("compute_80", "compute_90")
HEADER_PACKAGES = ("nvidia.cuda_runtime",)


def nvrtc_and_headers():
    """(the NVRTC binding, the include folders), or a skip naming what is missing."""
    folders = []
    for package in HEADER_PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None:
            pytest.skip(f"needs the CUDA headers of {package.replace('.', '-').replace('_', '-')}-cu12 (pip install -e '.[cuda-compile]')")
        folders.append(Path(next(iter(spec.submodule_search_locations))) / "include")
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as exc:  # no cupy, or no libnvrtc (its own error types)
        pytest.skip(f"needs NVRTC from cupy-cuda12x and nvidia-cuda-nvrtc-cu12 (pip install -e '.[cuda-compile]'): {type(exc).__name__}")
    return nvrtc, folders


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_kernel_instantiation_compiles_to_ptx(architecture):
    nvrtc, folders = nvrtc_and_headers()
    program = nvrtc.createProgram(cuda.kernel_source(), "llmint8.cu", [], [])
    try:
        for name in cuda.KERNEL_NAMES:
            nvrtc.addNameExpression(program, name)
        try:
            nvrtc.compileProgram(program, [*cuda.COMPILE_OPTIONS, f"--gpu-architecture={architecture}", *(f"-I{f}" for f in folders)])
        except nvrtc.NVRTCError as exc:
            pytest.fail(f"{exc}\n{nvrtc.getProgramLog(program)}")
        ptx = nvrtc.getPTX(program)
        ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
        assert f".target sm_{architecture.removeprefix('compute_')}" in ptx
        for name in cuda.KERNEL_NAMES:
            assert f".entry {nvrtc.getLoweredName(program, name)}(" in ptx, name
    finally:
        nvrtc.destroyProgram(program)


def test_a_broken_kernel_fails_to_compile():
    """The check can fail: a source with an error in it is reported with NVRTC's log."""
    nvrtc, folders = nvrtc_and_headers()
    program = nvrtc.createProgram(cuda.kernel_source().replace("__syncthreads()", "__syncthreads(undeclared)", 1), "llmint8.cu", [], [])
    try:
        with pytest.raises(nvrtc.NVRTCError):
            nvrtc.compileProgram(program, [*cuda.COMPILE_OPTIONS, "--gpu-architecture=compute_80", *(f"-I{f}" for f in folders)])
        assert "undeclared" in nvrtc.getProgramLog(program)
    finally:
        nvrtc.destroyProgram(program)
