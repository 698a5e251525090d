"""A lean LLaMA-family forward over a slot KV cache (the gpt-fast idea, on HF weights).

The weights are taken from a loaded transformers `LlamaForCausalLM` (or Mistral; LoRA
already merged): q/k/v and gate/up are fused into one matrix each, so a decode step is
a handful of large matrix products per layer. The KV cache is allocated once:
`slots` sequences of up to `slot_tokens` tokens. A slot keeps its tokens after its
request ends, so the next turn of the same chat reuses them (prefix reuse).

Prefill runs one sequence chunk at a time (SDPA, causal over the slot's cache); decode
runs one token for each of B sequences at once, reading each sequence's cache up to its
own length (a Triton kernel on CUDA, gathered SDPA elsewhere). Decode's matrix
products go through engine/skinny_gemm.py on CUDA: a Triton kernel for each weight and
batch size where it measured faster than cuBLAS when the runner was built.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from engine.attention import decode_attention

SUPPORTED = ("llama", "mistral")

# x (M, K), w (N, K), bias (M, N) or None -> x @ w.T (+ bias)
Linear = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def torch_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x @ w.T if bias is None else torch.addmm(bias, x, w.T)


def supports(model: Any) -> bool:
    """Whether this runner can serve `model` (plain weights of a LLaMA-shaped model)."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", "") not in SUPPORTED:
        return False
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return False
    if getattr(config, "sliding_window", None):
        return False
    layer = model.model.layers[0]
    return all(
        type(m).__name__ == "Linear" and m.weight.dtype.is_floating_point
        for m in (layer.self_attn.q_proj, layer.mlp.gate_proj)
    )


@dataclass
class Layer:
    input_norm: torch.Tensor
    qkv: torch.Tensor  # ((H + 2K) * D, E)
    o: torch.Tensor  # (E, H * D)
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # (2 * I, E)
    down: torch.Tensor  # (E, I)


