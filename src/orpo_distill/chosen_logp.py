"""How likely the student finds correct reasoning it was not trained on: the mean over held-out teacher
positives of ``l(y)``, the mean token log-probability the ORPO loss uses (``losses.py``).

Tracked per epoch on the dev split beside the accuracy, so a reader can see whether an arm's chosen side
falls behind SFT's while its accuracy holds: the "likelihood displacement" that preference terms are
reported to cause (Razin et al., arXiv 2410.08847). Read-only: no gradient, the model's mode restored.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .batching import batch_to, collate_sft, tokenize_pair
from .forward import sft_logps
from .models import render_prompt


def mean_response_logp(model: Any, tokenizer: Any, items: Sequence[tuple[list[dict[str, str]], str]],
                       max_length: int, batch_size: int = 16, bf16: bool = True) -> float:
    """Mean over ``items`` (chat messages, response) of the response's mean token log-probability under
    ``model`` (eos included, as training scores it); NaN without items."""
    if not items:
        return float("nan")
    values = response_logps(model, tokenizer, items, max_length, batch_size, bf16)
    return sum(values) / len(values)


def response_logps(model: Any, tokenizer: Any, items: Sequence[tuple[list[dict[str, str]], str]],
                   max_length: int, batch_size: int = 16, bf16: bool = True) -> list[float]:
    """Each item's (chat messages, response) mean token log-probability ``l(y)`` under ``model``, in the
    order given (eos included, as training scores it). Batches sorted by length."""
    if not items:
        return []
    pairs = [tokenize_pair(tokenizer, render_prompt(tokenizer, msgs), text, None, max_length) for msgs, text in items]
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i].prompt_ids) + len(pairs[i].chosen_ids))
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    means: list[torch.Tensor] = []
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            for start in range(0, len(order), batch_size):
                chunk = [pairs[i] for i in order[start:start + batch_size]]
                batch = batch_to(collate_sft([(p.prompt_ids, p.chosen_ids) for p in chunk], pad), device)
                total, count = sft_logps(model, batch)
                means.append((total.float() / count.clamp(min=1)).cpu())
    finally:
        model.train(was_training)
    values = torch.cat(means).tolist()
    out = [0.0] * len(values)
    for rank, i in enumerate(order):
        out[i] = values[rank]
    return out
