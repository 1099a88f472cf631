"""Attention for the packed layout, computed by segments instead of through a dense ``[T, T]`` mask.

A packed row is ``prompt | response_1 | ... | response_n | padding`` (``batching.collate_packed``): the
prompt attends to itself causally, each response to the whole prompt and to itself causally, a padding
position only to itself. SDPA given that as a dense boolean mask does all ``T x T`` query-key products
(and their backward), most of them masked: with a 150-token prompt and eight 100-token responses,
about four times what the row needs. Here the same attention is computed as

- the prompt: causal SDPA over its own ``P`` positions;
- the responses: one SDPA call over ``[n, L_max]`` queries whose keys are the prompt's ``P`` keys
  followed by the response's own (padded to ``L_max``), with a ``[L_max, P + L_max]`` mask that is
  the prompt in full and the response causally;
- padding: the value at the position itself (what attending only to itself gives).

The outputs are the same as the dense mask's up to the order of floating-point sums (tests compare
log-probabilities and gradients to 1e-5 in fp32). On a CPU the segments are computed in fp32 even under
bf16 autocast, the result cast back to autocast's dtype: there the flash kernel's bf16 backward was
found slower than its fp32 one at these sizes (2-core Xeon with AMX), so this is both faster and closer
to exact than the dense bf16 call it replaces; the step-level effect is measured by
``bench/profile_step.py`` (docs/benchmarks.md, "Issue 16").

How it is applied: :func:`segmented_attention` is a context manager put around the model's forward
(``forward.pair_logps_packed``). Inside it, the ``sdpa`` entry of transformers' attention registry
(``AttentionInterface``, the public way to provide an attention function) points to
:func:`_attention`, which computes by segments when the call is for the packed batch of the context
(same rows and width, no dropout, no attention bias, soft-capping or sliding window) and otherwise hands
the call to transformers' own SDPA function with the dense mask, which every call still receives; on
leaving, the registry is restored. So a model that does not go through the registry, or anything else
the segments do not cover, falls back to the dense mask, which gives the same result more slowly. Under
gradient checkpointing the caller does not enter the context at all: the backward recomputes each
layer after the context is left, and a recomputation must take the forward's path.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

RowSpans = Sequence[tuple[int, Sequence[int]]]  # per row: prompt length, the responses' lengths

_ROWS: contextvars.ContextVar[tuple[RowSpans, int] | None] = contextvars.ContextVar("packed_rows", default=None)


def _expand_kv(t: Tensor, heads: int) -> Tensor:
    """``[B, H_kv, T, D]`` keys or values repeated to the query's ``heads`` (grouped-query attention)."""
    groups = heads // t.shape[1]
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def _row_attention(q: Tensor, k: Tensor, v: Tensor, prompt: int, responses: Sequence[int], scale: float | None) -> Tensor:
    """One packed row: ``q, k, v [H, T, D]`` (keys already repeated to H heads) -> ``[H, T, D]``.

    Each response is gathered with one ``index_select`` and the outputs put back with another (slicing
    per response would cost a zero-filled copy of the whole row per slice in the backward)."""
    width, device = q.shape[1], q.device
    kp, vp = k[:, :prompt], v[:, :prompt]
    parts = [F.scaled_dot_product_attention(q[:, :prompt], kp, vp, is_causal=True, scale=scale)]
    if responses:
        n, longest = len(responses), max(responses)
        starts = [prompt + sum(responses[:j]) for j in range(n)]
        # each response's positions, padded by repeating its last one (masked out as keys, dropped as queries)
        index = torch.tensor([s + min(i, r - 1) for s, r in zip(starts, responses) for i in range(longest)],
                             device=device)

        def rows(t: Tensor) -> Tensor:  # [H, T, D] -> [n, H, L_max, D]
            return t.index_select(1, index).reshape(t.shape[0], n, longest, t.shape[2]).transpose(0, 1)

        lengths = torch.tensor(responses, device=device)
        own = torch.arange(longest, device=device)
        causal = own.unsqueeze(1) >= own.unsqueeze(0)  # [L, L]
        real = own.unsqueeze(0) < lengths.unsqueeze(1)  # [n, L]: a key position inside the response
        mask = torch.cat([torch.ones(n, longest, prompt, dtype=torch.bool, device=device),
                          causal.unsqueeze(0) & real.unsqueeze(1)], dim=2).unsqueeze(1)  # [n, 1, L, P + L]
        keys = torch.cat([kp.expand(n, -1, -1, -1), rows(k)], dim=2)
        values = torch.cat([vp.expand(n, -1, -1, -1), rows(v)], dim=2)
        out = F.scaled_dot_product_attention(rows(q), keys, values, attn_mask=mask, scale=scale)  # [n, H, L, D]
        taken = torch.tensor([j * longest + i for j, r in enumerate(responses) for i in range(r)], device=device)
        parts.append(out.transpose(0, 1).reshape(q.shape[0], n * longest, q.shape[2]).index_select(1, taken))
    used = prompt + sum(responses)
    if used < width:
        parts.append(v[:, used:])  # padding attends only to itself
    return torch.cat(parts, dim=1)


