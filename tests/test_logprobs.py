"""Chunked log-probabilities equal the full-logits reference, in values and gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from orpo_distill.logprobs import target_logprobs, token_logprobs, token_logprobs_from_logits

B, T, H, V = 3, 7, 16, 50


def _inputs(seed: int = 0, bias: bool = False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    weight = (torch.randn(V, H, generator=g) * 0.5).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.1).requires_grad_() if bias else None
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.3] = -100  # ignored positions
    labels[1, :4] = -100  # a "prompt"
    return hidden, weight, b, labels


def _grads(loss: torch.Tensor, *ts: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, ts))


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 1000])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_equals_full_logits_values_and_gradients(chunk_size: int, bias: bool) -> None:
    hidden, weight, b, labels = _inputs(bias=bias)
    ref = token_logprobs_from_logits(nn.functional.linear(hidden, weight, b), labels)
    got = token_logprobs(hidden, weight, labels, chunk_size=chunk_size, bias=b)
    assert got.dtype == torch.float32 and got.shape == (B, T)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # a weighted sum so every position's gradient matters
    w = torch.randn(B, T, generator=torch.Generator().manual_seed(1))
    params = (hidden, weight) + ((b,) if bias else ())
    for g_got, g_ref in zip(_grads((got * w).sum(), *params), _grads((ref * w).sum(), *params)):
        torch.testing.assert_close(g_got, g_ref, rtol=1e-5, atol=1e-5)


def test_reference_matches_a_direct_log_softmax() -> None:
    hidden, weight, _, labels = _inputs()
    logits = hidden @ weight.T
    ref = token_logprobs_from_logits(logits, labels)
    # position t is predicted by position t - 1
    checked = [(b, t) for b in range(B) for t in range(1, T) if labels[b, t] != -100]
    assert len(checked) >= 5
    for b, t in checked:
        expected = torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]]
        assert ref[b, t].item() == pytest.approx(expected.item(), rel=1e-6)


def test_ignored_and_first_positions_are_zero_and_get_no_gradient() -> None:
    hidden, weight, _, labels = _inputs()
    labels[:, 0] = 3  # a label at t = 0 has no predictor and is ignored
    got = token_logprobs(hidden, weight, labels, chunk_size=2)
    assert (got[:, 0] == 0).all()
    assert (got[:, 1:][labels[:, 1:] == -100] == 0).all()
    assert (got[:, 1:][labels[:, 1:] != -100] < 0).all()
    (g_hidden,) = torch.autograd.grad(got.sum(), hidden)
    # the last position predicts nothing; a position whose next label is ignored gets no gradient
    assert (g_hidden[:, -1] == 0).all()
    unused = torch.cat([labels[:, 1:] == -100, torch.ones(B, 1, dtype=torch.bool)], dim=1)
    assert (g_hidden[unused] == 0).all()


def test_projection_never_sees_more_than_chunk_size_rows_forward_or_backward() -> None:
    hidden, weight, _, labels = _inputs()
    seen: list[int] = []

    def head(h: torch.Tensor) -> torch.Tensor:
        seen.append(h.shape[0])
        return h @ weight.T

    got = token_logprobs(hidden, head, labels, chunk_size=4)
    n_forward = len(seen)
    got.sum().backward()
    assert max(seen) <= 4
    assert len(seen) == 2 * n_forward  # backward recomputed each chunk (checkpointing), one at a time
    assert hidden.grad is not None and weight.grad is not None


def test_no_grad_skips_recomputation() -> None:
    hidden, weight, _, labels = _inputs()
    with torch.no_grad():
        got = token_logprobs(hidden, weight, labels, chunk_size=2)
    assert not got.requires_grad


def test_target_logprobs_rejects_out_of_vocab_ids() -> None:
    hidden, weight, _, _ = _inputs()
    with pytest.raises(ValueError, match="0, 50"):
        target_logprobs(hidden[0], weight, torch.tensor([1, 2, 3, 4, 5, 6, 50]))


def test_bf16_autocast_still_returns_fp32() -> None:
    hidden, weight, _, labels = _inputs()
    ref = token_logprobs(hidden, weight, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = token_logprobs(hidden, weight, labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=0.05, atol=0.1)


# ---- the fused head (logprobs._FusedHeadLogprobs): the default with gradients for a weight head ----


@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
def test_fused_head_equals_the_checkpointed_path_and_the_full_logits(chunk_size: int) -> None:
    hidden, weight, _, labels = _inputs(seed=2)
    ref = token_logprobs_from_logits(hidden @ weight.T, labels)
    fused = token_logprobs(hidden, weight, labels, chunk_size=chunk_size)
    plain = token_logprobs(hidden, weight, labels, chunk_size=chunk_size, fused=False)
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
    w = torch.randn(B, T, generator=torch.Generator().manual_seed(3))
    g_ref = _grads((ref * w).sum(), hidden, weight)
    for got in (fused, plain):
        for g, r in zip(_grads((got * w).sum(), hidden, weight), g_ref):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_fused_head_passes_gradcheck_in_float64() -> None:
    from orpo_distill.logprobs import _FusedHeadLogprobs

    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(9, 6, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.tensor([0, 8, 3, 3, 5])
    assert torch.autograd.gradcheck(lambda h, w: _FusedHeadLogprobs.apply(h, w, targets, torch.float64).double(),
                                    (hidden, weight))


def test_fused_head_keeps_no_vocabulary_sized_tensor_for_the_backward() -> None:
    hidden, weight, _, labels = _inputs()
    n = int((labels[:, 1:] != -100).sum())
    saved: list[tuple[int, ...]] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        token_logprobs(hidden, weight, labels)
    assert saved and (n, V) not in saved and all(s[-1] != V for s in saved)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        token_logprobs_from_logits(hidden @ weight.T, labels)
    assert any(s[-1] == V for s in saved)  # the check can see one: the full-logits path keeps them


def test_fused_head_under_bf16_autocast_matches_the_checkpointed_path() -> None:
    """Both project in bf16 (autocast's dtype) and take the softmax in fp32: same values, and gradients
    to bf16 rounding, returned in the parameters' fp32."""
    hidden, weight, _, labels = _inputs(seed=5)
    w = torch.randn(B, T, generator=torch.Generator().manual_seed(6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = token_logprobs(hidden, weight, labels)
        plain = token_logprobs(hidden, weight, labels, fused=False)
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
    gf, gp = _grads((fused * w).sum(), hidden, weight), _grads((plain * w).sum(), hidden, weight)
    for a, b in zip(gf, gp):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
