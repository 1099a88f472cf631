"""From (prompt, chosen, rejected) text to tensors, and from tensors to the per-pair sums the losses take.

Two layouts give the same numbers (tested to 1e-5 in fp32):

* **plain** (:func:`collate_plain`, :func:`pair_logps`): rows ``[chosen_0..chosen_{B-1},
  rejected_0..rejected_{B-1}]``, each ``prompt + response``, right-padded; what TRL does.
* **packed** (:func:`collate_packed`, :func:`pair_logps_packed`; DESIGN.md section 4): one row per
  prompt holding the prompt once, then each distinct response of its pairs, with a 4-D attention mask
  that lets every response see the prompt and its own past only, and position ids that restart at
  the prompt's length for every response. A prompt with K pairs costs ``P + sum(responses)`` tokens
  instead of ``2K * P + sum(responses)``, and a chosen response shared by several pairs (positives
  are cycled) is computed once.

Token conventions: labels are aligned with inputs and shifted inside (see ``logprobs``); a response
always ends with the tokenizer's eos unless truncation cut it; the first prompt token is never a
target (nothing predicts it).

The forward goes through the top-level model (so DDP, PEFT and Accelerate hooks see it) with
``logits_to_keep=1`` and ``output_hidden_states=True``: the model computes logits for one position only,
and the log-probabilities come from the final hidden states in chunks (``logprobs.target_logprobs``).
A run-time check compares the head applied to the last hidden state with the model's own logits; a
model that transforms its logits after the head (soft-capping, scaling), has no output embeddings,
or does not take ``logits_to_keep`` falls back to full logits.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .errors import UserError
from .logprobs import (
    DEFAULT_CHUNK_SIZE,
    IGNORE_INDEX,
    Head,
    target_logprobs,
    token_logprobs,
    token_logprobs_from_logits,
)

# ---------------------------------------------------------------------------------------------
# tokenizing


@dataclass
class TokenizedPair:
    """One preference pair as token ids; the responses include their eos (unless truncated)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


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
    return TokenizedPair(list(prompt), list(chosen), list(rejected))


