"""The record that flows between stages: one question with its gold answer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Record:
    """One question-answering example.

    ``id`` is stable across runs (it keys every trace, pair and prediction). ``choices`` is set for
    multiple-choice tasks (the answer is then a letter). ``meta`` carries loader-specific extras, such
    as the synthetic task's solution program that the scripted teacher reads.
    """

    id: str
    question: str
    answer: str
    choices: tuple[str, ...] | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "question": self.question, "answer": self.answer}
        if self.choices is not None:
            d["choices"] = list(self.choices)
        if self.meta:
            d["meta"] = self.meta
        return d
