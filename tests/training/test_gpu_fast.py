"""The training fast paths on CUDA: variable-length flash attention and bf16 LoRA against
the plain transformers/peft path. Skipped without CUDA (run on the GPU machine)."""

from __future__ import annotations

import copy
import os
from typing import Any

import pytest
import torch

from engine.attention import flash_capable
from training import fast
from training.batching import collate, pack_rows
from training.model import BaseModel, add_lora
from training.step import forward_loss

from .test_packing import make_examples

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="session")
def tokenizer(request: pytest.FixtureRequest) -> Any:
    """The GPU machine has no embedded model: LORABOT_TEST_TOKENIZER names a copy of its
    tokenizer (as for tests/engine/test_gpu.py)."""
    from transformers import AutoTokenizer

    folder = os.environ.get("LORABOT_TEST_TOKENIZER")
    return AutoTokenizer.from_pretrained(folder or request.getfixturevalue("embedded_dir"))


@pytest.mark.parametrize(("heads", "kv_heads"), [(8, 8), (8, 2)])
def test_varlen_attention_matches_per_example_sdpa(heads: int, kv_heads: int) -> None:
    torch.manual_seed(heads + kv_heads)
    bounds = (0, 100, 101, 357, 512, 700, 1024)  # two rows of 512, five examples
    q = torch.randn(2, heads, 512, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, kv_heads, 512, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    cu = torch.tensor(bounds, dtype=torch.int32, device="cuda")
    assert flash_capable(q), "torch.nn.attention.varlen is missing"
    out, _ = fast.packed_attention(
        None, q, k, v, None, scaling=0.125, lorabot_cu_seqlens=cu,
        lorabot_max_seqlen=324, lorabot_bounds=bounds,
    )  # fmt: skip
    ref, _ = fast.packed_attention(
        None, q.float(), k.float(), v.float(), None, scaling=0.125,
        lorabot_cu_seqlens=None, lorabot_bounds=bounds,
    )  # fmt: skip
    error = (out.float() - ref).norm() / ref.norm()
    assert torch.isfinite(out).all() and error < 1e-2


def test_bf16_fast_paths_match_plain_loss_and_gradients(tiny_model: Any, tokenizer: Any) -> None:
    examples = make_examples(tokenizer, 9)
    batch = collate(pack_rows(examples, 200), examples, pad_id=0).to(torch.device("cuda"))
    results = []
    for use_fast in (False, True):
        model = copy.deepcopy(tiny_model).to("cuda", torch.bfloat16)
        base = BaseModel(model, tokenizer, "tiny", "tiny", torch.device("cuda"), torch.bfloat16)
        torch.manual_seed(3)
        peft_model = add_lora(
            base, rank=8, alpha=16, dropout=0.0, target_modules=("all-linear",),
            gradient_checkpointing=False,
        )  # fmt: skip
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.02)
        if use_fast:
            assert fast.enable(peft_model).packed_attention
        loss = forward_loss(peft_model, batch)
        loss.backward()
        grads = torch.cat(
            [p.grad.flatten() for p in peft_model.parameters() if p.requires_grad]
        ).float()
        results.append((float(loss.detach()), grads))
    (plain_loss, plain_grads), (fast_loss, fast_grads) = results
    assert fast_loss == pytest.approx(plain_loss, rel=1e-2)
    cosine = torch.nn.functional.cosine_similarity(plain_grads, fast_grads, dim=0)
    assert cosine > 0.99


def test_liger_leaves_other_models_and_the_cpu_alone(tiny_model: Any, tokenizer: Any) -> None:
    """Liger Kernel patches transformers' modeling module too; after enable() a model
    made later, on the CPU, still runs transformers' own code and gives its logits."""
    pytest.importorskip("liger_kernel")
    from transformers import LlamaForCausalLM
    from transformers.models.llama import modeling_llama

    norm_class, mlp_class = modeling_llama.LlamaRMSNorm, modeling_llama.LlamaMLP
    ids = torch.tensor([[1, 5, 9, 22, 7, 3]])
    with torch.no_grad():
        before = tiny_model(input_ids=ids).logits
    model = copy.deepcopy(tiny_model).to("cuda", torch.bfloat16)
    base = BaseModel(model, tokenizer, "tiny", "tiny", torch.device("cuda"), torch.bfloat16)
    peft_model = add_lora(
        base, rank=4, alpha=8, dropout=0.0, target_modules=("all-linear",),
        gradient_checkpointing=False,
    )  # fmt: skip
    assert fast.enable(peft_model).liger is not None
    assert modeling_llama.LlamaRMSNorm is norm_class and modeling_llama.LlamaMLP is mlp_class
    later = LlamaForCausalLM(tiny_model.config).eval()
    later.load_state_dict(tiny_model.state_dict())
    assert type(later.model.norm) is norm_class
    with torch.no_grad():
        after = later(input_ids=ids).logits
    torch.testing.assert_close(after, before)
