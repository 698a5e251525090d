"""A lean LLaMA-family forward over a slot KV cache (the gpt-fast idea, on HF weights).

The weights are taken from a loaded transformers `LlamaForCausalLM` (or Mistral; LoRA
already merged): q/k/v and gate/up are fused into one matrix each, so a decode step is
a handful of large matrix products per layer. The KV cache is allocated once:
`slots` sequences of up to `slot_tokens` tokens. A slot keeps its tokens after its
request ends, so the next turn of the same chat reuses them (prefix reuse).

A mixed step (`forward`, `run_plan`) runs prompt chunks and decode rows in one pass: on
a GPU, the chunks' attention is one call of a Triton kernel over varlen sequences that
reads the keys in place from the slots (engine/chunk_triton.py) and the decode rows
take the decode-attention kernel (and the pass can be replayed as a CUDA graph, padded
to a bucket of rows); elsewhere SDPA per chunk, causal over the slot's cache. A decode
step (`decode`) runs one token for each of B sequences, reading each sequence's cache
up to its own length (a Triton kernel on CUDA, which for a few sequences also applies
RoPE and caches the new key and value; gathered SDPA elsewhere). Decode's matrix
products go through engine/skinny_gemm.py on CUDA: a Triton kernel for each weight and
batch size where it measured faster than cuBLAS when the runner was built.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from engine.attention import (
    FUSED_ROPE_ROWS,
    decode_attention,
    fp8_cache_capable,
    kernel_settings,
    triton_head_dim,
    varlen_capable,
)
from engine.linear import Linear, Prologue, plain_linear, residual_linear
from engine.plan import Pad, Plan

SUPPORTED = ("llama", "mistral")


def supports(model: Any) -> bool:
    """Whether this runner can serve `model` (plain weights of a LLaMA-shaped model)."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", "") not in SUPPORTED:
        return False
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return False
    if getattr(config, "sliding_window", None):
        return False
    # On a GPU every step runs the Triton kernels (and CUDA graphs, which the SDPA
    # fallback's host reads would break): only for the head sizes they take.
    if next(model.parameters()).is_cuda and not triton_head_dim(head_size(config)):
        return False
    layer = model.model.layers[0]
    return all(
        type(m).__name__ == "Linear" and m.weight.dtype.is_floating_point
        for m in (layer.self_attn.q_proj, layer.mlp.gate_proj)
    )