def segmented_sdpa(query: Tensor, key: Tensor, value: Tensor, rows: RowSpans, scale: float | None = None) -> Tensor:
    """Attention of packed rows by segments: ``query [B, H, T, D]``, ``key``/``value [B, H_kv, T, D]``
    -> ``[B, H, T, D]``, equal to SDPA with ``collate_packed``'s mask."""
    heads = query.shape[1]
    key, value = _expand_kv(key, heads), _expand_kv(value, heads)
    return torch.stack([_row_attention(query[b], key[b], value[b], prompt, list(responses), scale)
                        for b, (prompt, responses) in enumerate(rows)])


# keywords transformers passes to every attention call that do not change what it computes
_HARMLESS = frozenset({"position_ids", "use_cache", "output_hidden_states", "cache_position", "is_causal",
                       "return_dict", "logits_to_keep"})


def _covers(module: Any, query: Tensor, dropout: float, kwargs: dict[str, Any]) -> tuple[RowSpans, int] | None:
    ctx = _ROWS.get()
    if ctx is None:
        return None
    rows, width = ctx
    # anything beyond plain softmax attention (sinks, soft-capping, a bias, a sliding window, attention
    # weights asked for) arrives as a keyword not listed here, or set: left to the dense path
    extra = {k for k, v in kwargs.items() if k not in _HARMLESS and v is not None and v is not False}
    plain = dropout == 0.0 and not extra and getattr(module, "sliding_window", None) is None
    if not plain or query.shape[0] != len(rows) or query.shape[2] != width:
        return None
    return ctx


def _attention(module: Any, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
               dropout: float = 0.0, scaling: float | None = None, **kwargs: Any) -> tuple[Tensor, None]:
    """transformers' attention-function signature: by segments when the context's packed batch is the
    one being computed, else transformers' SDPA with the dense mask. Returns ``[B, T, H, D]``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    ctx = _covers(module, query, dropout, kwargs)
    if ctx is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    device = query.device.type
    if device == "cpu":  # fp32: the CPU flash kernel's bf16 backward is slower than its fp32 one at these sizes
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype
        with torch.autocast(device, enabled=False):
            out = segmented_sdpa(query.float(), key.float(), value.float(), ctx[0], scale=scaling).to(dtype)
    else:
        out = segmented_sdpa(query, key, value, ctx[0], scale=scaling)
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def segmented_attention(rows: RowSpans, width: int) -> Iterator[None]:
    """Within the block, a model's ``sdpa`` attention over this packed batch (``rows`` from
    ``collate_packed``'s ``row_spans``, ``width`` its ``T``) is computed by segments."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    previous = ALL_ATTENTION_FUNCTIONS["sdpa"]
    token = _ROWS.set((tuple((p, tuple(r)) for p, r in rows), width))
    ALL_ATTENTION_FUNCTIONS["sdpa"] = _attention
    try:
        yield
    finally:
        _ROWS.reset(token)
        ALL_ATTENTION_FUNCTIONS["sdpa"] = previous