class LlamaRunner:
    def __init__(self, model: Any, *, slots: int, slot_tokens: int) -> None:
        config = model.config
        self.device = next(model.parameters()).device
        self.dtype = model.model.embed_tokens.weight.dtype
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
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
        # Never read past a sequence's length, so no need to zero (pages stay untouched).
        self.k_cache = torch.empty(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.empty(shape, dtype=self.dtype, device=self.device)
        if self.device.type == "cuda":
            # torch sends SDPA to cuDNN by default, which builds a plan for every new
            # shape (40 ms - 2 s); prefill meets a new length every chunk.
            torch.backends.cuda.enable_cudnn_sdp(False)
        # Fused Triton kernels on CUDA; plain PyTorch ops elsewhere.
        self.fused = self.device.type == "cuda" and importlib.util.find_spec("triton") is not None
        # Decode's few-row products: a Triton kernel where it measured faster than cuBLAS
        # for that weight and batch size, decided once here, before any graph capture.
        self.decode_linear: Linear = torch_linear
        if self.fused:
            from engine.skinny_gemm import calibrate

            self.decode_linear = calibrate(self._linear_groups(), max_rows=slots)

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

    def _linear_groups(self) -> list[tuple[list[torch.Tensor], bool]]:
        """Each product's weights over all layers, and whether it adds the residual."""
        layers = self.layers
        return [
            ([layer.qkv for layer in layers], False),
            ([layer.o for layer in layers], True),
            ([layer.gate_up for layer in layers], False),
            ([layer.down for layer in layers], True),
            ([self.lm_head], False),
        ]

    def _rope_table(self, model: Any, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for every position, from the model's own rotary module (so every RoPE
        variant it supports, e.g. Llama 3 scaling, comes out the same)."""
        positions = torch.arange(length, device=self.device)[None]
        probe = torch.zeros(1, dtype=self.dtype, device=self.device)
        cos, sin = model.model.rotary_emb(probe, positions)
        return cos[0], sin[0]  # (T, D) each, in the model's dtype

    def kv_bytes_per_token(self) -> int:
        element = self.k_cache.element_size()
        return 2 * len(self.layers) * self.kv_heads * self.head_dim * element

    # building blocks -----------------------------------------------------------------
    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # Same arithmetic as transformers' LlamaRMSNorm (fp32 statistics).
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * h.to(x.dtype)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def _qkv(
        self, layer: Layer, h: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """(N, E) -> q (N, H, D), k (N, K, D), v (N, K, D), RoPE applied at `positions`."""
        n = h.shape[0]
        qkv = self._norm(h, layer.input_norm) @ layer.qkv.T
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        q = qkv[:, :q_size].view(n, self.heads, self.head_dim)
        k = qkv[:, q_size : q_size + kv_size].view(n, self.kv_heads, self.head_dim)
        v = qkv[:, q_size + kv_size :].view(n, self.kv_heads, self.head_dim)
        cos = self.cos[positions][:, None, :]
        sin = self.sin[positions][:, None, :]
        return self._rope(q, cos, sin), self._rope(k, cos, sin), v

    def _mlp(self, layer: Layer, h: torch.Tensor, linear: Linear = torch_linear) -> torch.Tensor:
        if self.fused:
            from engine.fused_triton import rmsnorm, silu_mul

            gate_up = linear(rmsnorm(h, layer.post_norm, self.eps), layer.gate_up, None)
            return linear(silu_mul(gate_up), layer.down, h)
        gate, up = (self._norm(h, layer.post_norm) @ layer.gate_up.T).chunk(2, dim=-1)
        return torch.addmm(h, F.silu(gate) * up, layer.down.T)

    def _logits(self, h: torch.Tensor, linear: Linear = torch_linear) -> torch.Tensor:
        if self.fused:
            from engine.fused_triton import rmsnorm

            return linear(rmsnorm(h, self.final_norm, self.eps), self.lm_head, None).float()
        return (self._norm(h, self.final_norm) @ self.lm_head.T).float()

    # prefill -----------------------------------------------------------------------
    def prefill(self, slot: int, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """Run `tokens` (T,) at positions start..start+T-1 of `slot`, writing their KV;
        return the logits (V,) after the last one."""
        return self.prefill_many([(slot, tokens, start)])[0]

    def prefill_many(self, chunks: list[tuple[int, torch.Tensor, int]]) -> torch.Tensor:
        """Prefill several (slot, tokens, start) chunks in one pass: the matrix products
        run over all their tokens at once, attention per chunk. Returns (C, V) logits
        after each chunk's last token."""
        device = self.device
        tokens = torch.cat([t for _, t, _ in chunks])
        positions = torch.cat(
            [torch.arange(start, start + t.shape[0], device=device) for _, t, start in chunks]
        )
        slots = torch.cat([torch.full((t.shape[0],), slot, device=device) for slot, t, _ in chunks])
        h = self.embed[tokens]
        for index, layer in enumerate(self.layers):
            q = self._project_and_cache(index, layer, h, positions, slots)
            out = torch.cat(
                [
                    self._prefill_attention(index, q[first:end], chunks[i])
                    for i, first, end in self._spans(chunks)
                ]
            )
            h = torch.addmm(h, out.reshape(h.shape[0], -1), layer.o.T)
            h = self._mlp(layer, h)
        ends = torch.tensor([end - 1 for _, _, end in self._spans(chunks)], device=device)
        return self._logits(h[ends])

    @staticmethod
    def _spans(chunks: list[tuple[int, torch.Tensor, int]]) -> list[tuple[int, int, int]]:
        """(chunk index, first row, end row) of each chunk in the packed batch."""
        spans, row = [], 0
        for index, (_slot, tokens, _start) in enumerate(chunks):
            spans.append((index, row, row + tokens.shape[0]))
            row += tokens.shape[0]
        return spans

    def _prefill_attention(
        self, index: int, q: torch.Tensor, chunk: tuple[int, torch.Tensor, int]
    ) -> torch.Tensor:
        """Causal attention of one chunk's queries (T, H, D) over its slot's cache."""
        slot, tokens, start = chunk
        t = tokens.shape[0]
        stop = start + t
        # Causal over the slot's whole prefix: the T queries sit at the bottom right of a
        # (T, start+T) score matrix. A CausalBias lets SDPA use its fused kernels instead
        # of a materialised mask (a chat's 10th turn attends to all earlier ones).
        mask = causal_lower_right(t, stop) if start else None
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],  # (1, H, T, D)
            self.k_cache[index, slot, :stop].transpose(0, 1)[None],
            self.v_cache[index, slot, :stop].transpose(0, 1)[None],
            attn_mask=mask,
            is_causal=mask is None,
            enable_gqa=self.heads != self.kv_heads,
        )
        return out[0].transpose(0, 1)  # (T, H, D)

    def _project_and_cache(
        self,
        index: int,
        layer: Layer,
        h: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        linear: Linear = torch_linear,
    ) -> torch.Tensor:
        """q (N, H, D) for rows `h`; their k and v go into the cache at (slot, position)."""
        if self.fused:
            from engine.fused_triton import rmsnorm, rope_into_cache

            qkv = linear(rmsnorm(h, layer.input_norm, self.eps), layer.qkv, None)
            return rope_into_cache(
                qkv, self.cos, self.sin, positions, slots,
                self.k_cache[index], self.v_cache[index], self.heads, self.kv_heads,
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
        for index, layer in enumerate(self.layers):
            q = self._project_and_cache(index, layer, h, positions, slots, linear)
            out = decode_attention(q, self.k_cache[index], self.v_cache[index], slots, lengths)
            h = linear(out.reshape(h.shape[0], -1), layer.o, h)
            h = self._mlp(layer, h, linear)
        return self._logits(h, linear)

    def copy_prefix(self, source: int, target: int, length: int) -> None:
        """Copy the first `length` cached tokens of one slot into another."""
        self.k_cache[:, target, :length] = self.k_cache[:, source, :length]
        self.v_cache[:, target, :length] = self.v_cache[:, source, :length]
