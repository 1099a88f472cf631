"""Per-row seeded sampling (issue 12): the pure parts, and the hf generator's samples as a function of
(seed, question, sample index, weights) alone."""

from __future__ import annotations

import math

import pytest
import torch

from orpo_distill.generators.row_sampling import RowSeededSampler, nucleus_mask, row_uniform, sample_rows


def test_row_uniform_is_a_pure_function_in_the_open_interval():
    values = [row_uniform(seed, step) for seed in range(50) for step in range(50)]
    assert all(0.0 < u < 1.0 for u in values)
    assert row_uniform(7, 3) == row_uniform(7, 3)
    assert len(set(values)) == len(values)  # neighbouring seeds and steps give different numbers
    mean = sum(values) / len(values)
    assert abs(mean - 0.5) < 0.02  # 2500 draws: the standard error is 0.006


def test_inverse_cdf_on_a_hand_computed_distribution():
    # softmax(log [0.1, 0.2, 0.3, 0.4]) = [0.1, 0.2, 0.3, 0.4]; CDF 0.1, 0.3, 0.6, 1.0
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]])).repeat(5, 1)
    u = torch.tensor([0.05, 0.15, 0.31, 0.59, 0.99], dtype=torch.float64)
    assert sample_rows(logits, u, temperature=1.0).tolist() == [0, 1, 2, 2, 3]


def test_temperature_and_top_p_change_the_distribution_as_sampling_does():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    # top_p 0.5: the nucleus is {3 (0.4), 2 (0.3)}; the mass above token 2 is 0.4 < 0.5, above 1 is 0.7
    masked = nucleus_mask(logits, 0.5)
    assert torch.isinf(masked[0, :2]).all() and torch.isfinite(masked[0, 2:]).all()
    assert torch.isfinite(nucleus_mask(logits, 0.05)).sum() == 1  # the top token always stays
    assert torch.equal(nucleus_mask(logits, 1.0), logits)
    # the empirical distribution of many draws matches softmax(logits / T) restricted to the nucleus
    n = 20000
    u = torch.tensor([row_uniform(s, 0) for s in range(n)], dtype=torch.float64)
    for temperature, top_p in [(1.0, 1.0), (0.5, 1.0), (2.0, 0.8)]:
        idx = sample_rows(logits.repeat(n, 1), u, temperature, top_p)
        freq = torch.bincount(idx, minlength=4).double() / n
        expect = nucleus_mask(logits / temperature, top_p).double().softmax(-1)[0]
        assert torch.allclose(freq, expect, atol=0.015), (temperature, top_p, freq, expect)


def test_the_processor_leaves_only_the_chosen_token_and_uses_the_step_index():
    torch.manual_seed(0)
    scores = torch.randn(3, 50)
    sampler = RowSeededSampler([11, 12, 13], prompt_width=4, temperature=1.0)
    out = sampler(torch.zeros(3, 6, dtype=torch.long), scores)  # step 2
    chosen = out.argmax(-1)
    assert (torch.isfinite(out).sum(-1) == 1).all()
    u = torch.tensor([row_uniform(s, 2) for s in (11, 12, 13)], dtype=torch.float64)
    assert torch.equal(chosen, sample_rows(scores, u, 1.0))
    # a row's token depends on its own seed only: the same row alone gives the same token
    alone = RowSeededSampler([12], prompt_width=4, temperature=1.0)(torch.zeros(1, 6, dtype=torch.long), scores[1:2])
    assert alone.argmax(-1).item() == chosen[1].item()
    with pytest.raises(ValueError):
        RowSeededSampler([1], prompt_width=0, temperature=0.0)
    assert math.isfinite(row_uniform(2**70, 2**65))  # seeds beyond 64 bits are folded, not an error
