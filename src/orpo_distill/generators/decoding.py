"""Incremental decoding for the ``hf`` generator: each prompt prefilled once for all of its samples, and
a row dropped from the batch as soon as it ends.

Why: ``model.generate`` keeps every row of a batch in every decoding step until the last row ends (a
row that stopped at token 40 of 160 costs 120 more forward steps of padding), and it prefills a prompt
once per sample (``num_return_sequences`` or a repeated prompt). Here the batch's distinct prompts are
prefilled once, the KV cache is repeated for their samples (``DynamicCache.batch_select_indices``), and
after each step the rows that produced an end-of-sequence token leave the cache, so each step computes
only the rows still writing.

Contract: the tokens are the ones ``model.generate(do_sample=False)`` gives with
:class:`~orpo_distill.generators.row_sampling.RowSeededSampler` as its logits processor (or greedy
argmax at temperature 0): the same left padding, the same position ids (``cumsum(mask) - 1``), the
same per-row draw ``row_uniform(seed, step)`` at decoding step ``step``. In fp32 they are identical to
the bit (``tests/test_decoding.py``), as the samples of one row are at any batch size; under bf16
autocast the caveat of ``row_sampling.py`` holds here too.

:func:`unsupported_reason` says when a model needs ``generate`` instead (its own cache type, or a
generation config asking for logits processors this loop does not apply, such as a repetition penalty).
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch
from transformers import DynamicCache

from .row_sampling import row_uniform, sample_rows

# generation-config fields that make ``generate`` add a logits processor of its own, with the value
# that adds none; this loop applies none of them, so a model that sets one is decoded by ``generate``
_PROCESSOR_FIELDS: dict[str, Any] = {
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "min_length": 0, "min_new_tokens": None,
    "sequence_bias": None, "exponential_decay_length_penalty": None,
}


# layer types whose DynamicCache layer is a per-token KV cache (rows can be selected and repeated)
_KV_LAYER_TYPES = {"full_attention", "sliding_attention", "chunked_attention"}


def unsupported_reason(model: Any) -> str | None:
    """Why :func:`decode` cannot stand in for ``model.generate`` on ``model``, or ``None`` when it can."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return "not a decoder-only model"
    supports = getattr(type(model), "_supports_default_dynamic_cache", None)
    if supports is None or not supports():
        return f"{type(model).__name__} keeps its own cache type"
    text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    other = sorted(set(getattr(text_config, "layer_types", None) or []) - _KV_LAYER_TYPES)
    if other:  # recurrent states (linear attention, conv): not known to drop rows like a KV cache
        return f"its layers keep {', '.join(map(str, other))} states"
    params = inspect.signature(model.forward).parameters
    missing = [p for p in ("position_ids", "attention_mask") if p not in params]
    if cache_argument(model) is None:
        missing.insert(0, "cache")
    if missing:
        return f"its forward takes no {', '.join(missing)}"
    gc = getattr(model, "generation_config", None)
    for field, neutral in _PROCESSOR_FIELDS.items():
        value = getattr(gc, field, neutral) if gc is not None else neutral
        if value not in (neutral, None) and not (field == "min_length" and value == 0):
            return f"its generation config sets {field}={value!r}"
    return None


def cache_argument(model: Any) -> str | None:
    """The name under which ``model.forward`` takes its KV cache: ``cache`` (transformers 5.x, where
    ``past_key_values`` is deprecated) or ``past_key_values`` (older and remote-code models)."""
    params = inspect.signature(model.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of ``prompts`` left-padded to the longest (every prompt ends at the
    last column, so each row's next token is read from the same place)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[r, width - len(p):] = 1
    return ids, mask


def choose(logits: torch.Tensor, seeds: Sequence[int], step: int, temperature: float, top_p: float) -> torch.Tensor:
    """The next token of each row: greedy at temperature 0, else row ``r``'s inverse-CDF draw at
    ``row_uniform(seeds[r], step)`` (what :class:`RowSeededSampler` picks inside ``generate``)."""
    if temperature <= 0:
        return logits.float().argmax(dim=-1)
    u = torch.tensor([row_uniform(s, step) for s in seeds], dtype=torch.float64)
    return sample_rows(logits, u, temperature, top_p).to(logits.device)


@torch.no_grad()
def decode(
    model: Any,
    prompts: Sequence[Sequence[int]],
    seeds: Sequence[Sequence[int]],
    *,
    pad_id: int,
    eos_ids: Sequence[int],
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
) -> list[list[list[int]]]:
    """Generate ``len(seeds[p])`` samples of each prompt ``p``; ``seeds[p][k]`` is sample ``k``'s row seed.

    Returns, per prompt and sample, the new token ids, ending with the end-of-sequence token where the
    row stopped (at most ``max_new_tokens`` of them). The model is used as it is (call ``eval()`` first).
    """
    if len(prompts) != len(seeds) or not prompts:
        raise ValueError("decode needs one list of seeds per prompt, and at least one prompt")
    device = next(model.parameters()).device
    ids, mask = left_padded(prompts, pad_id)
    positions = (mask.cumsum(-1) - 1).clamp_(min=0)
    owner = torch.tensor([p for p, row_seeds in enumerate(seeds) for _ in row_seeds], dtype=torch.long)
    row_seeds = [s for per_prompt in seeds for s in per_prompt]
    out: list[list[int]] = [[] for _ in row_seeds]
    if not row_seeds or max_new_tokens <= 0:
        return [[[] for _ in per_prompt] for per_prompt in seeds]
    cache = DynamicCache(config=model.config)
    with_cache = {cache_argument(model) or "past_key_values": cache, "use_cache": True}
    # the prefill needs the logits of the last position only, not [rows, width, vocab]
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                   **with_cache, **keep).logits[:, -1, :]
    # one copy of each prompt's cache per sample
    if not torch.equal(owner, torch.arange(len(prompts))):
        cache.batch_select_indices(owner.to(device))
        logits = logits[owner.to(device)]
    mask = mask[owner].to(device)
    last = positions[owner, -1].to(device)
    active = list(range(len(row_seeds)))  # the row of ``out`` each batch row writes
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)
    for step in range(max_new_tokens):
        nxt = choose(logits, [row_seeds[r] for r in active], step, temperature, top_p)
        for r, t in zip(active, nxt.tolist()):
            out[r].append(t)
        done = torch.isin(nxt, eos)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        if bool(done.any()):  # the rows that ended leave the batch and the cache
            keep = (~done).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            mask, last, nxt = mask[keep], last[keep], nxt[keep]
            active = [active[i] for i in keep.tolist()]
        mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
        last = last + 1
        logits = model(input_ids=nxt.unsqueeze(1), attention_mask=mask, position_ids=last.unsqueeze(1),
                       **with_cache).logits[:, -1, :]
    rows = iter(out)
    return [[next(rows) for _ in per_prompt] for per_prompt in seeds]
