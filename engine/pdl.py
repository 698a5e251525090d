"""Programmatic dependent launch (Hopper and newer) for the decode step's Triton kernels.

A decode step at batch 1 is ~260 kernels of a few microseconds each, and each loses
some of its time starting: the launch, the first wave of programs, the first loads'
latency, while the kernel before it drains its last programs. Launched with PDL, a
kernel may start as soon as every program of the one before it has called `start`.
Every kernel calls `start` first, so a kernel may start while several earlier ones
still run: before `wait` it may load only what no kernel writes (the weights). `wait`
returns once the kernel before it has finished and its writes are visible; everything
else is read, and anything at all is written, after it.

Each of our kernels calls `wait` in every program, so a kernel finishes only after the
one before it has; waiting on the previous kernel therefore waits on all earlier ones.
A kernel launched without PDL (cuBLAS, torch) waits for everything before it, as usual.
cuBLAS's kernels must stay so: made to start early (programmatic edges set during graph
capture), 32 of the 33 decode products checked on an H200 with cuBLAS 13 read their
input before the kernel before them had written it (benchmarks/results/
notes-2026-11-29-gpu-session13.md).
Graph capture keeps these launches as programmatic edges. The CUDA kernels compiled at
run time (engine/attention_fp8.py) launch the same way through `launch_cuda`.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence
from typing import Any

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # an older Triton: `enabled` is False, the helpers are never compiled in
    gdc_launch_dependents = gdc_wait = None

# Benchmarks switch this off to measure the difference; nothing else should.
ALLOWED = True


@functools.cache
def _supported(index: int) -> bool:
    if gdc_wait is None:
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    if "launch_pdl" not in getattr(CUDAOptions, "__dataclass_fields__", {}):
        return False
    return torch.cuda.get_device_capability(index) >= (9, 0)


def enabled(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL: a CUDA GPU of compute capability 9+
    and a Triton that can launch that way."""
    if not ALLOWED or device.type != "cuda":
        return False
    return _supported(device.index if device.index is not None else torch.cuda.current_device())


def launch(device: torch.device, wanted: bool = True) -> dict[str, Any]:
    """Keyword arguments for a kernel launch: (PDL=..., launch_pdl=True where enabled
    and `wanted`)."""
    return {"PDL": True, "launch_pdl": True} if wanted and enabled(device) else {"PDL": False}


@triton.jit
def start(PDL: tl.constexpr):
    """Let the next kernel on the stream start (it still waits before using our output)."""
    if PDL:
        gdc_launch_dependents()


@triton.jit
def wait(PDL: tl.constexpr):
    """Wait until the kernel before this one has finished and its writes are visible."""
    if PDL:
        gdc_wait()


# The driver's launch configuration (cuda.h: CUlaunchAttribute, CUlaunchConfig).
_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


class _LaunchAttribute(ctypes.Structure):
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16)]


class _LaunchConfig(ctypes.Structure):
    _fields_ = [
        ("grid", ctypes.c_uint * 3),
        ("block", ctypes.c_uint * 3),
        ("shared_mem", ctypes.c_uint),
        ("stream", ctypes.c_void_p),
        ("attrs", ctypes.POINTER(_LaunchAttribute)),
        ("num_attrs", ctypes.c_uint),
    ]


@functools.cache
def _driver() -> Any:
    """libcuda's cuLaunchKernelEx (CUDA 12+), or None where it cannot be had."""
    try:
        from torch.cuda._utils import _get_gpu_runtime_library

        return _get_gpu_runtime_library().cuLaunchKernelEx
    except (ImportError, AttributeError, OSError):
        return None


def launch_cuda(
    kernel: Any,
    grid: tuple[int, int, int],
    block: tuple[int, int, int],
    args: Sequence[Any],
    device: torch.device,
) -> None:
    """Launch a kernel of torch.cuda._compile_kernel's on the current stream, with PDL on
    a GPU of compute capability 9+ (the kernel must execute griddepcontrol.wait before
    it reads anything an earlier kernel writes, and before it writes anything), else as
    that kernel launches itself. Arguments as it takes them: a tensor is its data
    pointer, an int a C int, a float a C double."""
    launch_ex = _driver()
    index = device.index if device.index is not None else torch.cuda.current_device()
    if not ALLOWED or launch_ex is None or torch.cuda.get_device_capability(index) < (9, 0):
        kernel(grid=grid, block=block, args=list(args))
        return
    values: list[Any] = []
    for arg in args:
        if isinstance(arg, torch.Tensor):
            values.append(ctypes.c_void_p(arg.data_ptr()))
        elif isinstance(arg, int):
            values.append(ctypes.c_int(arg))
        elif isinstance(arg, float):
            values.append(ctypes.c_double(arg))
        else:
            raise TypeError(f"unsupported kernel argument {type(arg).__name__}")
    pointers = (ctypes.c_void_p * len(values))(
        *(ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values)
    )
    attribute = _LaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION)
    attribute.value[0] = 1  # programmaticStreamSerializationAllowed
    config = _LaunchConfig(
        grid=(ctypes.c_uint * 3)(*grid),
        block=(ctypes.c_uint * 3)(*block),
        shared_mem=0,
        stream=ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream),
        attrs=ctypes.pointer(attribute),
        num_attrs=1,
    )
    status = launch_ex(ctypes.byref(config), kernel.func, pointers, None)
    if status != 0:
        raise RuntimeError(f"cuLaunchKernelEx failed with CUDA error {status}")
