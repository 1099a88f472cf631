"""ORPO and SFT losses: hand-computed values, numerical edge cases, and TRL's odds-ratio term."""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch

from orpo_distill.losses import OrpoOutput, log1mexp, log_odds, orpo_loss, sft_loss

LN = math.log


def _t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# log1mexp / log odds


@pytest.mark.parametrize("x", [-1e-8, -1e-6, -1e-3, -0.5, -0.6931, -0.6932, -1.0, -5.0, -20.0, -50.0, -100.0])
def test_log1mexp_matches_float64_reference(x: float) -> None:
    # float64 reference, each formula where it keeps its digits
    ref = math.log(-math.expm1(x)) if x > -0.5 else math.log1p(-math.exp(x))
    got = log1mexp(torch.tensor([x], dtype=torch.float32)).item()
    assert math.isfinite(got)
    assert got == pytest.approx(ref, rel=1e-6, abs=1e-37)  # abs: fp32 subnormals at x = -100
    if x < -20:
        assert got < 0  # not rounded to 0: the tail keeps its digits


def test_log_odds_near_zero_is_accurate_where_the_naive_formula_is_not() -> None:
    # l = -1e-6: p = exp(l) ~ 1 - 1e-6, odds ~ 1e6, log odds = l - log(1 - e^l) ~ 13.8155
    l = -1e-6
    ref = l - math.log(-math.expm1(l))
    got = log_odds(torch.tensor([l])).item()
    assert got == pytest.approx(ref, rel=1e-6)
    naive = (torch.tensor([l]) - torch.log(1 - torch.exp(torch.tensor([l])))).item()
    assert abs(naive - ref) > 1e-2  # fp32 cancellation: why the stable form exists


def test_log_odds_far_from_zero() -> None:
    # l = -50: p ~ 2e-22, log(1 - p) ~ -2e-22, so log odds ~ -50 exactly in fp32
    got = log_odds(torch.tensor([-50.0])).item()
    assert math.isfinite(got)
    assert got == pytest.approx(-50.0, abs=1e-6)


def test_log_odds_gradient_is_finite_on_both_branches() -> None:
    # d/dl log odds = 1 / (1 - e^l): ~1e8 at l = -1e-8, ~1 far away. At -1e-8, exp(l) rounds to 1
    # in fp32, so an unguarded torch.where (as in TRL's log1mexp) leaks a NaN from the unused branch.
    l = torch.tensor([-1e-8, -1e-6, -0.5, -0.7, -50.0], requires_grad=True)
    log_odds(l).sum().backward()
    expected = [1.0 / -math.expm1(v) for v in l.detach().tolist()]
    assert torch.isfinite(l.grad).all()
    for g, e in zip(l.grad.tolist(), expected):
        assert g == pytest.approx(e, rel=1e-3)


def test_log_odds_returns_fp32_from_bf16() -> None:
    assert log_odds(torch.tensor([-0.3], dtype=torch.bfloat16)).dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# ORPO


