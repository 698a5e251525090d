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
Graph capture keeps these launches as programmatic edges.
"""

from __future__ import annotations

import functools
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
