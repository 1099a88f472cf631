"""Log-probabilities of target tokens without the full ``[batch, length, vocab]`` fp32 logits.

With the default student's 49,152-token vocabulary, fp32 logits for a batch of 16 rows of 1,024
tokens take 3.2 GB, and autograd keeps another copy or two for the backward. The functions here
project the final hidden states onto the vocabulary a chunk of tokens at a time, keep only the
log-probability of each target token, and (when gradients are needed) wrap every chunk in
``torch.utils.checkpoint`` so the backward recomputes one chunk's logits at a time instead of keeping
them all. Only positions that have a target are projected at all (prompt and padding cost nothing).

Label convention (the same as Hugging Face's ``labels``): ``labels`` is aligned with the *input*
positions; ``labels[b, t]`` is the token at position ``t`` (or ``-100`` to ignore it), and it is
predicted by the hidden state at position ``t - 1``. The functions shift internally, and the result
is aligned with ``labels``: ``out[b, t] = log p(labels[b, t] | hidden[b, t - 1])``, 0 where
``labels[b, t] == -100`` and always 0 at ``t = 0`` (nothing predicts the first token).

Precision: the projection runs in the ambient dtype (bf16 under autocast, like the model's own
``lm_head``); the log-softmax and everything after it run in fp32.

Models whose causal-LM forward transforms the logits after ``lm_head`` need that transform here too,
or the full-logits path: Gemma 2/3 (``final_logit_softcapping``: ``cap * tanh(logits / cap)``),
Cohere (``logit_scale``: multiply), Granite (``logits_scaling``: divide). Llama, SmolLM2, Qwen2/3 and
Mistral apply nothing and have a bias-free ``lm_head``; a bias is supported through ``bias``.
``forward.pair_logps`` detects such models at run time and falls back to full logits.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
DEFAULT_CHUNK_SIZE = 1024

Head = Tensor | Callable[[Tensor], Tensor]


def _chunk_logprobs(hidden: Tensor, head: Head, bias: Tensor | None, targets: Tensor) -> Tensor:
    """``log softmax(head(hidden))[targets]`` for one chunk: ``[n, H] -> [n]``, in fp32."""
    if isinstance(head, Tensor):
        logits = F.linear(hidden, head, bias)
    else:
        logits = head(hidden)
    logits = logits.float()
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


class _FusedHeadLogprobs(torch.autograd.Function):
    """``log softmax(hidden @ weight.T)[targets]`` for one chunk, ``[n, H] -> [n]``, whose backward
    recomputes the chunk's logits and turns them into their gradient in place,
    ``g * (onehot(targets) - softmax)``, then applies the two products. Between the passes only
    ``hidden``, ``targets`` and the ``[n]`` log-normalisers are kept. Against the checkpointed
    :func:`_chunk_logprobs` it saves the autograd graph over ``[n, V]`` (a gather's zero-filled scatter,
    the exp, sub and mul of logsumexp's backward, the fp32 cast's backward: each a pass over the
    chunk's logits, and the recomputed forward's own logsumexp).

    The products run in ``compute_dtype`` (bf16 under autocast, as the model's ``lm_head``), the
    softmax in fp32, and the gradients come back in the inputs' dtypes (fp32 for fp32 weights).
    """

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, targets: Tensor, compute_dtype: torch.dtype) -> Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            logits = (hidden.to(compute_dtype) @ weight.to(compute_dtype).T).to(_softmax_dtype(compute_dtype))
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.compute_dtype = compute_dtype
        return picked - lse

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        hidden, weight, targets, lse = ctx.saved_tensors
        dt = ctx.compute_dtype
        h, w = hidden.to(dt), weight.to(dt)
        with torch.autocast(hidden.device.type, enabled=False):
            grad = (h @ w.T).to(lse.dtype)  # the logits again, then in place their gradient
            g = grad_out.to(lse.dtype).unsqueeze(-1)
            grad.sub_(lse.unsqueeze(-1)).exp_().mul_(-g)
            grad.scatter_add_(-1, targets.unsqueeze(-1), g)
            grad = grad.to(dt)
            grad_hidden = (grad @ w).to(hidden.dtype) if ctx.needs_input_grad[0] else None
            grad_weight = (grad.T @ h).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None


def _softmax_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """fp32, or wider when the products are (float64 in tests)."""
    return torch.promote_types(compute_dtype, torch.float32)


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype ``F.linear(hidden, weight)`` would compute in here: autocast's, or the promoted one."""
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def target_logprobs(
    hidden: Tensor,
    head: Head,
    targets: Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    bias: Tensor | None = None,
    fused: bool = True,
) -> Tensor:
    """``log p(targets[i] | hidden[i])`` for already-paired rows: ``hidden [N, H]``, ``targets [N]`` -> ``[N]``.

    ``head`` is the output-embedding weight ``[V, H]`` (projected with ``F.linear``) or any module or
    function mapping ``[n, H]`` to logits ``[n, V]`` (for heads wrapped by PEFT, say). At most
    ``chunk_size`` rows are projected at once. This is the building block of every layout: the
    caller decides which hidden state predicts which token.

    With gradients, a weight head without bias takes :class:`_FusedHeadLogprobs` (``fused``, the
    default) and anything else, or ``fused=False``, a ``torch.utils.checkpoint`` of
    :func:`_chunk_logprobs` per chunk; both give the same values and gradients (tests/test_logprobs.py).
    """
    if hidden.dim() != 2 or targets.dim() != 1 or hidden.shape[0] != targets.shape[0]:
        raise ValueError(
            f"target_logprobs expects hidden [N, H] and targets [N], got {tuple(hidden.shape)} and {tuple(targets.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    n = hidden.shape[0]
    if n == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    if isinstance(head, Tensor):
        vocab = head.shape[0]
        if bool(((targets < 0) | (targets >= vocab)).any()):
            bad = targets[(targets < 0) | (targets >= vocab)][:5].tolist()
            raise ValueError(f"target token ids must lie in [0, {vocab}), got e.g. {bad}")
    params_need_grad = (isinstance(head, Tensor) and head.requires_grad) or (
        isinstance(head, torch.nn.Module) and any(p.requires_grad for p in head.parameters())
    )
    use_checkpoint = torch.is_grad_enabled() and (hidden.requires_grad or params_need_grad)
    use_fused = use_checkpoint and fused and isinstance(head, Tensor) and bias is None
    dtype = _compute_dtype(hidden, head) if use_fused else None
    pieces = []
    for start in range(0, n, chunk_size):
        h = hidden[start : start + chunk_size]
        y = targets[start : start + chunk_size]
        if use_fused:
            pieces.append(_FusedHeadLogprobs.apply(h, head, y, dtype))
        elif use_checkpoint:
            pieces.append(checkpoint(_chunk_logprobs, h, head, bias, y, use_reentrant=False))
        else:
            pieces.append(_chunk_logprobs(h, head, bias, y))
    return torch.cat(pieces)


def token_logprobs(
    hidden_states: Tensor,
    lm_head_weight: Head,
    labels: Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    bias: Tensor | None = None,
    fused: bool = True,
) -> Tensor:
    """Per-token ``log p`` of ``labels`` from final hidden states, chunked: ``[B, T, H] -> [B, T]`` fp32.

    ``hidden_states`` are the model's final (post-norm) hidden states at every input position;
    ``labels`` follow the module's convention (aligned to inputs, ``-100`` ignored, shifted inside).
    Gradients flow to ``hidden_states`` and to the weight. Equal to
    :func:`token_logprobs_from_logits` on ``F.linear(hidden_states, lm_head_weight, bias)``.
    """
    if hidden_states.dim() != 3 or labels.shape != hidden_states.shape[:2]:
        raise ValueError(
            f"token_logprobs expects hidden [B, T, H] and labels [B, T], "
            f"got {tuple(hidden_states.shape)} and {tuple(labels.shape)}"
        )
    b, t, _ = hidden_states.shape
    out = hidden_states.new_zeros(b, t, dtype=torch.float32)
    if t < 2:
        return out
    shifted = labels[:, 1:]
    keep = shifted != IGNORE_INDEX
    picked = target_logprobs(
        hidden_states[:, :-1][keep], lm_head_weight, shifted[keep], chunk_size=chunk_size, bias=bias, fused=fused
    )
    tail = hidden_states.new_zeros(b, t - 1, dtype=torch.float32).masked_scatter(keep, picked)
    return torch.cat([out[:, :1], tail], dim=1)


def token_logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """Reference: per-token ``log p`` of ``labels`` from full logits ``[B, T, V]`` -> ``[B, T]`` fp32.

    Same label convention and output alignment as :func:`token_logprobs`; used by the full-logits
    fallback and by tests.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"token_logprobs_from_logits expects logits [B, T, V] and labels [B, T], "
            f"got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    b, t, _ = logits.shape
    out = logits.new_zeros(b, t, dtype=torch.float32)
    if t < 2:
        return out
    shifted = labels[:, 1:]
    keep = shifted != IGNORE_INDEX
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logp.gather(-1, shifted.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    tail = torch.where(keep, picked, torch.zeros_like(picked))
    return torch.cat([out[:, :1], tail], dim=1)
