"""Decode attention over a float8 cache: a CUDA kernel compiled at run time (NVRTC).

Triton's kernel for a float8 cache (engine/attention_triton.py, FP8) is bound by its
instructions (Triton moves 8-bit value blocks into the tensor-core layout a byte at a
time through shared memory) and ran slower than bf16 at half the bytes. This one feeds
the tensor cores straight from registers, in the FlashAttention-2 register layouts and
with the free choice of which key and which dimension each column of a product stands
for:

- scores S = Q K^T with `mma.m16n8k16` (f16 in, f32 out): Q is the A operand (the
  group's query heads as rows), the keys the B operand. A thread's B fragment covers 4
  of a key's dimensions per 16-wide step; ordering the dimensions so that a thread's
  are contiguous makes every key read a 16-byte load of its row, and one
  `cvt.rn.f16x2.e4m3x2` (exact) turns two bytes into the operand.
- values O^T = V^T P^T with the same instruction: the C fragment of the scores is the
  B fragment of P^T as it stands (no shuffle). A thread's A fragment pairs two keys at
  one dimension; 16-byte loads of 4 keys' rows and one `prmt` per 4 pairs arrange them.
- The per-key factors: the keys' multiply the scores; the values' multiply the weights,
  kept in f16's range by a running reference (the largest value factor so far, rescaled
  like the running maximum). A limit of that: a token whose value factor were 10^4
  times the others' would push their weights into f16's subnormals (bf16 weights, as in
  Triton's kernel, have no such floor); the tests' factors vary about tenfold.

Two ways of sharing the keys among warps, both one warp a block (`schedule` picks):

- Balanced (many sequences): each KV head's keys, the step's sequences laid end to end
  in blocks of KEYS, shared evenly among as many warps as fill the GPU once. A sequence
  inside one warp's range is written out by it; one cut between warps leaves a partial
  (max, sum, weighted values) from each piece, and the last piece to finish (a ticket
  in a per-cache workspace, set back to zero by that merge) merges them: no merge
  kernel. With one warp a sequence, the longest sequence sets the time: batch 64 of
  32-560 keys took 56.7 us a layer, against 40.8 for 64 of equal length (the same
  bytes); balanced, 47.7. 64 chats in engine_bench: 5,626 -> 5,780-5,884 tok/s.
- Split (few sequences, and groups of query heads): one warp a (KV head, sequence,
  split), as many equal splits as fill the GPU (a power of two up to 32), merged by
  attention_triton's merge kernel (one split writes the output itself). Below a
  quarter of the GPU's warps, more warps a sequence beat the balanced form's fewer,
  longer ones (batch 8: 14.0 against 15.5 us; benchmarks/results/notes-2026-11-29-
  gpu-session11.md).

Both launch with PDL on sm_90+ (engine/pdl.launch_cuda): before waiting for the kernel
before (the RoPE and cache write), a warp reads only the step's lengths, slots and first
row, and sends its first keys' and values' rows to L2 (prefetches, nothing into L1).

On an H200, batch 64 of 300-600 keys, 32 KV heads of 128, the split form (one split)
took 69.6 us per layer against 133.3 for Triton's float8 kernel and 117.7 for bf16
(benchmarks/results/fp8-attention-*-s10*.json). Rounding: relative error 1.7e-3 against
float64 over the dequantized cache, Triton's 2.3e-3.

Query heads per KV head: at most 8 (the products' N); head size 64 or 128; bf16 or fp16
queries. Needs sm_89+ (the float8 conversion) and NVRTC, which torch's CUDA wheels bring
(torch.cuda._compile_kernel). Elsewhere, or if it fails to compile, Triton's kernel
reads the cache (attention_triton._launch asks `usable`). Each configuration (head
size, group, form and splits, rows variant, dtypes) compiles at first use, in under a
second: with CUDA graphs that is the warm-up before capture; without them, a batch size
that needs a new form or number of splits compiles while serving. The balanced form's
workspace belongs to the cache tensor: steps on two streams over one cache at once
would share its tickets (the engine runs one step at a time).
"""

from __future__ import annotations

import functools
import logging
import math
import weakref
from pathlib import Path
from typing import Any

import torch

from engine import pdl

log = logging.getLogger(__name__)

KEYS = 32  # keys a warp takes per iteration of its loop (two 16-key products)
MIN_BLOCKS = 16  # warps an SM holds at least: caps a thread at 128 registers
MIN_WARP_BLOCKS = 2  # blocks of KEYS keys a warp takes at least
ENABLED = True  # False: Triton's kernel reads float8 caches too (A/B benchmarks)