def test_orpo_two_token_example_by_hand() -> None:
    """One pair, two response tokens each.

    chosen tokens p = 0.5, 0.5:     l_w = log 0.5,  odds = 0.5/0.5 = 1,    log odds = 0
    rejected tokens p = 0.25, 0.25: l_l = log 0.25, odds = 0.25/0.75 = 1/3, log odds = -log 3
    log odds ratio = 0 - (-log 3) = log 3
    L_OR = -log sigmoid(log 3) = -log(3 / (1 + 3)) = log(4/3) = 0.2876821
    NLL over the 2 chosen tokens: (log 2 + log 2) / 2 = log 2 = 0.6931472
    L = log 2 + 0.1 * log(4/3) = 0.7219154
    dL/d(chosen_logp_sum) = lambda_or * dL_OR/dratio * dlogodds/dl * dl/dsum
                          = 0.1 * -(1 - 3/4) * 1/(1 - 0.5) * 1/2 = -0.025
    """
    c_sum = torch.tensor([2 * LN(0.5)], requires_grad=True)
    out = orpo_loss(c_sum, _t(2), _t(2 * LN(0.25)), _t(2), _t(2 * LN(2)), _t(2), lambda_or=0.1)
    assert isinstance(out, OrpoOutput)
    assert out.logps_chosen.item() == pytest.approx(LN(0.5), rel=1e-6)
    assert out.logps_rejected.item() == pytest.approx(LN(0.25), rel=1e-6)
    assert out.log_odds_ratio.item() == pytest.approx(LN(3), rel=1e-6)
    assert out.or_loss.item() == pytest.approx(LN(4 / 3), rel=1e-6)
    assert out.nll.item() == pytest.approx(LN(2), rel=1e-6)
    assert out.loss.item() == pytest.approx(LN(2) + 0.1 * LN(4 / 3), rel=1e-6)
    assert out.margin.item() == pytest.approx(LN(2), rel=1e-6)
    assert out.reward_accuracy.item() == 1.0
    out.loss.backward()
    assert c_sum.grad.item() == pytest.approx(-0.025, rel=1e-5)


def test_orpo_batch_means_nll_over_tokens_and_or_over_pairs() -> None:
    """Pair 1 as above; pair 2: chosen one token p = 0.8 (odds 4), rejected one token p = 0.5 (odds 1).

    L_OR,2 = -log sigmoid(log 4) = log(5/4); mean L_OR = (log(4/3) + log(5/4)) / 2 = log(5/3) / 2
    NLL is a token mean over the batch: (2 log 2 + -log 0.8) / (2 + 1) = 0.5364793
    (a mean of per-pair means would be (log 2 - log 0.8) / 2 = 0.4581 instead)
    """
    out = orpo_loss(
        _t(2 * LN(0.5), LN(0.8)),
        _t(2, 1),
        _t(2 * LN(0.25), LN(0.5)),
        _t(2, 1),
        _t(2 * LN(2), -LN(0.8)),
        _t(2, 1),
        lambda_or=0.5,
    )
    assert out.log_odds_ratio.tolist() == pytest.approx([LN(3), LN(4)], rel=1e-6)
    assert out.or_loss.item() == pytest.approx(LN(5 / 3) / 2, rel=1e-6)
    assert out.nll.item() == pytest.approx((2 * LN(2) - LN(0.8)) / 3, rel=1e-6)
    assert out.loss.item() == pytest.approx((2 * LN(2) - LN(0.8)) / 3 + 0.5 * LN(5 / 3) / 2, rel=1e-6)
    assert out.margin.item() == pytest.approx((LN(2) + LN(1.6)) / 2, rel=1e-6)


def test_orpo_reward_accuracy_counts_pairs_with_higher_chosen_odds() -> None:
    out = orpo_loss(_t(-1.0, -3.0), _t(1, 1), _t(-2.0, -2.0), _t(1, 1), _t(1.0, 3.0), _t(1, 1), lambda_or=1.0)
    assert out.reward_accuracy.item() == 0.5
    m = out.metrics()
    assert set(m) == {
        "loss", "nll", "or_loss", "logps/chosen", "logps/rejected", "log_odds_ratio", "reward_accuracy", "margin",
    }
    assert m["logps/chosen"] == pytest.approx(-2.0)
    assert m["margin"] == pytest.approx(0.0)


def test_orpo_lambda_zero_is_plain_nll() -> None:
    out = orpo_loss(_t(-3.0), _t(3), _t(-1.0), _t(2), _t(5.0), _t(4), lambda_or=0.0)
    assert out.loss.item() == pytest.approx(5.0 / 4)


def test_orpo_computes_in_fp32() -> None:
    bf = lambda *x: torch.tensor(x, dtype=torch.bfloat16)  # noqa: E731
    out = orpo_loss(bf(-2.0), bf(2), bf(-4.0), bf(2), bf(2.0), bf(2), lambda_or=0.1)
    assert out.loss.dtype == torch.float32 and out.log_odds_ratio.dtype == torch.float32


