"""The forward pass: from a collated batch (``batching``) to the per-pair sums the losses take.

The forward goes through the top-level model (so DDP, PEFT and Accelerate hooks see it) with
``logits_to_keep=1`` and ``output_hidden_states=True``: the model computes logits for one position only,
and the log-probabilities come from the final hidden states in chunks (``logprobs.target_logprobs``).
A run-time check compares the head applied to the last hidden state with the model's own logits; a
model that transforms its logits after the head (soft-capping, scaling), has no output embeddings,
or does not take ``logits_to_keep`` falls back to full logits. Both layouts (plain rows, packed
prompt-once rows) give the same sums; see ``batching`` for how they are built.
"""

from __future__ import annotations

import inspect
import warnings
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from .errors import UserError
from .losses import OrpoOutput, orpo_loss
from .logprobs import DEFAULT_CHUNK_SIZE, Head, target_logprobs, token_logprobs, token_logprobs_from_logits
from .segmented_attention import segmented_attention


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


def pair_logps(model: nn.Module, batch: dict[str, Any], chunk_size: int = DEFAULT_CHUNK_SIZE,
               fused: bool = True) -> dict[str, Tensor]:
    """Per-pair sums for :func:`losses.orpo_loss` from a :func:`collate_plain` batch.

    Returns ``[B]`` tensors: ``chosen_logp_sum``, ``chosen_tokens``, ``rejected_logp_sum``,
    ``rejected_tokens`` (sums of ``log p`` and counts over response tokens), ``nll_sum`` (sum of
    ``-log p`` over the chosen row's NLL tokens) and ``nll_count``, and the batch's ``has_rejected`` (False
    for an NLL-only row). Sums are fp32; counts are fp32 too.
    """
    kind, value, head, bias = model_forward(model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    labels = batch["labels"]
    if kind == "hidden":
        tok = token_logprobs(value, head, labels, chunk_size=chunk_size, bias=bias, fused=fused)
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
        "has_rejected": batch["has_rejected"],
        "chosen_ref": batch.get("chosen_ref"),
    }


def orpo_loss_of(sums: dict[str, Tensor], lambda_or: float, protect: float = 0.0) -> OrpoOutput:
    """:func:`losses.orpo_loss` on the sums :func:`pair_logps` or :func:`pair_logps_packed` returned;
    ``protect`` > 0: with the batch's ``chosen_ref`` (``train.protect_chosen``)."""
    return orpo_loss(sums["chosen_logp_sum"], sums["chosen_tokens"], sums["rejected_logp_sum"],
                     sums["rejected_tokens"], sums["nll_sum"], sums["nll_count"], lambda_or,
                     has_rejected=sums.get("has_rejected"), chosen_ref=sums.get("chosen_ref"), protect=protect)


def sft_logps(
    model: nn.Module, batch: dict[str, Any], chunk_size: int = DEFAULT_CHUNK_SIZE, fused: bool = True
) -> tuple[Tensor, Tensor]:
    """``(logp_sum, token_count)``, each ``[B]``, over response tokens: the arguments of :func:`losses.sft_loss`."""
    kind, value, head, bias = model_forward(model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    if kind == "hidden":
        tok = token_logprobs(value, head, batch["labels"], chunk_size=chunk_size, bias=bias, fused=fused)
    else:
        tok = token_logprobs_from_logits(value, batch["labels"])
    resp = batch["response_mask"].float()
    return (tok * resp).sum(-1), resp.sum(-1)



def _checkpointing(inner: nn.Module) -> bool:
    """Whether the model recomputes activations in the backward (transformers 5.24 renamed the flag
    ``is_activation_checkpointing``; the old name warns there, and is what earlier versions have)."""
    if hasattr(type(inner), "is_activation_checkpointing"):
        return bool(inner.is_activation_checkpointing)
    return bool(getattr(inner, "is_gradient_checkpointing", False))


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
    model: nn.Module, batch: dict[str, Any], chunk_size: int = DEFAULT_CHUNK_SIZE, fused: bool = True,
    segmented: bool = True,
) -> dict[str, Tensor]:
    """The same per-pair sums as :func:`pair_logps`, from a :func:`collate_packed` batch. ``fused``:
    the fused head log-probabilities (``logprobs._FusedHeadLogprobs``) where they apply; ``segmented``:
    SDPA attention by segments (``segmented_attention``) instead of through the dense mask."""
    inner = _inner_model(model)
    mask = _packed_attention_mask(inner, batch["attention_mask"])
    # not under gradient checkpointing: the backward's recomputation runs outside the context, and must
    # take the same path as the forward it recomputes
    by_segments = segmented and "row_spans" in batch and not _checkpointing(inner)
    spans = segmented_attention(batch["row_spans"], batch["input_ids"].shape[1]) if by_segments else nullcontext()
    with spans:
        kind, value, head, bias = model_forward(
            model, input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"]
        )
    flat = value.reshape(-1, value.shape[-1])
    sources = flat.index_select(0, batch["source_index"])
    targets = batch["target_ids"]
    if kind == "hidden":
        lp = target_logprobs(sources, head, targets, chunk_size=chunk_size, bias=bias, fused=fused)
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
        "has_rejected": batch["has_rejected"],
        "chosen_ref": batch.get("chosen_ref"),
    }
