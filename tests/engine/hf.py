"""HF `generate`'s greedy tokens: the reference the engine's greedy answers match."""

from __future__ import annotations

from typing import Any

import torch


def hf_greedy(model: Any, prompt: list[int], new: int) -> list[int]:
    """Exactly `new` greedy tokens after `prompt` (EOS does not stop them)."""
    ids = torch.tensor([prompt], device=next(model.parameters()).device)
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
            do_sample=False, pad_token_id=0,
        )  # fmt: skip
    return out[0, len(prompt) :].tolist()  # type: ignore[no-any-return]