@functools.cache
def _cuda_source() -> str:
    """The kernels' CUDA source (package data beside this module), read once."""
    return Path(__file__).with_name("attention_fp8.cu").read_text()


_C_TYPES = {torch.int32: "int", torch.int64: "long long"}


def source(dim: int, group: int, nsplit: int, based: bool, bf16: bool, index_types: str) -> str:
    """The kernel's source for one configuration (compile-time constants): nsplit 0 the
    balanced kernel (fp8_decode), else the one with that many splits a sequence
    (fp8_decode_split); index_types: the C types of slots, lengths and first."""
    slot_t, len_t, first_t = index_types.split(",")
    defines = {
        "D": dim, "GROUP": group, "NSPLIT": nsplit, "BASED": int(based), "BF16": int(bf16),
        "KEYS": KEYS, "MIN_BLOCKS": MIN_BLOCKS if nsplit else per_sm(dim, group),
        "SLOT_T": slot_t, "LEN_T": len_t, "FIRST_T": first_t,
    }  # fmt: skip
    return "".join(f"#define {k} {v}\n" for k, v in defines.items()) + _cuda_source()


@functools.cache
def _kernel(device_index: int, *config: Any) -> Any:
    """The kernel for one configuration, loaded on device `device_index` (the current
    device: _compile_kernel compiles for it and loads into its context)."""
    from torch.cuda import _compile_kernel

    name = "fp8_decode_split" if config[2] else "fp8_decode"
    return _compile_kernel(source(*config), name)


@functools.cache
def _compiles(device_index: int) -> bool:
    """Whether NVRTC builds the kernel for this GPU (once a process): a torch without
    torch.cuda._compile_kernel (or with another signature), or a missing NVRTC library,
    leaves it to Triton."""
    try:
        _kernel(device_index, 128, 1, 0, False, True, "long long,long long,long long")
    except (AttributeError, ImportError, OSError, RuntimeError, TypeError) as error:
        log.warning("float8 cache: the CUDA attention kernel is not used (%s)", error)
        return False
    return True


def _fits(x: torch.Tensor, rows: int, align: int = 16) -> bool:
    """Unit stride along the last axis, the others multiples of `rows` elements and
    below 2**31 (the kernel takes them as int), the base on `align` bytes."""
    strides = x.stride()
    return (
        strides[-1] == 1
        and all(s % rows == 0 and s < 2**31 for s in strides[:-1])
        and x.data_ptr() % align == 0
    )


def usable(
    q: torch.Tensor,
    caches: tuple[torch.Tensor, torch.Tensor],
    out: torch.Tensor,
    group: int,
    *indices: torch.Tensor,
) -> bool:
    """Whether this kernel serves these tensors (else Triton's does): float8 caches of
    head size 64 or 128 whose rows it reads 16 bytes at a time, half-precision q and out
    (written 8 elements at a time), at most 8 query heads a KV head, int32 or int64
    indices (slots, lengths or positions, the first row), all on the current device;
    not while ENABLED is off."""
    k_cache, v_cache = caches
    if not (
        ENABLED and q.is_cuda and q.device.index == torch.cuda.current_device() and 1 <= group <= 8
    ):
        return False
    if k_cache.dtype != torch.float8_e4m3fn or k_cache.shape[-1] not in (64, 128):
        return False
    if q.dtype not in (torch.float16, torch.bfloat16) or out.dtype != q.dtype:
        return False
    if not all(x.dtype in _C_TYPES for x in indices) or out.shape != q.shape:
        return False
    if not (_fits(k_cache, 16) and _fits(v_cache, 16) and _fits(out, 8) and _fits(q, 1, 2)):
        return False
    device = q.device.index
    return torch.cuda.get_device_capability(device) >= (8, 9) and _compiles(device)


def per_sm(dim: int, group: int) -> int:
    """Warps an SM holds at least in the balanced kernel (its register cap): MIN_BLOCKS,
    except where a group's accumulators at head size 128 would spill at 128 registers
    (12: 168 registers)."""
    return 12 if dim == 128 and group > 1 else MIN_BLOCKS


def schedule(batch: int, kv_heads: int, device: torch.device) -> int:
    """0: the balanced kernel, where one warp a sequence would fill at least a quarter of
    the GPU's warps (many sequences, whose lengths differ); else the splits a sequence
    takes, enough warps to fill the GPU once (a power of two up to 32), for few
    sequences and for groups, where more warps a sequence measured faster
    (benchmarks/results/notes-2026-11-29-gpu-session11.md)."""
    slots = torch.cuda.get_device_properties(device).multi_processor_count * MIN_BLOCKS
    programs = batch * kv_heads
    if programs * 4 >= slots:
        return 0
    parts = 1
    while parts < 32 and programs * parts * 2 <= slots:
        parts *= 2
    return parts


