"""Attention for the packed layout, computed by segments instead of through a dense ``[T, T]`` mask.

A packed row is ``prompt | response_1 | ... | response_n | padding`` (``batching.collate_packed``): the
prompt attends to itself causally, each response to the whole prompt and to itself causally, a padding
position only to itself. SDPA given that as a dense boolean mask does all ``T x T`` query-key products
(and their backward), most of them masked: with a 150-token prompt and eight 100-token responses,
about four times what the row needs. Here the same attention is computed as

- the prompts: one causal SDPA call over every row's prompt (padded to the longest, ``P``);
- the responses: one SDPA call over every response of the batch, ``[N, L_max]`` queries whose keys are
  their row's prompt keys followed by the response's own (padded to ``P + L_max``), with a
  ``[L_max, P + L_max]`` mask per response that is its row's prompt in full and the response causally;
- padding: the value at the position itself (what attending only to itself gives).

Each call reads its segments with one ``index_select`` per tensor, built once per forward (``_Plan``) and
shared by every layer; the backward of each is one zero-filled tensor and one ``index_add``.

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
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

RowSpans = Sequence[tuple[int, Sequence[int]]]  # per row: prompt length, the responses' lengths


@dataclass(frozen=True)
class _Plan:
    """Where every segment of one packed batch lies, as index tensors over its ``B * T`` flat positions.
    Built once per forward (the first layer) and read by every layer.

    - prompts: ``[B * P]``, row ``b``'s prompt positions padded to the longest prompt ``P`` by repeating
      its last one (a padded query is dropped; a padded key is never attended: it lies after every real
      query of the causal prompt);
    - responses: ``[N * L]``, every response of the batch padded to the longest ``L`` the same way, and
      their keys ``[N * (P + L)]``: the row's prompt, then the response itself;
    - ``mask``: ``[N, 1, L, P + L]``, the row's real prompt positions in full, the response causally;
    - ``padding``: the positions after each row's last response;
    - ``order``: ``[B * T]``, where each position's output lies in ``cat(prompts, responses, padding)``."""

    rows: int
    prompt: int
    responses: int
    response: int
    prompt_index: Tensor
    query_index: Tensor
    key_index: Tensor
    mask: Tensor
    padding: Tensor
    order: Tensor
    masks: dict[tuple[torch.device, torch.dtype], Tensor] = field(default_factory=dict)

    @staticmethod
    def build(rows: RowSpans, width: int, device: torch.device) -> "_Plan":
        longest_prompt = max(p for p, _ in rows)
        longest = max((r for _, rs in rows for r in rs), default=0)
        where: dict[int, int] = {}  # flat position -> index into cat(prompts, responses, padding)
        prompt_index, query_index, key_index, padding, mask_rows = [], [], [], [], []
        n = 0
        for b, (prompt, responses) in enumerate(rows):
            if prompt < 1 or min(responses, default=1) < 1:
                raise ValueError(f"packed row {b} has an empty prompt or response: {prompt}, {tuple(responses)}")
            base = b * width
            prompt_keys = [base + min(i, prompt - 1) for i in range(longest_prompt)]
            prompt_index += prompt_keys
            where.update((base + i, b * longest_prompt + i) for i in range(prompt))
            start = base + prompt
            for r in responses:
                own = [start + min(i, r - 1) for i in range(longest)]
                query_index += own
                key_index += prompt_keys + own
                where.update((start + i, len(rows) * longest_prompt + n * longest + i) for i in range(r))
                mask_rows.append((prompt, r))
                start += r
                n += 1
            padding += range(start, base + width)
        first_padding = len(rows) * longest_prompt + n * longest
        where.update((pos, first_padding + j) for j, pos in enumerate(padding))
        i = torch.arange(longest)
        causal = i.unsqueeze(1) >= i.unsqueeze(0)  # [L, L]
        mask = torch.zeros(n, longest, longest_prompt + longest, dtype=torch.bool)
        for j, (prompt, r) in enumerate(mask_rows):
            mask[j, :, :prompt] = True
            mask[j, :, longest_prompt:longest_prompt + r] = causal[:, :r]

        def index(values: list[int]) -> Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        return _Plan(len(rows), longest_prompt, n, longest, index(prompt_index), index(query_index),
                     index(key_index), mask.unsqueeze(1).to(device), index(padding),
                     index([where[pos] for pos in range(len(rows) * width)]))

    def additive_mask(self, like: Tensor) -> Tensor:
        """The response mask as SDPA's additive form in ``like``'s dtype (0 kept, -inf masked), made once
        per device and dtype instead of converted from booleans in every layer's call."""
        key = (like.device, like.dtype)
        if key not in self.masks:
            zero = torch.zeros((), dtype=like.dtype, device=like.device)
            self.masks[key] = torch.where(self.mask, zero, torch.tensor(float("-inf"), dtype=like.dtype,
                                                                        device=like.device))
        return self.masks[key]


def _segments(t: Tensor, index: Tensor, count: int, length: int) -> Tensor:
    """``t [B * T, H, D]`` gathered at ``index`` -> ``[count, H, length, D]`` (SDPA's layout)."""
    return t.index_select(0, index).view(count, length, t.shape[1], t.shape[2]).transpose(1, 2)


def _flat(t: Tensor) -> Tensor:
    """``[count, H, length, D]`` -> ``[count * length, H, D]``."""
    return t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3])


def _native_gqa(t: Tensor) -> bool:
    """Whether SDPA takes grouped keys as they are (``enable_gqa``): on a CPU, whose flash kernel does. On
    CUDA the memory-efficient kernel, the one that takes a mask, does not support ``enable_gqa`` (SDPA would
    fall back to the math kernel), so the keys are repeated to the query's heads there."""
    return t.device.type == "cpu"