def test_orpo_rejects_empty_responses_and_bad_shapes() -> None:
    with pytest.raises(ValueError, match="chosen_tokens"):
        orpo_loss(_t(-1.0), _t(0), _t(-1.0), _t(1), _t(1.0), _t(1), lambda_or=0.1)
    with pytest.raises(ValueError, match="rejected_logp_sum"):
        orpo_loss(_t(-1.0, -1.0), _t(1, 1), _t(-1.0), _t(1), _t(1.0, 1.0), _t(1, 1), lambda_or=0.1)
    with pytest.raises(ValueError, match="1-D"):
        orpo_loss(torch.tensor(-1.0), _t(1), _t(-1.0), _t(1), _t(1.0), _t(1), lambda_or=0.1)


def test_orpo_does_not_clamp_a_certain_chosen_response() -> None:
    # l_w = 0 means p = 1: infinite log odds. Nothing is clamped; the training loop's non-finite check
    # must see it (here the loss itself stays finite, the log odds ratio does not).
    out = orpo_loss(_t(0.0), _t(1), _t(-1.0), _t(1), _t(0.0), _t(1), lambda_or=0.1)
    assert math.isinf(out.log_odds_ratio.item())


# ---------------------------------------------------------------------------------------------
# SFT


def test_sft_loss_is_a_token_mean() -> None:
    # example 1: 3 tokens, sum log p = -3; example 2: 1 token, log p = -5 -> (3 + 5) / 4 = 2
    assert sft_loss(_t(-3.0, -5.0), _t(3, 1)).item() == pytest.approx(2.0)
    with pytest.raises(ValueError):
        sft_loss(_t(-3.0), _t(0))


# ---------------------------------------------------------------------------------------------
# TRL's odds-ratio term


def _trl_odds_ratio_loss(beta: float, chosen: torch.Tensor, rejected: torch.Tensor):
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    class _Fake:  # only the attributes odds_ratio_loss reads
        accelerator = type("A", (), {"device": torch.device("cpu")})()

    fake = _Fake()
    fake.beta = beta
    return ORPOTrainer.odds_ratio_loss(fake, chosen, rejected)


def test_odds_ratio_term_matches_trl() -> None:
    g = torch.Generator().manual_seed(0)
    # mean log-probs from near 0 to very negative, both orders
    chosen = -torch.rand(64, generator=g) ** 3 * 30 - 1e-4
    rejected = -torch.rand(64, generator=g) ** 3 * 30 - 1e-4
    ones = torch.ones(64)
    beta = 0.25
    trl_losses, _, _, trl_mean_logsig, trl_mean_log_odds = _trl_odds_ratio_loss(beta, chosen, rejected)
    ours = orpo_loss(chosen, ones, rejected, ones, ones, ones, lambda_or=beta)
    # TRL: per-pair losses = beta * logsigmoid(ratio), total = nll - losses.mean(); its metric
    # "log_odds_ratio" is mean(logsigmoid(ratio)) and "log_odds_chosen" is mean(ratio).
    assert ours.or_loss.item() == pytest.approx(-trl_mean_logsig.item(), abs=1e-5)
    assert (beta * ours.or_loss).item() == pytest.approx(-trl_losses.mean().item(), abs=1e-5)
    assert ours.log_odds_ratio.mean().item() == pytest.approx(trl_mean_log_odds.item(), abs=1e-5)
    assert ours.loss.item() == pytest.approx(1.0 - trl_losses.mean().item(), abs=1e-5)


