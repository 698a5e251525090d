"""cuBLASLt's other algorithms for the decode step's few-row products.

For each product torch runs cuBLASLt's first heuristic pick. At the decode step's row
counts another of its top picks is often faster: on an H200 with LLaMA-7B's weights, qkv
at 64 rows 29.4 -> 28.1 us, gate_up 49.9 -> 47.8, down at 17 rows 30.0 -> 26.0, o at
17 rows 14.1 -> 12.5 (benchmarks/results/cublaslt-algos-2026-11-29-s12.json). So
engine/skinny_calibrate.py times the first `ALGOS` picks beside torch and the Triton
kernels at engine start, and SkinnyGemm runs a winner through `Matmul`: the same
library torch loaded, called directly (ctypes), its descriptors built once. No host
sync: safe inside CUDA-graph capture.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import weakref
from typing import Any

import torch

log = logging.getLogger(__name__)

ALGOS = 8  # heuristic picks asked for (the first is torch's)
WORKSPACE = 32 * 2**20  # bytes an algorithm may use (split-K partials)
ALIGN = 256  # bytes: cuBLASLt's default minimum alignment of each matrix's pointer

# cublasLt.h / library_types.h
_COMPUTE_32F = 68
_DATA_TYPES = {torch.bfloat16: 14, torch.float16: 2}  # CUDA_R_16BF, CUDA_R_16F
_R_32F = 0
_DESC_TRANSA, _DESC_TRANSB = 3, 4
_PREF_MAX_WORKSPACE_BYTES = 1
_OP_N, _OP_T = 0, 1


class _Heuristic(ctypes.Structure):  # cublasLtMatmulHeuristicResult_t
    _fields_ = [
        ("algo", ctypes.c_uint64 * 8),
        ("workspace_size", ctypes.c_size_t),
        ("state", ctypes.c_int),
        ("waves", ctypes.c_float),
        ("reserved", ctypes.c_int * 4),
    ]


@functools.cache
def _library() -> Any:
    """The cuBLASLt torch loaded (in the process's maps; else by its soname)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                if "libcublasLt.so" in line:
                    return ctypes.CDLL(line.split()[-1])
    except OSError:
        pass
    for name in ("libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so.11"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise OSError("cuBLASLt is not loaded in this process")


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"cuBLASLt {what} failed with status {status}")


@functools.cache
def _handle(device_index: int) -> ctypes.c_void_p:
    handle = ctypes.c_void_p()
    with torch.cuda.device(device_index):
        _check(_library().cublasLtCreate(ctypes.byref(handle)), "create")
    return handle


def workspace(device: torch.device) -> torch.Tensor:
    """A workspace for Matmul calls: calls that may overlap (other streams, another
    engine) need their own; calls one after another on one stream can share one."""
    return torch.empty(WORKSPACE, dtype=torch.uint8, device=device)


def available(device: torch.device) -> bool:
    """Whether Matmul can run on `device` (a CUDA GPU, the library found)."""
    if device.type != "cuda" or torch.version.hip:
        return False
    try:
        _library()
    except OSError:
        return False
    return True


def _destroy(desc: ctypes.c_void_p, layouts: list[ctypes.c_void_p]) -> None:
    lib = _library()
    for layout in layouts:
        lib.cublasLtMatrixLayoutDestroy(layout)
    lib.cublasLtMatmulDescDestroy(desc)


class Matmul:
    """y (m, n) = x (m, k) @ w (n, k).T (+ bias (m, n)) for one shape and dtype, by any
    of cuBLASLt's first ALGOS heuristic picks (`algos` of them were offered). x, w,
    bias and y contiguous; with `bias`, beta is one (y may be bias itself: in place)."""

    def __init__(
        self, m: int, n: int, k: int, dtype: torch.dtype, bias: bool, device: torch.device
    ):
        lib = _library()
        self.shape, self.dtype, self.bias = (m, n, k), dtype, bias
        self.device_index = (
            device.index if device.index is not None else torch.cuda.current_device()
        )
        self._handle = _handle(self.device_index)
        self._desc = ctypes.c_void_p()
        _check(lib.cublasLtMatmulDescCreate(ctypes.byref(self._desc), _COMPUTE_32F, _R_32F), "desc")
        # Column-major terms: y.T (n, m) = w (k, n).T @ x.T (k, m), as torch calls it.
        for attribute, op in ((_DESC_TRANSA, _OP_T), (_DESC_TRANSB, _OP_N)):
            value = ctypes.c_int(op)
            _check(
                lib.cublasLtMatmulDescSetAttribute(self._desc, attribute, ctypes.byref(value), 4),
                "op",
            )
        data_type = _DATA_TYPES[dtype]
        self._layouts = []
        for rows, cols in ((k, n), (k, m), (n, m)):  # w, x, y (and bias)
            layout = ctypes.c_void_p()
            _check(
                lib.cublasLtMatrixLayoutCreate(
                    ctypes.byref(layout), data_type, ctypes.c_uint64(rows), ctypes.c_uint64(cols),
                    ctypes.c_int64(rows),
                ),
                "layout",
            )  # fmt: skip
            self._layouts.append(layout)
        preference = ctypes.c_void_p()
        _check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(preference)), "preference")
        size = ctypes.c_uint64(WORKSPACE)
        _check(
            lib.cublasLtMatmulPreferenceSetAttribute(
                preference, _PREF_MAX_WORKSPACE_BYTES, ctypes.byref(size), 8
            ),
            "workspace",
        )  # fmt: skip
        found = (_Heuristic * ALGOS)()
        count = ctypes.c_int()
        w_layout, x_layout, y_layout = self._layouts
        _check(
            lib.cublasLtMatmulAlgoGetHeuristic(
                self._handle, self._desc, w_layout, x_layout, y_layout, y_layout, preference,
                ALGOS, found, ctypes.byref(count),
            ),
            "heuristic",
        )  # fmt: skip
        lib.cublasLtMatmulPreferenceDestroy(preference)
        self.algos = [found[i] for i in range(count.value) if found[i].state == 0]
        # The descriptors are host objects read at each call, not by graphs captured
        # with it: freed with the Matmul (calibration drops the picks that lose).
        self.close = weakref.finalize(self, _destroy, self._desc, list(self._layouts))
        self._alpha = ctypes.c_float(1.0)
        self._beta = ctypes.c_float(1.0 if bias else 0.0)

    def __call__(
        self,
        algo: int,
        x: torch.Tensor,
        w: torch.Tensor,
        bias: torch.Tensor | None,
        out: torch.Tensor,
        space: torch.Tensor,
    ) -> torch.Tensor:
        """out = x @ w.T (+ bias) by the algo-th pick, on the current stream (out as
        `fits` asks of the others, and allocated by torch: on ALIGN bytes), with `space`
        (a `workspace`) as its scratch."""
        if space.numel() < WORKSPACE or space.device != out.device:
            raise ValueError(f"the workspace must be {WORKSPACE} bytes on {out.device}")
        if (bias is not None) != self.bias:
            raise ValueError("this Matmul was built with bias" if self.bias else "without bias")
        w_layout, x_layout, y_layout = self._layouts
        c = out if bias is None else bias
        stream = torch.cuda.current_stream(out.device).cuda_stream
        _check(
            _library().cublasLtMatmul(
                self._handle, self._desc, ctypes.byref(self._alpha),
                ctypes.c_void_p(w.data_ptr()), w_layout, ctypes.c_void_p(x.data_ptr()), x_layout,
                ctypes.byref(self._beta), ctypes.c_void_p(c.data_ptr()), y_layout,
                ctypes.c_void_p(out.data_ptr()), y_layout, ctypes.byref(self.algos[algo].algo),
                ctypes.c_void_p(space.data_ptr()),
                ctypes.c_size_t(WORKSPACE), ctypes.c_void_p(stream),
            ),
            "matmul",
        )  # fmt: skip
        return out

    def fits(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> bool:
        """Whether these tensors are the shape and layout this Matmul was built for:
        contiguous, on its device, and on ALIGN bytes (what the heuristics assume of the
        pointers when not told otherwise)."""
        m, n, k = self.shape
        tensors = (x, w) if bias is None else (x, w, bias)
        return (
            x.shape == (m, k) and w.shape == (n, k) and (bias is None or bias.shape == (m, n))
            and all(t.dtype == self.dtype and t.is_contiguous() for t in tensors)
            and all(t.device.index == self.device_index and t.is_cuda for t in tensors)
            and all(t.data_ptr() % ALIGN == 0 for t in tensors)
        )  # fmt: skip