def warps(kv_heads: int, dim: int, group: int, device: torch.device) -> int:
    """Warps a KV head's keys are shared among: as many as fill the GPU once. Each takes
    at least MIN_WARP_BLOCKS blocks, so a step with few keys uses fewer of them."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, sms * per_sm(dim, group) // kv_heads)


_WORKSPACES: dict[int, dict[tuple[int, ...], Any]] = {}  # by id of the cache tensor


def _workspace(
    cache: torch.Tensor, kv_heads: int, grid_warps: int, group: int, dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pieces' partials (weighted values; max and sum) and the tickets, one set for
    each cache tensor (a runner's layers are views of one: two engines' steps never
    share a set), kept as long as the cache lives, so graphs captured with them stay
    valid. The tickets start at zero and each merge sets its own back to zero."""
    base = cache if cache._base is None else cache._base
    sets = _WORKSPACES.get(id(base))
    if sets is None:
        sets = _WORKSPACES[id(base)] = {}
        weakref.finalize(base, _WORKSPACES.pop, id(base), None)
    key = (kv_heads, grid_warps, group, dim)
    if key not in sets:
        pieces = kv_heads * grid_warps * 2 * group
        sets[key] = (
            torch.empty((pieces, dim), dtype=torch.float32, device=cache.device),
            torch.empty((pieces, 2), dtype=torch.float32, device=cache.device),
            torch.zeros(kv_heads * grid_warps, dtype=torch.int32, device=cache.device),
        )
    return sets[key]  # type: ignore[no-any-return]


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    scales: tuple[torch.Tensor, torch.Tensor],
    slots: torch.Tensor,
    lengths: torch.Tensor,
    out: torch.Tensor,
    based: tuple[torch.Tensor, int] | None,
) -> None:
    """attention_triton._launch's work for a float8 cache (`schedule` picks the kernel):
    balanced, each KV head's keys (the step's sequences end to end) shared evenly among
    `warps` warps, a sequence cut between warps merged by the last of them; or split,
    each sequence cut in equal splits, merged by attention_triton's merge kernel (none
    for one split). based: (first, batch) as there (a mixed step's decode rows, found on
    the device)."""
    from engine.attention_triton import merge_splits

    batch = based[1] if based else lengths.shape[0]
    if batch == 0:
        return
    heads, kv_heads, dim = q.shape[1], k_cache.shape[2], k_cache.shape[3]
    group = heads // kv_heads
    nsplit = schedule(batch, kv_heads, q.device)
    first = based[0] if based else lengths  # (unread without `based`)
    index_types = ",".join(_C_TYPES[x.dtype] for x in (slots, lengths, first))
    bf16 = q.dtype == torch.bfloat16
    kernel = _kernel(q.device.index, dim, group, nsplit, based is not None, bf16, index_types)
    k_scale, v_scale = scales
    common = [
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        k_scale.stride(0), k_scale.stride(1), 1.0 / math.sqrt(dim),
        out, out.stride(0), out.stride(1),
    ]  # fmt: skip
    if nsplit == 0:
        grid_warps = warps(kv_heads, dim, group, q.device)
        acc, stats, tickets = _workspace(k_cache, kv_heads, grid_warps, group, dim)
        pdl.launch_cuda(
            kernel, (kv_heads, grid_warps, 1), (32, 1, 1),
            [
                q, k_cache, v_cache, k_scale, v_scale, slots, lengths, first,
                q.shape[0], batch, MIN_WARP_BLOCKS, acc, stats, tickets,
                q.stride(0), q.stride(1), *common,
            ],
            q.device,
        )  # fmt: skip
        return
    if nsplit > 1:
        acc = torch.empty((batch, heads, nsplit, dim), dtype=torch.float32, device=q.device)
        stats = torch.empty((batch, heads, nsplit, 2), dtype=torch.float32, device=q.device)
    else:
        acc = stats = out  # unread
    pdl.launch_cuda(
        kernel, (kv_heads, batch, nsplit), (32, 1, 1),
        [
            q, k_cache, v_cache, k_scale, v_scale, slots, lengths, acc, stats, first,
            q.shape[0], q.stride(0), q.stride(1), *common,
        ],
        q.device,
    )  # fmt: skip
    if nsplit > 1:
        merge_splits(acc, stats, out, first, q.shape[0], based is not None)