def segmented_sdpa(query: Tensor, key: Tensor, value: Tensor, rows: RowSpans, scale: float | None = None,
                   plan: _Plan | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """Attention of packed rows by segments: ``query [B, H, T, D]``, ``key``/``value [B, H_kv, T, D]``
    -> ``[B, T, H, D]`` (transformers' output layout), equal to SDPA with ``collate_packed``'s mask.

    All rows go together: the inputs are laid out once as ``[B * T, heads, D]``; each of the two SDPA
    calls (the prompts; the responses against their prompt and themselves) reads its segments with one
    ``index_select`` per tensor, and one more puts the outputs back in order. The backward of an
    ``index_select`` is one zero-filled tensor and an ``index_add``, so the whole batch costs a few of
    those per layer where slicing every row and segment would cost a zero-filled copy per slice. On a CPU
    grouped keys and values stay at their own head count (SDPA's ``enable_gqa``). ``dtype``: compute in it (the
    inputs are cast while they are laid out, in the same copy); the output is in it too."""
    batch, heads, width, dim = query.shape
    plan = plan or _Plan.build(rows, width, query.device)
    # one copy at most per tensor: a cast lays it out contiguously, else reshape copies only if it must
    q, k, v = (t.transpose(1, 2).to(dtype or t.dtype, memory_format=torch.contiguous_format)
               .reshape(batch * width, t.shape[1], dim) for t in (query, key, value))
    groups = heads // key.shape[1]

    def attend(q_: Tensor, k_: Tensor, v_: Tensor, **kw: Any) -> Tensor:
        native = groups > 1 and _native_gqa(q_)
        if groups > 1 and not native:
            k_, v_ = k_.repeat_interleave(groups, dim=1), v_.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(q_, k_, v_, scale=scale, enable_gqa=native, **kw)

    parts = [_flat(attend(_segments(q, plan.prompt_index, plan.rows, plan.prompt),
                          _segments(k, plan.prompt_index, plan.rows, plan.prompt),
                          _segments(v, plan.prompt_index, plan.rows, plan.prompt), is_causal=True))]
    if plan.responses:
        keys = plan.prompt + plan.response
        parts.append(_flat(attend(_segments(q, plan.query_index, plan.responses, plan.response),
                                  _segments(k, plan.key_index, plan.responses, keys),
                                  _segments(v, plan.key_index, plan.responses, keys), attn_mask=plan.additive_mask(q))))
    if plan.padding.numel():  # padding attends only to itself: its value
        parts.append(v.index_select(0, plan.padding).repeat_interleave(groups, dim=1))
    return torch.cat(parts).index_select(0, plan.order).view(batch, width, heads, dim)


# keywords transformers passes to every attention call that do not change what it computes
_HARMLESS = frozenset({"position_ids", "use_cache", "output_hidden_states", "cache_position", "is_causal",
                       "return_dict", "logits_to_keep"})


@dataclass
class _Packed:
    """The packed batch a :func:`segmented_attention` block is for, and its plan per device."""

    rows: tuple[tuple[int, tuple[int, ...]], ...]
    width: int
    plans: dict[torch.device, _Plan] = field(default_factory=dict)

    def plan(self, device: torch.device) -> _Plan:
        if device not in self.plans:
            self.plans[device] = _Plan.build(self.rows, self.width, device)
        return self.plans[device]


_PACKED: contextvars.ContextVar[_Packed | None] = contextvars.ContextVar("packed_rows", default=None)


def _covers(module: Any, query: Tensor, dropout: float, kwargs: dict[str, Any]) -> _Packed | None:
    packed = _PACKED.get()
    if packed is None:
        return None
    # anything beyond plain softmax attention (sinks, soft-capping, a bias, a sliding window, attention
    # weights asked for) arrives as a keyword not listed here, or set: left to the dense path
    extra = {k for k, v in kwargs.items() if k not in _HARMLESS and v is not None and v is not False}
    plain = dropout == 0.0 and not extra and getattr(module, "sliding_window", None) is None
    if not plain or query.shape[0] != len(packed.rows) or query.shape[2] != packed.width:
        return None
    return packed


def _attention(module: Any, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
               dropout: float = 0.0, scaling: float | None = None, **kwargs: Any) -> tuple[Tensor, None]:
    """transformers' attention-function signature: by segments when the context's packed batch is the
    one being computed, else transformers' SDPA with the dense mask. Returns ``[B, T, H, D]``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    packed = _covers(module, query, dropout, kwargs)
    if packed is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    plan = packed.plan(query.device)
    device = query.device.type
    if device == "cpu":  # fp32: the CPU flash kernel's bf16 backward is slower than its fp32 one at these sizes
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype
        with torch.autocast(device, enabled=False):
            out = segmented_sdpa(query, key, value, packed.rows, scale=scaling, plan=plan, dtype=torch.float32)
        return out.to(dtype), None
    return segmented_sdpa(query, key, value, packed.rows, scale=scaling, plan=plan), None


@contextlib.contextmanager
def segmented_attention(rows: RowSpans, width: int) -> Iterator[None]:
    """Within the block, a model's ``sdpa`` attention over this packed batch (``rows`` from
    ``collate_packed``'s ``row_spans``, ``width`` its ``T``) is computed by segments."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    previous = ALL_ATTENTION_FUNCTIONS["sdpa"]
    token = _PACKED.set(_Packed(tuple((p, tuple(r)) for p, r in rows), width))
    ALL_ATTENTION_FUNCTIONS["sdpa"] = _attention
    try:
        yield
    finally:
        _PACKED.reset(token)
        ALL_ATTENTION_FUNCTIONS["sdpa"] = previous