def tokenize_pair(
    tokenizer: Any, prompt_text: str, chosen_text: str, rejected_text: str, max_length: int
) -> TokenizedPair:
    """Tokenize one pair: prompt and responses separately, eos appended to each response, truncated.

    ``prompt_text`` is already rendered (chat template applied by the caller, including any BOS the
    template writes), so no special tokens are added here. The responses are tokenized on their own,
    not as ``prompt + response``: this matches how they were generated (tokens sampled after the
    prompt's tokens) and keeps the prompt/response boundary exact. A response that already ends with
    the eos token does not get a second one.
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
        rejected_ids=_with_eos(_encode(tokenizer, rejected_text), int(eos_id)),
    )
    return truncate_pair(pair, max_length)


# ---------------------------------------------------------------------------------------------
# plain layout


def _check_pair(i: int, prompt: Sequence[int], chosen: Sequence[int], rejected: Sequence[int]) -> None:
    if not prompt:
        raise ValueError(f"pair {i}: empty prompt (the first response token would have no predictor)")
    if not chosen or not rejected:
        raise ValueError(f"pair {i}: empty chosen or rejected response")


def collate_plain(pairs: Sequence[TokenizedPair], pad_id: int, nll_on_prompt: bool) -> dict[str, Any]:
    """Stack ``B`` pairs into ``2B`` right-padded rows: chosen rows first, then rejected rows.

    Returns ``input_ids``, ``attention_mask`` (``[2B, T]``, 1 on real tokens), ``labels`` (the token
    where any loss term reads it, ``-100`` elsewhere), ``response_mask`` (bool, response tokens of
    every row: the OR term's tokens), ``nll_mask`` (bool, the chosen rows' response tokens, plus their
    prompt tokens but the first when ``nll_on_prompt``; all False on rejected rows), ``num_pairs``
    and ``nll_on_prompt``.
    """
    if not pairs:
        raise ValueError("collate_plain needs at least one pair")
    for i, p in enumerate(pairs):
        _check_pair(i, p.prompt_ids, p.chosen_ids, p.rejected_ids)
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    n, b = len(rows), len(pairs)
    width = max(len(pr) + len(r) for pr, r in rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    response_mask = torch.zeros((n, width), dtype=torch.bool)
    nll_mask = torch.zeros((n, width), dtype=torch.bool)
    for i, (prompt, resp) in enumerate(rows):
        p, r = len(prompt), len(resp)
        input_ids[i, : p + r] = torch.tensor(list(prompt) + list(resp), dtype=torch.long)
        attention_mask[i, : p + r] = 1
        response_mask[i, p : p + r] = True
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
        "num_pairs": b,
        "nll_on_prompt": bool(nll_on_prompt),
    }


def collate_sft(examples: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int) -> dict[str, Any]:
    """Right-padded rows of ``prompt + response`` for SFT; only response tokens are labelled.

    Returns ``input_ids``, ``attention_mask``, ``labels`` (``-100`` on prompt and padding) and
    ``response_mask`` (bool), each ``[B, T]``.
    """
    if not examples:
        raise ValueError("collate_sft needs at least one example")
    for i, (prompt, resp) in enumerate(examples):
        if not prompt or not resp:
            raise ValueError(f"example {i}: empty prompt or response")
    width = max(len(p) + len(r) for p, r in examples)
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
# the forward pass


def _inner_model(model: nn.Module) -> nn.Module:
    """The transformers model under DDP/Accelerate (``.module``) and PEFT (``get_base_model``) wrappers."""
    inner = model
    while isinstance(getattr(inner, "module", None), nn.Module):
        inner = inner.module
    if callable(getattr(inner, "get_base_model", None)):
        inner = inner.get_base_model()
    return inner


def _output_head(inner: nn.Module) -> tuple[Head, Tensor | None] | None:
    """The output projection as (weight, bias) for a plain ``nn.Linear``, else (module, None); None if absent."""
    get = getattr(inner, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None
    if type(head) is nn.Linear:
        return head.weight, head.bias
    return head, None


def _is_sharded(head: Head) -> bool:
    """True when this rank holds only a shard of the head's weight (DeepSpeed ZeRO-3 leaves an empty
    placeholder with a ``ds_id``; FSDP2 makes it a DTensor): it can only be applied inside the model's
    own forward, so the full logits are used."""
    w = head if isinstance(head, Tensor) else getattr(head, "weight", None)
    if w is None:
        return False
    return hasattr(w, "ds_id") or w.numel() == 0 or type(w).__name__ == "DTensor"


def _takes_logits_to_keep(inner: nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def _project(head: Head, bias: Tensor | None, hidden: Tensor) -> Tensor:
    return torch.nn.functional.linear(hidden, head, bias) if isinstance(head, Tensor) else head(hidden)


def model_forward(model: nn.Module, **inputs: Any) -> tuple[str, Tensor, Head | None, Tensor | None]:
    """Run the model once; return ``("hidden", final_hidden, head, bias)`` or ``("logits", logits, None, None)``.

    The hidden path asks the model for the logits of the last position only and checks that the head
    applied to the final hidden state reproduces them; otherwise (or when the model cannot do that)
    the full logits are returned.
    """
    inner = _inner_model(model)
    head = _output_head(inner)
    if head is not None and _is_sharded(head[0]):
        head = None
    if head is not None and _takes_logits_to_keep(inner):
        out = model(**inputs, use_cache=False, output_hidden_states=True, logits_to_keep=1)
        hidden_states = getattr(out, "hidden_states", None)
        if hidden_states:
            hidden = hidden_states[-1]
            with torch.no_grad():
                mine = _project(head[0], head[1], hidden[:, -1:]).float()
                theirs = out.logits[:, -1:].float()
                ok = mine.shape == theirs.shape and torch.allclose(mine, theirs, rtol=1e-3, atol=1e-3)
            if ok:
                return "hidden", hidden, head[0], head[1]
        _warn_once(
            type(inner).__name__,
            f"{type(inner).__name__}: the output head applied to the final hidden state does not reproduce the "
            "model's logits (soft-capping or scaling?); computing full logits instead (slower, more memory)",
        )
    out = model(**inputs, use_cache=False)
    return "logits", out.logits, None, None


def pair_logps(model: nn.Module, batch: dict[str, Any], chunk_size: int = DEFAULT_CHUNK_SIZE) -> dict[str, Tensor]:
    """Per-pair sums for :func:`losses.orpo_loss` from a :func:`collate_plain` batch.

    Returns ``[B]`` tensors: ``chosen_logp_sum``, ``chosen_tokens``, ``rejected_logp_sum``,
    ``rejected_tokens`` (sums of ``log p`` and counts over response tokens), ``nll_sum`` (sum of
    ``-log p`` over the chosen row's NLL tokens) and ``nll_count``. Sums are fp32; counts are fp32 too.
    """
    kind, value, head, bias = model_forward(model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    labels = batch["labels"]
    if kind == "hidden":
        tok = token_logprobs(value, head, labels, chunk_size=chunk_size, bias=bias)
    else:
        tok = token_logprobs_from_logits(value, labels)
    b = batch["num_pairs"]
    resp = batch["response_mask"].float()
    nll = batch["nll_mask"].float()
    return {
        "chosen_logp_sum": (tok[:b] * resp[:b]).sum(-1),
        "chosen_tokens": resp[:b].sum(-1),
        "rejected_logp_sum": (tok[b:] * resp[b:]).sum(-1),
        "rejected_tokens": resp[b:].sum(-1),
        "nll_sum": -(tok[:b] * nll[:b]).sum(-1),
        "nll_count": nll[:b].sum(-1),
    }


def sft_logps(
    model: nn.Module, batch: dict[str, Any], chunk_size: int = DEFAULT_CHUNK_SIZE
) -> tuple[Tensor, Tensor]:
    """``(logp_sum, token_count)``, each ``[B]``, over response tokens: the arguments of :func:`losses.sft_loss`."""
    kind, value, head, bias = model_forward(model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    if kind == "hidden":
        tok = token_logprobs(value, head, batch["labels"], chunk_size=chunk_size, bias=bias)
    else:
        tok = token_logprobs_from_logits(value, batch["labels"])
    resp = batch["response_mask"].float()
    return (tok * resp).sum(-1), resp.sum(-1)


# ---------------------------------------------------------------------------------------------
# packed (prefix-shared) layout


@dataclass
class PairGroup:
    """One prompt with its K (chosen, rejected) pairs: one packed row."""

    prompt_ids: list[int]
    pairs: list[tuple[list[int], list[int]]] = field(default_factory=list)

    def responses(self) -> list[list[int]]:
        """The distinct responses in order of first appearance (chosen before rejected per pair)."""
        seen: dict[tuple[int, ...], None] = {}
        for chosen, rejected in self.pairs:
            seen.setdefault(tuple(chosen), None)
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
    return groups


def collate_packed(groups: Sequence[PairGroup], pad_id: int, nll_on_prompt: bool) -> dict[str, Any]:
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
      ``pair_rejected``, ``pair_prompt`` segment ids ``[B]``; ``num_pairs``, ``nll_on_prompt``.
    Prompt tokens are targets only when ``nll_on_prompt`` (the OR term never reads them).
    """
    if not groups:
        raise ValueError("collate_packed needs at least one group")
    width = max(g.packed_length() for g in groups)
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

    for g_idx, group in enumerate(groups):
        if not group.pairs:
            raise ValueError(f"group {g_idx} has no pairs")
        prompt = group.prompt_ids
        for k, (chosen, rejected) in enumerate(group.pairs):
            _check_pair(k, prompt, chosen, rejected)
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
        start = p
        for j, resp in enumerate(group.responses()):
            r = len(resp)
            seg = len(segment_tokens)
            seg_of[tuple(resp)] = seg
            segment_tokens.append(r)
            input_ids[g_idx, start : start + r] = torch.tensor(resp, dtype=torch.long)
            position_ids[g_idx, start : start + r] = torch.arange(p, p + r)
            local_segment[g_idx, start : start + r] = j + 1
            target_ids.extend(resp)
            source_index.append(base + p - 1)
            source_index.extend(base + start + i - 1 for i in range(1, r))
            target_segment.extend([seg] * r)
            start += r
        for chosen, rejected in group.pairs:
            pair_chosen.append(seg_of[tuple(chosen)])
            pair_rejected.append(seg_of[tuple(rejected)])
            pair_prompt.append(prompt_seg)

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
        "num_pairs": len(pair_chosen),
        "nll_on_prompt": bool(nll_on_prompt),
    }


