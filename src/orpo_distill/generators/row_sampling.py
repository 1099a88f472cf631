"""Per-row seeded sampling: a sampled token depends on its row's key and the model's logits, nothing else.

Why: ``model.generate(do_sample=True)`` draws every row of a batch from one global RNG stream, so a
sample depends on which other rows shared its batch, on the batch size, on how many processes split the
work and on where a killed run resumed. Here each row carries its own seed (the request's seed plus the
sample index, see ``sampling.request_seed``), and at decoding step ``t`` it draws one uniform number
``u = hash(seed, t)`` from a counter-based hash: no RNG state at all, so nothing can leak between rows.
The token is the inverse CDF of the (temperature-scaled, nucleus-truncated) distribution at ``u``: an
exact sample from the distribution that ``do_sample=True`` would use.

The sampler is a ``LogitsProcessor`` that leaves ``-inf`` everywhere but on the chosen token, and
generation runs greedy (``do_sample=False``), so every other part of ``generate`` (KV cache, EOS
handling, stopping) is transformers' own.

Exactness: in fp32 the logits of a row do not depend on its batch, so the samples are identical at any
batch size. Under bf16 autocast some kernels round differently with the batch shape; a token flips only
where ``u`` falls within that rounding of a CDF boundary (docs/benchmarks.md measures how often).
"""

from __future__ import annotations

from typing import Sequence

import torch

_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """SplitMix64's finaliser: a bijection on 64-bit integers whose output bits all depend on every input bit."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def row_uniform(seed: int, step: int) -> float:
    """A uniform number in (0, 1), a pure function of (row seed, decoding step)."""
    bits = _mix64(_mix64(seed & _MASK64) ^ (step & _MASK64)) >> 11  # 53 random bits
    return (bits + 0.5) / float(1 << 53)


def nucleus_mask(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """``logits`` with every token outside the top-``p`` nucleus set to ``-inf`` (the top token always
    stays): the smallest set of most likely tokens whose probability reaches ``top_p``."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # the mass of the tokens ranked above each one
    drop_sorted = before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_rows(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """One token id per row: the inverse CDF of softmax(logits / temperature), nucleus-truncated, at
    ``uniforms`` (one number in (0, 1) per row). Pure; float64 CDF so that rounding cannot skip a token."""
    scaled = nucleus_mask(logits.float() / temperature, top_p)
    probs = scaled.double().softmax(dim=-1)
    cdf = probs.cumsum(dim=-1)
    target = uniforms.to(device=cdf.device, dtype=cdf.dtype).unsqueeze(-1) * cdf[:, -1:]
    idx = torch.searchsorted(cdf, target).clamp_(max=logits.shape[-1] - 1)
    return idx.squeeze(-1)


class RowSeededSampler:
    """A transformers ``LogitsProcessor`` that samples each row from its own seed (see module docstring).

    ``seeds[r]`` is row ``r``'s seed; ``prompt_width`` the (left-padded) prompt length of the batch, so
    that ``input_ids.shape[1] - prompt_width`` is the index of the token being chosen.
    """

    def __init__(self, seeds: Sequence[int], prompt_width: int, temperature: float, top_p: float = 1.0):
        if temperature <= 0:
            raise ValueError("RowSeededSampler samples; temperature 0 is greedy decoding and needs no sampler")
        self.seeds = list(seeds)
        self.prompt_width = prompt_width
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_width
        u = torch.tensor([row_uniform(s, step) for s in self.seeds], dtype=torch.float64)
        chosen = sample_rows(scores, u, self.temperature, self.top_p).to(scores.device)
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, chosen.unsqueeze(-1), 0.0)
        return out
