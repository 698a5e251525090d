"""Fast paths for LoRA training on a frozen base: same function, fewer bytes and FLOPs.

Four replacements, each checked against the plain transformers/peft path
(tests/training/test_fast.py, tests/training/test_gpu_fast.py) and measured on the GPU
(benchmarks/train_bench.py):

- **LoRA in the activations' dtype, fused with its base layer.** peft casts each
  layer's input to the adapter's float32, applies dropout to a copy, keeps both for
  backward, and adds the adapter's output (and in backward its input gradient) as
  tensors of their own. Here the adapter's matrices are cast to the input's dtype
  (bfloat16 on a GPU; float32 accumulation in the matmul), their product is added into
  the base layer's output in place (`addmm_`), and backward keeps only the input, which
  other layers keep anyway, and the rank-r product. The adapter keeps float32 master
  weights and gets float32 gradients.
- **Loss on trained positions only, chunked, without keeping logits.** The head runs on
  the positions that have a target (an Alpaca prompt has none), a few thousand rows at
  a time; the gradient of each chunk is taken in the forward pass, so no (tokens x
  vocab) float32 tensor outlives its chunk.
- **Packed rows through variable-length flash attention.** transformers turns packed
  position ids into a dense block-diagonal mask, which rules out the flash kernel; with
  the example boundaries known at collation, `torch.nn.attention.varlen` attends within
  each example directly. Without CUDA it falls back to per-example SDPA.
- **Fused RMSNorm, RoPE and SiLU*up** from Liger Kernel (Triton), when it is installed
  and the model is on a GPU: transformers' versions run in float32 with several passes
  over the activations each, and keep float32 copies for backward.

`--no-fast-paths` trains with plain transformers/peft for comparison.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from engine.attention import flash_capable, varlen_causal

log = logging.getLogger(__name__)

ATTENTION = "lorabot_packed"
LOSS_CHUNK = 4096  # positions per head/loss chunk: (4096 x vocab) float32 at a time


# LoRA ------------------------------------------------------------------------------
class _LoraLinear(torch.autograd.Function):
    """x @ W.T + scaling * dropout(x) @ A.T @ B.T in x's dtype, for a frozen, bias-free W
    of x's dtype, or W None for the adapter's part alone (a base that runs itself). With
    W the adapter's product is added into the base output in place, and in backward its
    input gradient into the base's, so neither is a tensor of its own. A and B get
    gradients in their own dtype."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        a: torch.Tensor,
        b: torch.Tensor,
        scaling: float,
        p: float,
    ) -> torch.Tensor:
        a_c, b_c = a.to(x.dtype), b.to(x.dtype)
        flat = x.reshape(-1, x.shape[-1])
        keep = None
        dropped = flat
        if p > 0.0:
            keep = torch.empty_like(flat, dtype=torch.bool).bernoulli_(1.0 - p)
            dropped = flat * keep * (1.0 / (1.0 - p))
        xa = dropped @ a_c.T  # (N, r)
        if weight is None:
            out = (xa * scaling) @ b_c.T
        else:
            out = flat @ weight.T
            out.addmm_(xa, b_c.T, alpha=scaling)
        ctx.save_for_backward(flat, weight, xa, a_c, b_c, keep)
        ctx.scaling, ctx.p = scaling, p
        ctx.dtypes = (a.dtype, b.dtype)
        ctx.shape = x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        flat, weight, xa, a_c, b_c, keep = ctx.saved_tensors
        s, p = ctx.scaling, ctx.p
        g = grad.reshape(-1, grad.shape[-1])
        gb = (g @ b_c) * s  # (N, r)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            if weight is not None and keep is None:
                grad_x = (g @ weight).addmm_(gb, a_c)
            else:
                grad_x = gb @ a_c
                if keep is not None:
                    grad_x = grad_x * keep * (1.0 / (1.0 - p))
                if weight is not None:
                    grad_x += g @ weight
            grad_x = grad_x.view(ctx.shape)
        if ctx.needs_input_grad[2]:
            dropped = flat if keep is None else flat * keep * (1.0 / (1.0 - p))
            grad_a = (gb.T @ dropped).to(ctx.dtypes[0])
        if ctx.needs_input_grad[3]:
            grad_b = ((g.T @ xa) * s).to(ctx.dtypes[1])
        return grad_x, None, grad_a, grad_b, None, None


def _lora_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """Replaces a peft LoRA linear layer's forward when one plain adapter is active."""
    active = self.active_adapters
    if args or kwargs or self.disable_adapters or self.merged or len(active) != 1:
        return type(self).forward(self, x, *args, **kwargs)
    name = active[0]
    base = self.base_layer
    if name not in self.lora_A:
        return base(x)
    dropout = self.lora_dropout[name]
    p = float(getattr(dropout, "p", 0.0)) if self.training else 0.0
    a, b = self.lora_A[name].weight, self.lora_B[name].weight
    scaling = float(self.scaling[name])
    if (
        type(base) is torch.nn.Linear
        and base.bias is None
        and not base.weight.requires_grad
        and base.weight.dtype == x.dtype
    ):
        return _LoraLinear.apply(x, base.weight, a, b, scaling, p)
    # Quantized (bitsandbytes) or otherwise special base layers run themselves.
    result = base(x)
    return result + _LoraLinear.apply(x, None, a, b, scaling, p).to(result.dtype)