def test_lambda_is_applied_in_one_place_the_same_way_for_the_loss_the_step_and_the_log() -> None:
    """orpo_objective is what orpo_loss returns, what a one-micro-batch step backpropagates and what it
    logs: a change of the weighting in one of them would show here."""
    from orpo_distill.losses import orpo_objective
    from orpo_distill.training import MicroBatchOut, Share, step_loss, step_metrics

    out = orpo_loss(_t(-1.0, -3.0), _t(1, 1), _t(-2.0, -2.0), _t(1, 1), _t(1.0, 3.0), _t(1, 1), lambda_or=0.7)
    assert float(out.loss) == pytest.approx(float(out.nll) + 0.7 * float(out.or_loss))
    assert float(orpo_objective(out.nll, out.or_loss, 0.7)) == pytest.approx(float(out.loss))
    mb = MicroBatchOut(out.nll, out.or_loss, out.metrics(), 4)
    whole = Share(nll=1.0, pairs=1.0)
    assert float(step_loss(mb, whole, 0.7)) == pytest.approx(float(out.loss))
    assert step_metrics([(mb, whole)], "orpo", 0.7)["loss"] == pytest.approx(float(out.loss))


def test_nll_only_rows_count_in_the_nll_and_nowhere_else() -> None:
    """Two pairs as in the test above, plus an NLL-only row (chosen: two tokens at p = 0.5 and 0.25; its
    rejected sums are garbage and must be ignored). L_OR and the pair metrics are those of the two pairs;
    the NLL is the token mean over all five chosen tokens: (2 log 2 - log 0.8 + log 2 + log 4) / 5."""
    out = orpo_loss(
        _t(2 * LN(0.5), LN(0.8), LN(0.5) + LN(0.25)),
        _t(2, 1, 2),
        _t(2 * LN(0.25), LN(0.5), 123.0),
        _t(2, 1, 0),
        _t(2 * LN(2), -LN(0.8), LN(2) + LN(4)),
        _t(2, 1, 2),
        lambda_or=0.5,
        has_rejected=torch.tensor([True, True, False]),
    )
    nll = (2 * LN(2) - LN(0.8) + LN(2) + LN(4)) / 5
    assert out.log_odds_ratio.tolist() == pytest.approx([LN(3), LN(4)], rel=1e-6)
    assert out.or_loss.item() == pytest.approx(LN(5 / 3) / 2, rel=1e-6)
    assert out.nll.item() == pytest.approx(nll, rel=1e-6)
    assert out.loss.item() == pytest.approx(nll + 0.5 * LN(5 / 3) / 2, rel=1e-6)
    assert out.margin.item() == pytest.approx((LN(2) + LN(1.6)) / 2, rel=1e-6)
    assert out.metrics()["logps/chosen"] == pytest.approx((LN(0.5) + LN(0.8)) / 2, rel=1e-6)


def test_a_batch_of_nll_only_rows_is_plain_sft() -> None:
    """No pair at all: the odds-ratio term is 0, the loss is the token-mean NLL (what sft_loss gives on
    the same sums), its gradient flows, and the pair metrics are logged as 0."""
    chosen = torch.tensor([2 * LN(0.5), LN(0.25)], requires_grad=True)
    out = orpo_loss(chosen, _t(2, 1), _t(0.0, 0.0), _t(0, 0), -chosen, _t(2, 1), lambda_or=1.0,
                    has_rejected=torch.tensor([False, False]))
    assert out.or_loss.item() == 0.0
    assert out.loss.item() == pytest.approx(sft_loss(chosen, _t(2, 1)).item(), rel=1e-6)
    out.loss.backward()
    assert chosen.grad.tolist() == pytest.approx([-1 / 3, -1 / 3])
    m = out.metrics()
    assert m["or_loss"] == m["reward_accuracy"] == m["logps/rejected"] == 0.0 and m["nll"] == pytest.approx(out.loss.item())
    with pytest.raises(ValueError, match="has_rejected"):
        orpo_loss(chosen, _t(2, 1), _t(0.0, 0.0), _t(0, 0), -chosen, _t(2, 1), 1.0, has_rejected=torch.tensor([True]))
    with pytest.raises(ValueError, match="rejected_tokens"):
        orpo_loss(chosen, _t(2, 1), _t(0.0, 0.0), _t(0, 0), -chosen, _t(2, 1), 1.0, has_rejected=torch.tensor([True, False]))
