"""The training objectives as pure functions of per-pair sums: ORPO and SFT.

Nothing here touches a model. The forward pass (``forward.pair_logps``) reduces each pair to a few
sums and counts, and these functions turn them into the loss. Keeping the sums separate from the
means lets the training loop decide the normaliser (for example over accumulation steps or ranks)
and lets ``nll_on_prompt`` change which tokens the NLL counts without touching the OR term.

Definitions (Hong, Lee, Thorne 2024, "ORPO"). For a response ``y`` to a
prompt ``x`` with ``|y|`` tokens:

* ``l(y) = (1/|y|) * sum_t log p(y_t | x, y_<t)``: the mean log-probability over the response
  tokens only (never the prompt), so ``l(y) < 0``;
* ``log odds(y) = l(y) - log(1 - exp(l(y)))``: the log of ``p / (1 - p)`` with ``p = exp(l(y))``;
* ``L_OR = mean over pairs of -log sigmoid(log odds(y_w) - log odds(y_l))``;
* ``L_NLL = (sum of -log p over the NLL tokens of every chosen row) / (number of those tokens)``: a
  token mean over the whole batch, not a mean of per-pair means. The NLL tokens are the chosen
  response's tokens, plus the prompt's tokens (all but the first, which nothing predicts) when
  ``nll_on_prompt`` is set, as TRL's ORPOTrainer and the original ORPO code do;
* ``L = L_NLL + lambda_or * L_OR`` (:func:`orpo_objective`, the one place the weight is applied).
  ``lambda_or`` is ``train.lambda`` in the config and TRL's ``beta`` (TRL writes ``nll - beta * logsigmoid(.)``).
* Chosen-side protection (``train.protect_chosen``, ``mu`` below; DPO-Positive, Pal et al. 2024, arXiv
  2402.13228, carried over to ORPO's mean log-probabilities): with ``l_ref(y_w)``, the chosen response's
  mean log-probability under the model the odds-ratio term started from, each pair's logit becomes
  ``log odds(y_w) - log odds(y_l) - mu * max(0, l_ref(y_w) - l(y_w))``: the term stops rewarding a wider
  margin once the chosen side has fallen below where it started. ``mu = 0`` is plain ORPO.

Everything is computed in fp32, whatever the dtype of the inputs. Nothing is clamped: a mean
log-probability of exactly 0 (every token predicted with probability 1 in fp32) gives an infinite
log odds, and the caller's non-finite check (``NonFiniteLossError``) must catch it; note that such a
pair can give a finite loss with a NaN gradient when it is the chosen side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

_MINUS_LN2 = -math.log(2.0)


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate over the whole range.

    Near 0, ``1 - exp(x)`` cancels catastrophically, so ``log(-expm1(x))`` is used; far from 0,
    ``exp(x)`` is tiny and ``log1p(-exp(x))`` keeps its digits (Maechler 2012). The branch point is
    ``-ln 2``. Both branches are evaluated on inputs that keep them finite, so that ``torch.where``
    does not leak a NaN gradient from the unused branch.
    """
    x = x.float()
    near_zero = x > _MINUS_LN2
    # Feed each branch a value in its own domain so the discarded branch stays finite (and so does
    # its gradient); the chosen branch sees the true x.
    x_near = torch.where(near_zero, x, torch.full_like(x, -1.0))
    x_far = torch.where(near_zero, torch.full_like(x, -1.0), x)
    return torch.where(near_zero, torch.log(-torch.expm1(x_near)), torch.log1p(-torch.exp(x_far)))


def log_odds(mean_logp: Tensor) -> Tensor:
    """``log(p / (1 - p))`` for ``p = exp(mean_logp)``, in fp32: ``l - log1mexp(l)``."""
    mean_logp = mean_logp.float()
    return mean_logp - log1mexp(mean_logp)


# What the training loop logs for an ORPO step, in the order OrpoOutput.metrics() returns them.
ORPO_METRICS = (
    "loss",
    "nll",
    "or_loss",
    "logps/chosen",
    "logps/rejected",
    "log_odds_ratio",
    "reward_accuracy",
    "margin",
)
PROTECT_METRIC = "chosen_drop"  # logged with chosen-side protection: mean max(0, l_ref(y_w) - l(y_w))


