"""From (prompt, chosen, rejected) text to tensors, and from tensors to the per-pair sums the losses take.

Two layouts give the same numbers (tested to 1e-5 in fp32):

* **plain** (:func:`collate_plain`, :func:`pair_logps`): rows ``[chosen_0..chosen_{B-1},
  rejected_0..rejected_{B-1}]``, each ``prompt + response``, right-padded; what TRL does.
* **packed** (:func:`collate_packed`, :func:`pair_logps_packed`): one row per
  prompt holding the prompt once, then each distinct response of its pairs, with a 4-D attention mask
  that lets every response see the prompt and its own past only, and position ids that restart at
  the prompt's length for every response. A prompt with K pairs costs ``P + sum(responses)`` tokens
  instead of ``2K * P + sum(responses)``, and a chosen response shared by several pairs (positives
  are cycled) is computed once.

Token conventions: labels are aligned with inputs and shifted inside (see ``logprobs``); a response
always ends with the tokenizer's eos unless truncation cut it; the first prompt token is never a
target (nothing predicts it).

The forward pass that turns these batches into per-pair sums is ``forward.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from .errors import UserError
from .logprobs import IGNORE_INDEX

# ---------------------------------------------------------------------------------------------
# tokenizing


@dataclass
class TokenizedPair:
    """One preference pair as token ids; the responses include their eos (unless truncated). An empty
    ``rejected_ids`` marks an NLL-only row (``pairs.no_negative: nll``): its chosen side trains on the NLL
    term alone. ``rejected_start``: the first rejected token the odds-ratio term reads (``pairs.rejected_span:
    first_error``; 0: all of them); the tokens before it are context only. ``chosen_ref``: the chosen side's
    mean log-probability under the model the odds-ratio term started from (``train.protect_chosen``)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    rejected_start: int = 0
    chosen_ref: float | None = None

    @property
    def has_rejected(self) -> bool:
        return bool(self.rejected_ids)


