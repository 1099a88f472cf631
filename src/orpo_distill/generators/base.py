"""The generator protocol: every teacher and student sits behind ``generate(requests)``.

A request carries chat messages, not a rendered string, because how a prompt is rendered belongs to
the model behind the generator: a local model applies its own chat template (or plain text when it
has none), a chat endpoint takes the messages as they are, a completions endpoint gets plain text.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

Message = dict[str, str]


@dataclass(frozen=True)
class Request:
    """Ask for ``n`` samples for one question."""

    key: str  # the question id; generators that look traces up (replay, scripted) key on it
    messages: tuple[Message, ...]
    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int | None = None
    start: int = 0  # the question's index of the first sample asked for (what the store already holds)

    def sample_seed(self, j: int) -> int:
        """The seed of this request's ``j``-th sample: ``seed + j``. ``sampling.request_seed`` makes
        ``seed`` the seed of the question's first missing sample, so a sample's seed depends on
        (run seed, question id, sample index) alone, whatever batch, process or resume asked for it.
        Unseeded requests get a seed from their key, so they are reproducible too."""
        base = self.seed if self.seed is not None else zlib.crc32(self.key.encode())
        return base + j


@dataclass
class Sample:
    """One generated text. ``error`` is set (and ``text`` empty) when the request failed for good.

    ``text`` is the answer part (the final content). A reasoning model's server may send its reasoning
    apart from it (``reasoning``; None when there is none); the sampling stage decides what of the two the
    student trains on. ``num_tokens`` counts every generated token, reasoning included (the server's
    ``completion_tokens``); ``reasoning_tokens`` the reasoning's share of them; ``prompt_tokens`` this
    sample's share of the prompt the server billed (None when the server reported no usage).
    """

    text: str
    num_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    reasoning: str | None = None
    reasoning_tokens: int = 0
    prompt_tokens: int | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None


@dataclass
class GenerationStats:
    """Counters a generator keeps across calls, reported in the stage summary."""

    requests: int = 0
    samples: int = 0
    failed_requests: int = 0
    retries: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    extra: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0  # as the server reported them (0 where it reports no usage)
    reasoning_tokens: int = 0  # the part of completion_tokens spent reasoning


@runtime_checkable
class Generator(Protocol):
    """Returns, for each request, a list of samples (``n`` of them unless the request failed).

    A failed request yields fewer samples, or samples with ``error`` set; it never raises for a
    per-request failure. ``name`` identifies the generator and model in the trace store.
    """

    name: str
    stats: GenerationStats

    def generate(self, requests: Sequence[Request]) -> list[list[Sample]]: ...


def render_plain(messages: Sequence[Message]) -> str:
    """Plain-text rendering for models and endpoints without a chat template."""
    return "\n\n".join(m["content"].strip() for m in messages) + "\n\n"