def head_size(config: Any) -> int:
    """Dimensions per attention head: the config's head_dim, else hidden / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@dataclass
class Layer:
    input_norm: torch.Tensor
    qkv: torch.Tensor  # ((H + 2K) * D, E)
    o: torch.Tensor  # (E, H * D)
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # (2 * I, E)
    down: torch.Tensor  # (E, I)


Scales = tuple[torch.Tensor, torch.Tensor]


class LlamaRunner:
    def __init__(self, model: Any, *, slots: int, slot_tokens: int, kv_fp8: bool = False) -> None:
        config = model.config
        self.device = next(model.parameters()).device
        self.dtype = model.model.embed_tokens.weight.dtype
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = head_size(config)
        self.eps = config.rms_norm_eps
        self.vocab_size = config.vocab_size
        self.slots = slots
        self.slot_tokens = slot_tokens
        self.embed = model.model.embed_tokens.weight
        self.final_norm = model.model.norm.weight
        self.lm_head = model.lm_head.weight
        with torch.no_grad():
            self.layers = [self._fuse(layer) for layer in model.model.layers]
            self.cos, self.sin = self._rope_table(model, slot_tokens)
        shape = (len(self.layers), slots, slot_tokens, self.kv_heads, self.head_dim)
        # kv_fp8: keys and values as float8 e4m3, each (token, head) row scaled by its
        # own fp32 factor (its largest magnitude to 448): half the memory, read by the
        # Triton kernels alone (fp8_cache_capable).
        if kv_fp8 and not fp8_cache_capable(self.embed):
            raise ValueError("a float8 KV cache needs the Triton kernels on an sm_89+ GPU")
        self.kv_fp8 = kv_fp8
        cache_dtype = torch.float8_e4m3fn if kv_fp8 else self.dtype
        # Never read past a sequence's length, so no need to zero (pages stay untouched).
        self.k_cache = torch.empty(shape, dtype=cache_dtype, device=self.device)
        self.v_cache = torch.empty(shape, dtype=cache_dtype, device=self.device)
        self.k_scale: torch.Tensor | None = None
        self.v_scale: torch.Tensor | None = None
        if kv_fp8:
            self.k_scale = torch.empty(shape[:-1], dtype=torch.float32, device=self.device)
            self.v_scale = torch.empty(shape[:-1], dtype=torch.float32, device=self.device)
        if self.device.type == "cuda":
            # torch sends SDPA to cuDNN by default, which builds a plan for every new
            # shape (40 ms - 2 s); prefill meets a new length every chunk.
            torch.backends.cuda.enable_cudnn_sdp(False)
            # cuBLASLt's picks beat cuBLAS's for the few-row products of decode steps (an
            # H200, 7B, 64 chats, A/B in both orders in one call: 5,200-5,224 -> 5,265-5,285
            # tok/s; benchmarks/results/notes-2026-11-29-gpu-session9.md). torch logs once
            # that the setting is experimental.
            torch.backends.cuda.preferred_blas_library("cublaslt")
        # Mixed steps' chunks and decode rows through Triton kernels on a GPU that has
        # them (the chunks as varlen sequences: engine/plan.VarlenPlan); SDPA elsewhere.
        self.varlen = varlen_capable(self.embed)
        # Fused Triton kernels on CUDA; plain PyTorch ops elsewhere.
        self.fused = self.device.type == "cuda" and importlib.util.find_spec("triton") is not None
        # Decode's few-row products: a Triton kernel where it measured faster than cuBLAS
        # for that weight and batch size, decided once here, before any graph capture.
        # The residual products add into the stream in place (it is replaced by their
        # result): engine/linear.torch_linear's into_bias.
        self.decode_linear: Linear = residual_linear
        if self.fused:
            from engine.skinny_calibrate import calibrate

            self.decode_linear = calibrate(self._linear_groups(), max_rows=slots, into_bias=True)
        # Small decode batches: RoPE, the cache write, attention and the merge in one
        # kernel, which counts its finished splits here (engine/attention_triton.py).
        self._counters: torch.Tensor | None = None
        if self.fused:
            size = FUSED_ROPE_ROWS * self.kv_heads
            self._counters = torch.zeros(size, dtype=torch.int32, device=self.device)

    def _fuse(self, layer: Any) -> Layer:
        attn, mlp = layer.self_attn, layer.mlp
        return Layer(
            input_norm=layer.input_layernorm.weight,
            qkv=torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
            o=attn.o_proj.weight,
            post_norm=layer.post_attention_layernorm.weight,
            gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
            down=mlp.down_proj.weight,
        )

    def _linear_groups(self) -> list[Any]:
        """Each decode product over all layers: its weights, whether it adds the
        residual, and what runs on its rows first."""
        from engine.skinny_calibrate import Group

        layers = self.layers
        return [
            Group([layer.qkv for layer in layers], kind="norm"),
            Group([layer.o for layer in layers], with_bias=True),
            Group([layer.gate_up for layer in layers], kind="norm"),
            Group([layer.down for layer in layers], with_bias=True, kind="glu"),
            Group([self.lm_head], kind="norm"),
        ]

    def _rope_table(self, model: Any, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for every position, from the model's own rotary module (so every RoPE
        variant it supports, e.g. Llama 3 scaling, comes out the same)."""
        positions = torch.arange(length, device=self.device)[None]
        probe = torch.zeros(1, dtype=self.dtype, device=self.device)
        cos, sin = model.model.rotary_emb(probe, positions)
        return cos[0], sin[0]  # (T, D) each, in the model's dtype

    def kv_bytes_per_token(self) -> int:
        return kv_bytes_per_token(
            len(self.layers), self.kv_heads, self.head_dim, self.k_cache.dtype
        )

    def _scales(self, index: int) -> Scales | None:
        """Layer `index`'s (S, T, K) factors of a float8 cache; None for a plain one."""
        if self.k_scale is None or self.v_scale is None:
            return None
        return self.k_scale[index], self.v_scale[index]

    # building blocks -----------------------------------------------------------------
    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def _qkv(
        self, layer: Layer, h: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """(N, E) -> q (N, H, D), k (N, K, D), v (N, K, D), RoPE applied at `positions`."""
        n = h.shape[0]
        qkv = plain_linear(h, layer.qkv, None, self._rms(layer.input_norm))
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        q = qkv[:, :q_size].view(n, self.heads, self.head_dim)
        k = qkv[:, q_size : q_size + kv_size].view(n, self.kv_heads, self.head_dim)
        v = qkv[:, q_size + kv_size :].view(n, self.kv_heads, self.head_dim)
        cos = self.cos[positions][:, None, :]
        sin = self.sin[positions][:, None, :]
        return self._rope(q, cos, sin), self._rope(k, cos, sin), v

    def _mlp(self, layer: Layer, h: torch.Tensor, linear: Linear = residual_linear) -> torch.Tensor:
        """h + MLP(h), written into h where `linear` adds into its bias (h is spent)."""
        gate_up = linear(h, layer.gate_up, None, self._rms(layer.post_norm))
        return linear(gate_up, layer.down, h, Prologue(glu=True))

    def _logits(self, h: torch.Tensor, linear: Linear = plain_linear) -> torch.Tensor:
        return linear(h, self.lm_head, None, self._rms(self.final_norm)).float()

    def _rms(self, weight: torch.Tensor) -> Prologue:
        return Prologue(norm=weight, eps=self.eps)

    # prefill (and mixed steps) -----------------------------------------------------
    def forward(
        self,
        chunks: list[tuple[int, list[int], int]],
        decode: Sequence[tuple[int, int, int]] = (),
    ) -> torch.Tensor:
        """One pass over prompt chunks (slot, token ids, start position) and decode rows
        (token id, slot, position): the matrix products run over all their rows at once
        (a decode row costs one more row of a large product instead of a step of its
        own). Each row's KV is written to its slot. Returns (C + B, V) logits: after
        each chunk's last token, then one per decode row."""
        return self.run_plan(self.plan(chunks, decode))

    def plan(
        self,
        chunks: list[tuple[int, list[int], int]],
        decode: Sequence[tuple[int, int, int]] = (),
        pad: Pad | None = None,
    ) -> Plan:
        return Plan.build(
            chunks, decode, self.device, varlen=self.varlen, slot_tokens=self.slot_tokens, pad=pad
        )

    def run_plan(self, plan: Plan) -> torch.Tensor:
        """The forward of a built plan; with a padded plan, the shapes depend only on the
        padding (CUDA-graph friendly: engine/decode_graphs.MixedGraphs)."""
        h = self.embed[plan.tokens]
        rows = plan.prefill_rows
        for index, layer in enumerate(self.layers):
            q = self._project_and_cache(index, layer, h, plan.positions, plan.slots)
            k_cache, v_cache = self.k_cache[index], self.v_cache[index]
            if plan.varlen is not None:
                # The chunks through the chunk-attention kernel, keys read in place from
                # the slots; the decode rows after them through the decode-attention kernel.
                from engine.attention_triton import triton_decode_rows_attention
                from engine.chunk_triton import triton_chunk_attention

                seqs = plan.varlen
                scales = self._scales(index)
                out = torch.empty_like(q)
                triton_chunk_attention(
                    q, k_cache, v_cache, seqs.cu_q, seqs.cu_k, seqs.used, out, scales
                )
                triton_decode_rows_attention(
                    q, k_cache, v_cache, plan.slots, plan.positions, plan.decode_first,
                    plan.decode_capacity, out,
                    kernel_settings(plan.decode_capacity, fp8=scales is not None), scales,
                )  # fmt: skip
            else:
                parts = []
                if rows:
                    parts.append(self._prefill_attention(index, q[:rows], plan))
                if plan.decode_rows:
                    parts.append(
                        decode_attention(
                            q[rows:], k_cache, v_cache, plan.slots[rows:], plan.positions[rows:] + 1
                        )
                    )
                out = parts[0] if len(parts) == 1 else torch.cat(parts)
            h = h.addmm_(out.reshape(h.shape[0], -1), layer.o.T)  # in place: no copy of h
            h = self._mlp(layer, h)
        return self._logits(h[plan.outputs])

    def _prefill_attention(self, index: int, q: torch.Tensor, plan: Plan) -> torch.Tensor:
        """Causal attention of the chunks' queries (P, H, D) over their slots' caches
        (each chunk's queries sit at the bottom right of its (T, start+T) scores), one
        SDPA call per chunk: where the Triton kernels are not (the CPU)."""
        k_cache, v_cache = self.k_cache[index], self.v_cache[index]
        outputs = []
        for (slot, length, start), first in zip(plan.chunks, plan.chunk_rows, strict=True):
            stop = start + length
            # A CausalBias lets SDPA use its fused kernels instead of a materialised
            # mask (a chat's 10th turn attends to all earlier ones).
            mask = causal_lower_right(length, stop) if start else None
            out = F.scaled_dot_product_attention(
                q[first : first + length].transpose(0, 1)[None],  # (1, H, T, D)
                k_cache[slot, :stop].transpose(0, 1)[None],
                v_cache[slot, :stop].transpose(0, 1)[None],
                attn_mask=mask,
                is_causal=mask is None,
                enable_gqa=self.heads != self.kv_heads,
            )
            outputs.append(out[0].transpose(0, 1))  # (T, H, D)
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def _project_and_cache(
        self,
        index: int,
        layer: Layer,
        h: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        linear: Linear = plain_linear,
    ) -> torch.Tensor:
        """q (N, H, D) for rows `h`; their k and v go into the cache at (slot, position)."""
        if self.fused:
            from engine.fused_triton import rope_into_cache

            qkv = linear(h, layer.qkv, None, self._rms(layer.input_norm))
            return rope_into_cache(
                qkv, self.cos, self.sin, positions, slots, self.k_cache[index],
                self.v_cache[index], self.heads, self.kv_heads, self._scales(index),
            )  # fmt: skip
        q, k, v = self._qkv(layer, h, positions)
        self.k_cache[index, slots, positions] = k
        self.v_cache[index, slots, positions] = v
        return q

    # decode ------------------------------------------------------------------------
    def decode(
        self, tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """One token for each of B sequences: tokens, slots, positions are (B,) device
        tensors; returns logits (B, V). Shapes depend only on B (CUDA-graph friendly)."""
        h = self.embed[tokens]
        lengths = positions + 1
        linear = self.decode_linear
        counters = self._counters if tokens.shape[0] <= FUSED_ROPE_ROWS else None
        for index, layer in enumerate(self.layers):
            k_cache, v_cache = self.k_cache[index], self.v_cache[index]
            if counters is not None:
                from engine.attention_triton import triton_rope_decode_attention

                qkv = linear(h, layer.qkv, None, self._rms(layer.input_norm))
                settings = kernel_settings(tokens.shape[0], fp8=self.kv_fp8)
                out = triton_rope_decode_attention(
                    qkv, self.cos, self.sin, k_cache, v_cache, slots, lengths, self.heads,
                    counters, settings, self._scales(index),
                )  # fmt: skip
            else:
                q = self._project_and_cache(index, layer, h, positions, slots, linear)
                out = decode_attention(q, k_cache, v_cache, slots, lengths, self._scales(index))
            h = linear(out.reshape(h.shape[0], -1), layer.o, h, None)
            h = self._mlp(layer, h, linear)
        return self._logits(h, linear)


def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Cache bytes a token takes over all layers, keys and values, in a cache of `dtype`
    (float8: a byte an element and a 4-byte factor a row: 52% of bf16 at head size 128)."""
    row = head_dim + 4 if dtype == torch.float8_e4m3fn else head_dim * dtype.itemsize
    return 2 * layers * kv_heads * row
