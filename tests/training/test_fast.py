"""The fast paths (training/fast.py) compute what plain transformers/peft compute: the
same loss and the same adapter gradients, and the same loss curve over a run."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from training import fast
from training.batching import IGNORE, collate, loss_targets, pack_rows, single_rows
from training.model import BaseModel, add_lora
from training.step import forward_loss, token_loss_sum

from .test_packing import make_examples


def lora_model(tiny_model: Any, tokenizer: Any, *, dropout: float = 0.0, rank: int = 4) -> Any:
    base = BaseModel(
        copy.deepcopy(tiny_model), tokenizer, "tiny", "tiny", torch.device("cpu"), torch.float32
    )
    torch.manual_seed(7)
    model = add_lora(
        base,
        rank=rank,
        alpha=2 * rank,
        dropout=dropout,
        target_modules=("all-linear",),
        gradient_checkpointing=False,
    )
    # A fresh adapter's B is zero, which would hide mistakes in A's gradient.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.02)
    return model


def adapter_grads(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def loss_and_grads(model: Any, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = forward_loss(model, batch)
    loss.backward()
    return loss.detach(), adapter_grads(model)


@pytest.mark.parametrize("packed", [True, False])
def test_fast_loss_and_gradients_equal_plain(tiny_model: Any, tokenizer: Any, packed: bool) -> None:
    examples = make_examples(tokenizer, 7)
    rows = pack_rows(examples, 160) if packed else single_rows(examples)[:4]
    batch = collate(rows, examples, pad_id=0)
    assert len(batch.bounds) > len(rows) + 1 or not packed  # several examples per row
    plain = lora_model(tiny_model, tokenizer)
    quick = lora_model(tiny_model, tokenizer)
    paths = fast.enable(quick)
    assert paths.lora_layers == 2 * 7  # q k v o gate up down, two layers
    assert paths.head_loss and paths.packed_attention
    plain_loss, plain_grads = loss_and_grads(plain, batch)
    quick_loss, quick_grads = loss_and_grads(quick, batch)
    assert batch.targets > 10
    torch.testing.assert_close(quick_loss, plain_loss, rtol=1e-5, atol=1e-4)
    assert plain_grads.keys() == quick_grads.keys()
    for name, grad in plain_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(quick_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


WEIGHT = torch.randn(8, 32, generator=torch.Generator().manual_seed(9))


def lora_linear(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float, p: float) -> Any:
    return fast._LoraLinear.apply(x, WEIGHT.to(x.dtype), a, b, s, p)


def lora_delta_plus_base(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float, p: float
) -> Any:
    return x @ WEIGHT.to(x.dtype).T + fast._LoraLinear.apply(x, None, a, b, s, p)


@pytest.mark.parametrize("function", [lora_linear, lora_delta_plus_base])
def test_lora_gradients_by_finite_differences(function: Any) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, 32, dtype=torch.float64, requires_grad=True)
    a = torch.randn(3, 32, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a, b: function(x, a, b, 0.5, 0.0), (x, a, b))


@pytest.mark.parametrize("function", [lora_linear, lora_delta_plus_base])
def test_lora_dropout_drops_the_same_inputs_in_forward_and_backward(function: Any) -> None:
    torch.manual_seed(1)
    x = torch.randn(64, 32, requires_grad=True)
    a = torch.randn(4, 32, requires_grad=True)
    b = torch.randn(8, 4, requires_grad=True)
    torch.manual_seed(5)
    out = function(x, a, b, 2.0, 0.25)
    out.sum().backward()
    torch.manual_seed(5)  # the same draw of the mask, by hand
    keep = torch.empty_like(x, dtype=torch.bool).bernoulli_(0.75)
    x2, a2, b2 = (t.detach().clone().requires_grad_() for t in (x, a, b))
    ref = x2 @ WEIGHT.T + (x2 * keep / 0.75) @ a2.T @ b2.T * 2.0
    ref.sum().backward()
    assert 0.6 < keep.float().mean() < 0.9
    torch.testing.assert_close(out, ref)
    for mine, theirs in ((x, x2), (a, a2), (b, b2)):
        torch.testing.assert_close(mine.grad, theirs.grad)


def test_head_loss_in_chunks_equals_full_cross_entropy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fast, "LOSS_CHUNK", 5)  # several chunks and a partial last one
    torch.manual_seed(2)
    hidden = torch.randn(3, 9, 16, requires_grad=True)
    weight = torch.randn(50, 16)
    labels = torch.randint(0, 50, (3, 9))
    labels[0, :4] = IGNORE  # an untrained prompt
    labels[2, 7:] = IGNORE
    loss = fast.head_loss_sum(hidden, weight, *loss_targets(labels))
    loss.backward()
    hidden2 = hidden.detach().clone().requires_grad_()
    ref = token_loss_sum(hidden2 @ weight.T, labels)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(hidden.grad, hidden2.grad)


def test_nothing_trained_gives_zero_loss_with_a_graph() -> None:
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    labels = torch.full((1, 4), IGNORE)
    loss = fast.head_loss_sum(hidden, torch.randn(10, 8), *loss_targets(labels))
    loss.backward()
    assert float(loss.detach()) == 0.0 and hidden.grad is not None


def test_disabled_adapter_and_generation_use_the_plain_paths(
    tiny_model: Any, tokenizer: Any
) -> None:
    """The report's before/after samples: with the adapter disabled the fast LoRA path
    steps aside, and after use_plain_attention generation matches a model without fast paths."""
    plain = lora_model(tiny_model, tokenizer)
    quick = lora_model(tiny_model, tokenizer)
    fast.enable(quick)
    fast.use_plain_attention(quick)
    prompt = torch.tensor([[1, 5, 9, 22, 7]])
    with torch.no_grad():
        for disabled in (True, False):
            if disabled:
                with plain.disable_adapter(), quick.disable_adapter():
                    pair = [
                        m.generate(input_ids=prompt, max_new_tokens=6, do_sample=False)
                        for m in (plain, quick)
                    ]
            else:
                pair = [
                    m.generate(input_ids=prompt, max_new_tokens=6, do_sample=False)
                    for m in (plain, quick)
                ]
            assert pair[0].tolist() == pair[1].tolist()


def test_loss_curve_is_the_same_with_and_without_fast_paths(
    run_cli: Any, tiny_dir: Path, small_chat: Path, tmp_path: Path
) -> None:
    curves = {}
    for flag in ("--fast-paths", "--no-fast-paths"):
        out = tmp_path / flag
        code, _, err = run_cli(
            "train", str(small_chat), "--base", str(tiny_dir), "--out", str(out),
            "--max-steps", "6", "--batch-size", "2", "--grad-accum", "2", "--lr", "3e-3",
            "--dropout", "0", "--packing", "--samples", "0", "--eval-every", "3", flag,
        )  # fmt: skip
        assert code == 0, err
        meta = json.loads((out / "training.json").read_text())
        curves[flag] = [h["loss"] for h in meta["history"] if "loss" in h]
        assert (meta["fast_paths"] is not None) == (flag == "--fast-paths")
    assert len(curves["--fast-paths"]) == 6
    assert curves["--fast-paths"][-1] < curves["--fast-paths"][0]
    for quick, plain in zip(curves["--fast-paths"], curves["--no-fast-paths"], strict=True):
        assert quick == pytest.approx(plain, rel=1e-4)


def test_architectures_the_fast_paths_cannot_compute_exactly_keep_transformers_paths(
    tokenizer: Any,
) -> None:
    """A sliding window (Mistral v0.1) is not what packed attention computes: such a
    model keeps transformers' attention and loss, and trains exactly as plain peft."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        sliding_window=8, tie_word_embeddings=True,
    )  # fmt: skip
    mistral = MistralForCausalLM(config).eval()
    examples = make_examples(tokenizer, 5)
    batch = collate(pack_rows(examples, 120), examples, pad_id=0)
    plain = lora_model(mistral, tokenizer)
    quick = lora_model(mistral, tokenizer)
    paths = fast.enable(quick)
    assert paths.lora_layers > 0 and not paths.head_loss and not paths.packed_attention
    plain_loss, plain_grads = loss_and_grads(plain, batch)
    quick_loss, quick_grads = loss_and_grads(quick, batch)
    torch.testing.assert_close(quick_loss, plain_loss, rtol=1e-5, atol=1e-4)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(quick_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    capped = copy.deepcopy(config)
    capped.sliding_window = None
    assert fast._plain_architecture(capped)
    capped.final_logit_softcapping = 30.0
    assert not fast._plain_architecture(capped)


def test_packed_attention_refuses_calls_without_boundaries(tiny_model: Any, tokenizer: Any) -> None:
    """Generation through a model left on the training attention would silently ignore
    padding: it is refused, and works after use_plain_attention."""
    quick = lora_model(tiny_model, tokenizer)
    fast.enable(quick)
    prompt = torch.tensor([[1, 5, 9, 22, 7]])
    with torch.no_grad(), pytest.raises(RuntimeError, match="use_plain_attention"):
        quick.generate(input_ids=prompt, max_new_tokens=2, do_sample=False)
    fast.use_plain_attention(quick)
    with torch.no_grad():
        out = quick.generate(input_ids=prompt, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == 7