@dataclass
class OrpoOutput:
    """The ORPO loss and what the training loop logs.

    Scalars (0-d tensors) are means over the pairs of the batch; per-pair tensors have shape ``[B]`` (the
    rows with a rejected side, when ``orpo_loss`` was given ``has_rejected``).
    ``nll`` and ``or_loss`` keep their graphs: training weighs each by its micro-batch's share of the
    optimizer step (``training.step_loss``) and backpropagates that. ``loss`` is this batch's objective
    on its own, for tests and the logs; the others are for logging (``.detach()`` them before storing).
    """

    loss: Tensor  # scalar: orpo_objective(nll, or_loss, lambda_or)
    nll: Tensor  # scalar: token-mean NLL of the chosen rows
    or_loss: Tensor  # scalar: mean over pairs of -logsigmoid(log_odds_ratio)
    log_odds_ratio: Tensor  # [B]: log odds(chosen) - log odds(rejected)
    logps_chosen: Tensor  # [B]: mean log-prob of each chosen response, l(y_w)
    logps_rejected: Tensor  # [B]: mean log-prob of each rejected response, l(y_l)
    reward_accuracy: Tensor  # scalar: share of pairs with log odds(chosen) > log odds(rejected)
    margin: Tensor  # scalar: mean over pairs of l(y_w) - l(y_l)
    chosen_drop: Tensor | None = None  # scalar, with chosen-side protection: mean max(0, l_ref(y_w) - l(y_w))

    def metrics(self) -> dict[str, float]:
        """Plain floats under the names ``metrics.jsonl`` logs them (one device sync); the pair metrics are
        0 for a batch of NLL-only rows (training weighs them by the batch's share of the step's pairs, 0 there)."""
        extra = {} if self.chosen_drop is None else {PROTECT_METRIC: 0.0}
        if self.log_odds_ratio.numel() == 0:
            return {**dict.fromkeys(ORPO_METRICS, 0.0), **extra, "loss": float(self.loss.detach()),
                    "nll": float(self.nll.detach())}
        values = torch.stack(
            [
                self.loss.detach(),
                self.nll.detach(),
                self.or_loss.detach(),
                self.logps_chosen.detach().mean(),
                self.logps_rejected.detach().mean(),
                self.log_odds_ratio.detach().mean(),
                self.reward_accuracy.detach(),
                self.margin.detach(),
                *([] if self.chosen_drop is None else [self.chosen_drop.detach()]),
            ]
        ).tolist()
        return dict(zip((*ORPO_METRICS, *extra), values))


def _as_vector(name: str, t: Tensor, size: int | None) -> Tensor:
    t = torch.as_tensor(t)
    if t.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor with one value per pair, got shape {tuple(t.shape)}")
    if size is not None and t.shape[0] != size:
        raise ValueError(f"{name} has {t.shape[0]} values but the batch has {size} pairs")
    return t.float()


def _check_positive(**counts: Tensor) -> None:
    """A response with no tokens has no mean log-prob: a batching bug. One host sync for all counts."""
    if bool(torch.stack([(c <= 0).any() for c in counts.values()]).any()):
        for name, c in counts.items():
            if bool((c <= 0).any()):
                raise ValueError(f"{name} must be positive for every pair, got {c.tolist()}")


def orpo_objective(nll: Any, or_loss: Any, lambda_or: float) -> Any:
    """``L = L_NLL + lambda_or * L_OR``: the one place the odds-ratio term's weight is applied (tensors
    for the loss, floats for the logged value)."""
    return nll + float(lambda_or) * or_loss