def _plain_lora(module: Any) -> bool:
    """A LoRA layer on a linear base with vanilla adapters (no DoRA or other variant)."""
    lora_a = getattr(module, "lora_A", None)
    if lora_a is None or not hasattr(module, "base_layer") or not len(lora_a):
        return False
    if any(not isinstance(layer, torch.nn.Linear) for layer in lora_a.values()):
        return False
    if any(getattr(module, "use_dora", {}).values()):
        return False
    if any(getattr(module, "lora_bias", {}).values()):
        return False
    return not getattr(module, "lora_variant", {})


def fuse_lora(model: Any) -> int:
    """Route every plain LoRA linear layer through _LoraLinear; returns how many."""
    count = 0
    for module in model.modules():
        if _plain_lora(module):
            module.forward = types.MethodType(_lora_forward, module)
            count += 1
    return count


# loss ------------------------------------------------------------------------------
class _HeadLoss(torch.autograd.Function):
    """Summed cross-entropy of hidden (N, H) through a frozen head weight (V, H)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int
    ) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(hidden) if want_grad else None
        for start in range(0, hidden.shape[0], chunk):
            stop = start + chunk
            logits = (hidden[start:stop] @ weight.T).float()
            target = targets[start:stop]
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, target[:, None])[:, 0]).sum()
            if grad is not None:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                probs[torch.arange(probs.shape[0], device=probs.device), target] -= 1.0
                grad[start:stop] = probs.to(hidden.dtype) @ weight
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx: Any, upstream: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        # A 0-dim float32 factor: computed in float32, rounded once to grad's dtype.
        return grad * upstream, None, None, None


def head_loss_sum(
    hidden: torch.Tensor, weight: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """hidden (B, T, H); positions: flat indices into B*T (training.batching.
    loss_targets) whose next token is `targets`. The summed loss over them."""
    if positions.numel() == 0:
        return hidden.sum() * 0.0  # keeps the graph (DDP) with a zero loss
    chosen = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
    return _HeadLoss.apply(chosen, weight, targets, LOSS_CHUNK)  # type: ignore[no-any-return]


@contextlib.contextmanager
def hidden_out(model: Any) -> Iterator[torch.Tensor]:
    """Within the block the causal LM's `logits` are its final hidden states; yields
    the head's weight."""
    head = _causal_lm(model).get_output_embeddings()
    own = vars(head).get("forward")  # an instance-level forward (e.g. a hook) to restore
    head.forward = _identity
    try:
        yield head.weight
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _causal_lm(model: Any) -> Any:
    model = getattr(model, "module", model)  # DDP
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# attention -------------------------------------------------------------------------
def packed_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    lorabot_cu_seqlens: torch.Tensor | None = None,
    lorabot_max_seqlen: int = 0,
    lorabot_bounds: tuple[int, ...] = (),
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: q (B, H, T, D), k/v (B, Hkv, T, D) -> (B, T, H, D),
    each example of the flattened rows attending causally to itself only.

    transformers builds no mask for this implementation, so a call without the batch's
    boundaries (generation, another caller's padded batch) cannot be served right: it
    is refused rather than answered as one unpadded sequence. `use_plain_attention`
    switches the model back."""
    if not lorabot_bounds:
        raise RuntimeError(
            "the packed-attention training path got a call without example boundaries; "
            "call training.fast.use_plain_attention(model) before using the model otherwise"
        )
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    q = query.transpose(1, 2).reshape(batch * length, heads, dim)
    k = key.transpose(1, 2).reshape(batch * length, kv_heads, dim)
    v = value.transpose(1, 2).reshape(batch * length, kv_heads, dim)
    if lorabot_cu_seqlens is not None and flash_capable(q):
        cu, longest = lorabot_cu_seqlens, lorabot_max_seqlen
        out = varlen_causal(q, k, v, cu, cu, longest, longest, scaling)
    else:
        out = torch.cat(
            [
                F.scaled_dot_product_attention(
                    q[a:b].transpose(0, 1),
                    k[a:b].transpose(0, 1),
                    v[a:b].transpose(0, 1),
                    is_causal=True,
                    scale=scaling,
                    enable_gqa=heads != kv_heads,
                ).transpose(0, 1)
                for a, b in zip(lorabot_bounds[:-1], lorabot_bounds[1:], strict=True)
            ]
        )
    return out.view(batch, length, heads, dim), None


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, packed_attention)


def use_packed_attention(model: Any) -> None:
    """Switch the causal LM to packed_attention for training forwards (which pass the
    boundaries: training/step.py); use_plain_attention switches back."""
    _register_attention()
    lm = _causal_lm(model)
    if lm.config._attn_implementation != ATTENTION:
        lm.lorabot_attention_before = lm.config._attn_implementation
    lm.set_attn_implementation(ATTENTION)


def use_plain_attention(model: Any) -> None:
    """Back to the attention implementation the model had before (sdpa by default)."""
    lm = _causal_lm(model)
    lm.set_attn_implementation(getattr(lm, "lorabot_attention_before", None) or "sdpa")


# Architectures whose logits are lm_head(final hidden state) and whose attention is
# plain causal softmax attention (no sliding window, soft-capping, sinks or dropout):
# the only ones the head loss and packed attention compute exactly.
PLAIN_ARCHITECTURES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def _plain_architecture(config: Any) -> bool:
    if getattr(config, "model_type", None) not in PLAIN_ARCHITECTURES:
        return False
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True):
        return False
    scaled = [getattr(config, name, None) for name in _LOGIT_CHANGES]
    return not any(scaled) and not getattr(config, "attention_dropout", 0.0)


_LOGIT_CHANGES = (
    "final_logit_softcapping",
    "attn_logit_softcapping",
    "logit_scale",
    "logits_scaling",
)


# fused norm, RoPE and SwiGLU kernels ------------------------------------------------
def use_liger(model: Any) -> str | None:
    """Liger Kernel's Triton RMSNorm, RoPE and SiLU*up on a CUDA model of an architecture
    it knows (`pip install liger-kernel`); their loss kernels are not used (the loss
    above already keeps no logits). Returns the version used, None when not applied."""
    lm = _causal_lm(model)
    if next(lm.parameters()).device.type != "cuda":
        return None
    try:
        from importlib.metadata import version

        from liger_kernel.transformers import monkey_patch
    except ImportError:
        return None
    if getattr(lm.config, "model_type", None) not in monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN:
        return None
    # Liger patches the model's instance and also its transformers module (classes and
    # the RoPE function), which would reach every model made later in this process, on
    # the CPU too. The module gets its classes back; its RoPE function stays patched
    # (the instance calls it through the module) but only for tensors on a GPU.
    module = sys.modules[type(lm).__module__]
    before = dict(vars(module))
    monkey_patch._apply_liger_kernel_to_instance(
        model=lm,
        rope=True,
        rms_norm=True,
        swiglu=True,
        cross_entropy=False,
        fused_linear_cross_entropy=False,
    )
    for name, original in before.items():
        patched = vars(module).get(name)
        if patched is original:
            continue
        if isinstance(original, type):
            setattr(module, name, original)
        elif callable(original) and callable(patched):
            setattr(module, name, _on_gpu(patched, original))
    return str(version("liger-kernel"))


def _on_gpu(fast_version: Any, original: Any) -> Any:
    """`fast_version` for calls whose first tensor argument is on a GPU, else `original`."""
    if getattr(original, "lorabot_dispatch", False):
        return original

    @functools.wraps(original)
    def dispatch(*args: Any, **kwargs: Any) -> Any:
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        use = fast_version if first is not None and first.is_cuda else original
        return use(*args, **kwargs)

    dispatch.lorabot_dispatch = True  # type: ignore[attr-defined]
    return dispatch


# the whole set ---------------------------------------------------------------------
@dataclass(frozen=True)
class FastPaths:
    lora_layers: int  # LoRA layers on the fused path
    head_loss: bool  # chunked loss on trained positions
    packed_attention: bool
    liger: str | None = None  # Liger Kernel version, when its kernels are in

    def as_dict(self) -> dict[str, Any]:
        return {
            "lora_layers": self.lora_layers,
            "head_loss": self.head_loss,
            "packed_attention": self.packed_attention,
            "liger_kernel": self.liger,
        }


def enable(model: Any) -> FastPaths:
    """Turn on every fast path this model allows (call after get_peft_model)."""
    lora_layers = fuse_lora(model)
    lm = _causal_lm(model)
    plain = _plain_architecture(lm.config)
    head = lm.get_output_embeddings()
    head_loss = (
        plain
        and isinstance(head, torch.nn.Linear)
        and head.bias is None
        and not head.weight.requires_grad
    )
    packed = False
    if plain:
        try:
            use_packed_attention(model)
            packed = True
        except (ValueError, AttributeError, ImportError) as exc:
            log.warning("packed attention unavailable (%s): using transformers' masks", exc)
    paths = FastPaths(lora_layers, head_loss, packed, use_liger(model))
    model.lorabot_fast = paths
    log.info("fast paths: %s", paths.as_dict())
    return paths


def paths_of(model: Any) -> FastPaths | None:
    plain = getattr(model, "module", model)
    return getattr(plain, "lorabot_fast", None)