def _packed_attention_mask(inner: nn.Module, visible: Tensor) -> Tensor:
    """The 4-D mask in the form the model's attention takes: bool for SDPA, additive float for eager.

    transformers (5.x ``masking_utils._preprocess_mask_arguments``) passes a 4-D mask through as it
    is; SDPA reads True as "attend", while eager attention *adds* the mask to the scores, so it needs
    0 / dtype-min. Flash-attention and flex kernels take no dense 4-D mask.
    """
    impl = getattr(getattr(inner, "config", None), "_attn_implementation", None)
    if impl == "sdpa":
        return visible
    if impl == "eager":
        embeddings = inner.get_input_embeddings() if callable(getattr(inner, "get_input_embeddings", None)) else None
        dtype = embeddings.weight.dtype if embeddings is not None else torch.float32
        mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
        return mask.masked_fill(~visible, torch.finfo(dtype).min)
    raise UserError(
        f"the packed (prefix-shared) layout needs attn_implementation 'sdpa' or 'eager', but the model uses "
        f"{impl!r}; load the student with one of those or use the unshared layout"
    )


def pair_logps_packed(
    model: nn.Module, batch: dict[str, Any], chunk_size: int = DEFAULT_CHUNK_SIZE
) -> dict[str, Tensor]:
    """The same per-pair sums as :func:`pair_logps`, from a :func:`collate_packed` batch."""
    inner = _inner_model(model)
    mask = _packed_attention_mask(inner, batch["attention_mask"])
    kind, value, head, bias = model_forward(
        model, input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"]
    )
    flat = value.reshape(-1, value.shape[-1])
    sources = flat.index_select(0, batch["source_index"])
    targets = batch["target_ids"]
    if kind == "hidden":
        lp = target_logprobs(sources, head, targets, chunk_size=chunk_size, bias=bias)
    else:
        logp = torch.log_softmax(sources.float(), dim=-1)
        lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    counts = batch["segment_tokens"]
    seg_sum = torch.zeros(counts.shape[0], dtype=torch.float32, device=lp.device).index_add(
        0, batch["target_segment"], lp
    )
    chosen, rejected, prompt = batch["pair_chosen"], batch["pair_rejected"], batch["pair_prompt"]
    chosen_sum, chosen_n = seg_sum[chosen], counts[chosen]
    nll_sum, nll_n = -chosen_sum, chosen_n
    if batch["nll_on_prompt"]:
        nll_sum = nll_sum - seg_sum[prompt]
        nll_n = nll_n + counts[prompt]
    return {
        "chosen_logp_sum": chosen_sum,
        "chosen_tokens": chosen_n,
        "rejected_logp_sum": seg_sum[rejected],
        "rejected_tokens": counts[rejected],
        "nll_sum": nll_sum,
        "nll_count": nll_n,
    }