def orpo_loss(
    chosen_logp_sum: Tensor,
    chosen_tokens: Tensor,
    rejected_logp_sum: Tensor,
    rejected_tokens: Tensor,
    nll_tokens_sum: Tensor,
    nll_token_count: Tensor,
    lambda_or: float,
    has_rejected: Tensor | None = None,
    chosen_ref: Tensor | None = None,
    protect: float = 0.0,
) -> OrpoOutput:
    """The ORPO objective from per-pair sums; every argument but ``lambda_or`` has shape ``[B]``.

    Args:
        chosen_logp_sum: sum of ``log p`` over each chosen response's tokens (negative).
        chosen_tokens: number of tokens in each chosen response (the denominator of ``l(y_w)``).
        rejected_logp_sum, rejected_tokens: the same for the rejected responses.
        nll_tokens_sum: sum of ``-log p`` (a positive NLL) over each pair's NLL tokens: the chosen
            response, plus the prompt when ``nll_on_prompt``.
        nll_token_count: number of those NLL tokens per pair.
        lambda_or: weight of the odds-ratio term (TRL's ``beta``; ``train.lambda`` in the config).
        has_rejected: bool ``[B]``, False for an NLL-only row (a positive of a question with no negative,
            ``pairs.no_negative: nll``): its chosen side counts in ``L_NLL`` as usual and it takes no part in
            ``L_OR`` or in the pair metrics (its rejected sums are ignored). None: every row is a pair.
        chosen_ref: ``l_ref(y_w)`` per pair, the chosen side's mean log-probability under the model the term
            started from; with ``protect`` > 0 it enters each pair's logit (the module docstring).
        protect: ``mu``, the weight of the chosen side's drop below ``chosen_ref`` (``train.protect_chosen``).

    ``L_NLL`` is ``nll_tokens_sum.sum() / nll_token_count.sum()`` (a token mean over the batch, NLL-only
    rows included); ``L_OR`` and the per-pair outputs are over the rows with a rejected side (``L_OR`` is 0
    when there is none).
    """
    b = _as_vector("chosen_logp_sum", chosen_logp_sum, None).shape[0]
    if b == 0:
        raise ValueError("orpo_loss needs at least one pair")
    c_sum = _as_vector("chosen_logp_sum", chosen_logp_sum, b)
    c_n = _as_vector("chosen_tokens", chosen_tokens, b)
    r_sum = _as_vector("rejected_logp_sum", rejected_logp_sum, b)
    r_n = _as_vector("rejected_tokens", rejected_tokens, b)
    nll_sum = _as_vector("nll_tokens_sum", nll_tokens_sum, b)
    nll_n = _as_vector("nll_token_count", nll_token_count, b)
    ref = None if chosen_ref is None or protect <= 0 else _as_vector("chosen_ref", chosen_ref, b)
    _check_positive(chosen_tokens=c_n, nll_token_count=nll_n)
    nll = nll_sum.sum() / nll_n.sum()
    if has_rejected is not None:
        keep = torch.as_tensor(has_rejected, dtype=torch.bool, device=c_sum.device)
        if keep.shape != c_sum.shape:
            raise ValueError(f"has_rejected has shape {tuple(keep.shape)} but the batch has {b} pairs")
        c_sum, c_n, r_sum, r_n = c_sum[keep], c_n[keep], r_sum[keep], r_n[keep]
        ref = None if ref is None else ref[keep]
    _check_positive(rejected_tokens=r_n)

    logps_chosen = c_sum / c_n
    logps_rejected = r_sum / r_n
    ratio = log_odds(logps_chosen) - log_odds(logps_rejected)
    logit, drop = ratio, None  # the pair's logit in the term; the logged ratio and accuracy stay plain ORPO's
    if ref is not None:
        if bool(torch.isnan(ref).any()):
            raise ValueError("chosen_ref is missing (NaN) for a pair: every chosen side needs its reference value")
        below = torch.relu(ref - logps_chosen)
        logit = ratio - float(protect) * below
        drop = below.detach().mean() if below.numel() else None
    if ratio.numel() == 0:  # only NLL-only rows: no odds-ratio term, and nothing to log for pairs
        zero = nll.new_zeros(())
        return OrpoOutput(loss=orpo_objective(nll, zero, lambda_or), nll=nll, or_loss=zero, log_odds_ratio=ratio,
                          logps_chosen=logps_chosen, logps_rejected=logps_rejected, reward_accuracy=zero, margin=zero,
                          chosen_drop=None if ref is None else zero)
    or_loss = -F.logsigmoid(logit).mean()
    return OrpoOutput(
        loss=orpo_objective(nll, or_loss, lambda_or),
        nll=nll,
        or_loss=or_loss,
        log_odds_ratio=ratio,
        logps_chosen=logps_chosen,
        logps_rejected=logps_rejected,
        reward_accuracy=(ratio.detach() > 0).float().mean(),
        margin=(logps_chosen - logps_rejected).detach().mean(),
        chosen_drop=drop,
    )


def sft_loss(logp_sum: Tensor, token_count: Tensor) -> Tensor:
    """Token-mean NLL over the batch: ``-sum(logp_sum) / sum(token_count)``, in fp32.

    ``logp_sum`` is the per-example sum of ``log p`` over the response tokens (negative), shape
    ``[B]``; ``token_count`` the per-example number of those tokens. Long responses weigh more than
    short ones, as in standard causal-LM fine-tuning.
    """
    s = _as_vector("logp_sum", logp_sum, None)
    n = _as_vector("token_count", token_count, s.shape[0])
    if s.shape[0] == 0:
        raise ValueError("sft_loss needs at least one example")
    _check_positive(token_count=n)
    return -s.sum() / n.sum()