def _encode(tokenizer: Any, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [int(i) for i in ids]


def _with_eos(ids: list[int], eos_id: int) -> list[int]:
    return ids if ids and ids[-1] == eos_id else ids + [eos_id]


def truncate_pair(pair: TokenizedPair, max_length: int) -> TokenizedPair:
    """Make ``prompt + response <= max_length`` for both responses.

    The prompt loses tokens from the left first (its end, the question and the instruction right
    before the answer, matters most), but only as far as needed and never below
    ``min(len(prompt), max_length // 2)`` tokens; then each response loses tokens from the right (a
    cut response loses its eos, which is right: it did not end there).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    prompt, chosen, rejected = pair.prompt_ids, pair.chosen_ids, pair.rejected_ids
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest > max_length:
        keep = max(max_length - longest, min(len(prompt), max_length // 2))
        prompt = prompt[len(prompt) - keep :] if keep < len(prompt) else prompt
        budget = max_length - len(prompt)
        chosen, rejected = chosen[:budget], rejected[:budget]
    # a cut that removed the located error leaves its last token to the term (a response has one at least)
    start = min(pair.rejected_start, max(len(rejected) - 1, 0))
    return TokenizedPair(list(prompt), list(chosen), list(rejected), start, pair.chosen_ref)


def token_at(tokenizer: Any, text: str, char_offset: int) -> int:
    """The index of the token of ``text`` (tokenized alone, as responses are) that holds character
    ``char_offset``: the first token ending after it. A tokenizer without offsets (a slow one) counts the
    tokens of the text before the offset instead."""
    if char_offset <= 0:
        return 0
    try:
        spans = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, TypeError, KeyError):
        return len(_encode(tokenizer, text[:char_offset]))
    return next((i for i, (_, end) in enumerate(spans) if end > char_offset), len(spans))


def tokenize_pair(
    tokenizer: Any, prompt_text: str, chosen_text: str, rejected_text: str | None, max_length: int,
    rejected_from: int | None = None, chosen_ref: float | None = None,
) -> TokenizedPair:
    """Tokenize one pair: prompt and responses separately, eos appended to each response, truncated.

    ``prompt_text`` is already rendered (chat template applied by the caller, including any BOS the
    template writes), so no special tokens are added here. The responses are tokenized on their own,
    not as ``prompt + response``: this matches how they were generated (tokens sampled after the
    prompt's tokens) and keeps the prompt/response boundary exact. A response that already ends with
    the eos token does not get a second one. ``rejected_text`` None: an NLL-only row (no rejected ids).
    ``rejected_from``: the character of ``rejected_text`` its odds-ratio term starts at (``token_at``);
    ``chosen_ref`` is carried as it is (:class:`TokenizedPair`).
    """
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if eos_id is None:
        raise UserError(
            "the student tokenizer defines no eos token; responses need one to learn to stop "
            "(set tokenizer.eos_token on the model's tokenizer)"
        )
    prompt_ids = _encode(tokenizer, prompt_text)
    if not prompt_ids:
        raise UserError(f"a prompt renders to no tokens (prompt text {prompt_text[:60]!r}); check the task's prompt")
    pair = TokenizedPair(
        prompt_ids=prompt_ids,
        chosen_ids=_with_eos(_encode(tokenizer, chosen_text), int(eos_id)),
        rejected_ids=[] if rejected_text is None else _with_eos(_encode(tokenizer, rejected_text), int(eos_id)),
        rejected_start=token_at(tokenizer, rejected_text, rejected_from) if rejected_text and rejected_from else 0,
        chosen_ref=chosen_ref,
    )
    return truncate_pair(pair, max_length)


def padded_width(width: int, multiple: int = 1) -> int:
    """``width`` rounded up to a multiple of ``multiple`` (``train.pad_multiple``): fewer distinct batch shapes,
    so oneDNN's primitive cache holds fewer of them (docs/benchmarks.md). Padding is masked: the sums are the
    same (in fp32 to 1e-5, tested; in bf16 up to the kernels' shape-dependent rounding)."""
    return -(-width // multiple) * multiple if multiple > 1 else width


def _refs(values: Sequence[float | None]) -> Tensor:
    """Each pair's ``chosen_ref`` as a float32 ``[B]`` tensor, NaN where a pair has none."""
    return torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# plain layout


def _check_pair(i: int, prompt: Sequence[int], chosen: Sequence[int]) -> None:
    """An empty rejected response is an NLL-only row; an empty prompt or chosen response is a bug."""
    if not prompt:
        raise ValueError(f"pair {i}: empty prompt (the first response token would have no predictor)")
    if not chosen:
        raise ValueError(f"pair {i}: empty chosen response")


def collate_plain(pairs: Sequence[TokenizedPair], pad_id: int, nll_on_prompt: bool, pad_multiple: int = 1) -> dict[str, Any]:
    """Stack ``B`` pairs into ``2B`` right-padded rows: chosen rows first, then rejected rows.

    Returns ``input_ids``, ``attention_mask`` (``[2B, T]``, 1 on real tokens), ``labels`` (the token
    where any loss term reads it, ``-100`` elsewhere), ``response_mask`` (bool, response tokens of
    every row: the OR term's tokens, a rejected row's from its ``rejected_start``), ``nll_mask`` (bool, the chosen rows' response tokens, plus their
    prompt tokens but the first when ``nll_on_prompt``; all False on rejected rows), ``has_rejected``
    (bool ``[B]``; an NLL-only row's rejected row is its prompt alone, with no response tokens),
    ``num_pairs`` and ``nll_on_prompt``.
    """
    if not pairs:
        raise ValueError("collate_plain needs at least one pair")
    for i, p in enumerate(pairs):
        _check_pair(i, p.prompt_ids, p.chosen_ids)
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    starts = [0] * len(pairs) + [p.rejected_start for p in pairs]  # the OR term's first token of each response
    n, b = len(rows), len(pairs)
    width = padded_width(max(len(pr) + len(r) for pr, r in rows), pad_multiple)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    response_mask = torch.zeros((n, width), dtype=torch.bool)
    nll_mask = torch.zeros((n, width), dtype=torch.bool)
    for i, (prompt, resp) in enumerate(rows):
        p, r = len(prompt), len(resp)
        input_ids[i, : p + r] = torch.tensor(list(prompt) + list(resp), dtype=torch.long)
        attention_mask[i, : p + r] = 1
        response_mask[i, p + starts[i] : p + r] = True
        if i < b:
            nll_mask[i, p : p + r] = True
            if nll_on_prompt:
                nll_mask[i, 1:p] = True
    labels = torch.where(response_mask | nll_mask, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "response_mask": response_mask,
        "nll_mask": nll_mask,
        "has_rejected": torch.tensor([p.has_rejected for p in pairs], dtype=torch.bool),
        "chosen_ref": _refs([p.chosen_ref for p in pairs]),
        "num_pairs": b,
        "nll_on_prompt": bool(nll_on_prompt),
    }


def collate_sft(examples: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int,
                pad_multiple: int = 1) -> dict[str, Any]:
    """Right-padded rows of ``prompt + response`` for SFT; only response tokens are labelled.

    Returns ``input_ids``, ``attention_mask``, ``labels`` (``-100`` on prompt and padding) and
    ``response_mask`` (bool), each ``[B, T]``.
    """
    if not examples:
        raise ValueError("collate_sft needs at least one example")
    for i, (prompt, resp) in enumerate(examples):
        if not prompt or not resp:
            raise ValueError(f"example {i}: empty prompt or response")
    width = padded_width(max(len(p) + len(r) for p, r in examples), pad_multiple)
    n = len(examples)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    response_mask = torch.zeros((n, width), dtype=torch.bool)
    for i, (prompt, resp) in enumerate(examples):
        p, r = len(prompt), len(resp)
        input_ids[i, : p + r] = torch.tensor(list(prompt) + list(resp), dtype=torch.long)
        attention_mask[i, : p + r] = 1
        response_mask[i, p : p + r] = True
    labels = torch.where(response_mask, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "response_mask": response_mask}


def batch_to(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """Move every tensor of a collated batch to ``device``; other values are kept as they are."""
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------
# packed (prefix-shared) layout


@dataclass
class PairGroup:
    """One prompt with its K (chosen, rejected) pairs: one packed row. An empty rejected marks an NLL-only
    row (see :class:`TokenizedPair`)."""

    prompt_ids: list[int]
    pairs: list[tuple[list[int], list[int]]] = field(default_factory=list)
    rejected_start: dict[tuple[int, ...], int] = field(default_factory=dict)  # a rejected response's, when not 0
    chosen_ref: dict[tuple[int, ...], float] = field(default_factory=dict)  # a chosen response's, when known

    def responses(self) -> list[list[int]]:
        """The distinct responses in order of first appearance (chosen before rejected per pair)."""
        seen: dict[tuple[int, ...], None] = {}
        for chosen, rejected in self.pairs:
            seen.setdefault(tuple(chosen), None)
            if rejected:
                seen.setdefault(tuple(rejected), None)
        return [list(r) for r in seen]

    def packed_length(self) -> int:
        """Tokens of the packed row: the prompt once plus each distinct response once."""
        return len(self.prompt_ids) + sum(len(r) for r in self.responses())


def group_pairs(pairs: Sequence[TokenizedPair], max_pairs: int | None = None) -> list[PairGroup]:
    """Group pairs with identical prompt ids, in order of first appearance, at most ``max_pairs`` per group.

    Pairs come out in group order, which differs from the input order when prompts interleave; the
    loss is a mean over pairs, so order does not matter to it.
    """
    if max_pairs is not None and max_pairs < 1:
        raise ValueError(f"max_pairs must be at least 1, got {max_pairs}")
    groups: list[PairGroup] = []
    open_group: dict[tuple[int, ...], PairGroup] = {}
    for p in pairs:
        key = tuple(p.prompt_ids)
        g = open_group.get(key)
        if g is None or (max_pairs is not None and len(g.pairs) >= max_pairs):
            g = PairGroup(prompt_ids=list(p.prompt_ids))
            groups.append(g)
            open_group[key] = g
        g.pairs.append((list(p.chosen_ids), list(p.rejected_ids)))
        if p.rejected_start:
            g.rejected_start[tuple(p.rejected_ids)] = p.rejected_start
        if p.chosen_ref is not None:
            g.chosen_ref[tuple(p.chosen_ids)] = p.chosen_ref
    return groups


def collate_packed(groups: Sequence[PairGroup], pad_id: int, nll_on_prompt: bool,
                   pad_multiple: int = 1) -> dict[str, Any]:
    """Pack each group into one row: ``prompt | response_1 | response_2 | ...`` then padding.

    Returns
      ``input_ids``, ``position_ids`` ``[G, T]`` (responses restart at the prompt's length);
      ``attention_mask`` ``[G, 1, T, T]`` bool, True where query position ``q`` may attend key ``k``:
      prompt tokens causally within the prompt, response tokens the whole prompt and their own
      response causally, padding only itself (so no softmax row is empty);
      the targets, flat over ``G * T`` positions: ``target_ids [N]``, ``source_index [N]`` (the flat
      position of the hidden state predicting each target: the previous token, or the prompt's last
      token for a response's first token), ``target_segment [N]``;
      segments (every prompt and every distinct response, numbered over the batch):
      ``segment_tokens [S]``; per pair (group order, then pair order) ``pair_chosen``,
      ``pair_rejected``, ``pair_prompt`` segment ids ``[B]``, ``has_rejected`` bool ``[B]`` (an NLL-only
      row's ``pair_rejected`` is its chosen segment, ignored by the loss); ``num_pairs``, ``nll_on_prompt``;
      ``row_spans``: per row, (prompt length, the responses' lengths in order), what
      ``segmented_attention`` computes the same attention from without the ``[T, T]`` mask.
    Prompt tokens are targets only when ``nll_on_prompt`` (the OR term never reads them).
    """
    if not groups:
        raise ValueError("collate_packed needs at least one group")
    width = padded_width(max(g.packed_length() for g in groups), pad_multiple)
    n_rows = len(groups)
    input_ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((n_rows, width), dtype=torch.long)
    local_segment = torch.full((n_rows, width), -1, dtype=torch.long)  # 0 prompt, j+1 response j, -1 pad
    target_ids: list[int] = []
    source_index: list[int] = []
    target_segment: list[int] = []
    segment_tokens: list[int] = []
    pair_chosen: list[int] = []
    pair_rejected: list[int] = []
    pair_prompt: list[int] = []
    has_rejected: list[bool] = []
    chosen_ref: list[float | None] = []
    row_spans: list[tuple[int, tuple[int, ...]]] = []  # per row: the prompt's length, each response's

    for g_idx, group in enumerate(groups):
        if not group.pairs:
            raise ValueError(f"group {g_idx} has no pairs")
        prompt = group.prompt_ids
        for k, (chosen, _) in enumerate(group.pairs):
            _check_pair(k, prompt, chosen)
        p = len(prompt)
        base = g_idx * width
        input_ids[g_idx, :p] = torch.tensor(prompt, dtype=torch.long)
        position_ids[g_idx, :p] = torch.arange(p)
        local_segment[g_idx, :p] = 0
        prompt_seg = len(segment_tokens)
        segment_tokens.append(p - 1)  # targets of the prompt: every token but the first
        if nll_on_prompt:
            target_ids.extend(prompt[1:])
            source_index.extend(base + t - 1 for t in range(1, p))
            target_segment.extend([prompt_seg] * (p - 1))

        seg_of: dict[tuple[int, ...], int] = {}
        chosen_of_group = {tuple(c) for c, _ in group.pairs}
        start = p
        for j, resp in enumerate(group.responses()):
            r = len(resp)
            # a rejected response's tokens before its rejected_start are a segment of their own, which no
            # pair reads: context for what follows, outside the odds-ratio term
            s = 0 if tuple(resp) in chosen_of_group else group.rejected_start.get(tuple(resp), 0)
            if s:
                target_segment.extend([len(segment_tokens)] * s)
                segment_tokens.append(s)
            seg = len(segment_tokens)
            seg_of[tuple(resp)] = seg
            segment_tokens.append(r - s)
            input_ids[g_idx, start : start + r] = torch.tensor(resp, dtype=torch.long)
            position_ids[g_idx, start : start + r] = torch.arange(p, p + r)
            local_segment[g_idx, start : start + r] = j + 1
            target_ids.extend(resp)
            source_index.append(base + p - 1)
            source_index.extend(base + start + i - 1 for i in range(1, r))
            target_segment.extend([seg] * (r - s))
            start += r
        row_spans.append((p, tuple(len(resp) for resp in group.responses())))
        for chosen, rejected in group.pairs:
            pair_chosen.append(seg_of[tuple(chosen)])
            pair_rejected.append(seg_of[tuple(rejected or chosen)])
            pair_prompt.append(prompt_seg)
            has_rejected.append(bool(rejected))
            chosen_ref.append(group.chosen_ref.get(tuple(chosen)))

    q_seg = local_segment.unsqueeze(2)  # [G, T, 1]
    k_seg = local_segment.unsqueeze(1)  # [G, 1, T]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    visible = causal & (k_seg != -1) & (q_seg != -1) & ((k_seg == q_seg) | (k_seg == 0))
    visible |= torch.eye(width, dtype=torch.bool)
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "attention_mask": visible.unsqueeze(1),
        "target_ids": torch.tensor(target_ids, dtype=torch.long),
        "source_index": torch.tensor(source_index, dtype=torch.long),
        "target_segment": torch.tensor(target_segment, dtype=torch.long),
        "segment_tokens": torch.tensor(segment_tokens, dtype=torch.float32),
        "pair_chosen": torch.tensor(pair_chosen, dtype=torch.long),
        "pair_rejected": torch.tensor(pair_rejected, dtype=torch.long),
        "pair_prompt": torch.tensor(pair_prompt, dtype=torch.long),
        "has_rejected": torch.tensor(has_rejected, dtype=torch.bool),
        "chosen_ref": _refs(chosen_ref),
        "num_pairs": len(pair_chosen),
        "nll_on_prompt": bool(nll_on_prompt),
        "row_spans": tuple(row_spans),
    }
