"""Train/eval splitting shared by every loader.

A split must not depend on file order or on the size caps, so that changing ``train_size`` never moves
a question from the held-out set into training: records are ranked by a hash of (seed, id), not shuffled
in place, and the caps are applied after the split.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

from ..errors import UserError
from ..records import Record


def stable_rank(seed: int, key: str) -> str:
    """A seeded, platform-independent sort key (Python's ``hash`` is salted per process)."""
    return hashlib.sha256(f"{seed}:{key}".encode("utf-8")).hexdigest()


def question_id(question: str, prefix: str = "q") -> str:
    """A stable id for a row that has none: the same question text always gets the same id."""
    return f"{prefix}-{hashlib.sha1(question.encode('utf-8')).hexdigest()[:12]}"


def split_by_fraction(records: Sequence[Record], eval_fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Hold out ``round(n * eval_fraction)`` records (at least one when n >= 2), chosen by seeded rank.

    Both parts keep the source order, so a cap later takes the first rows of the file.
    """
    n = len(records)
    n_eval = round(n * eval_fraction)
    if n >= 2:
        n_eval = min(max(n_eval, 1), n - 1)
    held = {r.id for r in sorted(records, key=lambda r: stable_rank(seed, r.id))[:n_eval]}
    return [r for r in records if r.id not in held], [r for r in records if r.id in held]


def cap(records: list[Record], size: int | None) -> list[Record]:
    return records if size is None else records[:size]


def ensure_disjoint(train: Sequence[Record], eval_: Sequence[Record]) -> None:
    """Refuse a train and eval set that share an id: every trace and prediction is keyed by id.

    Loaders put ``meta["source"]`` (file:line) on records, so the message can point at both rows.
    """
    first_seen = {r.id: r for r in train}
    for r in eval_:
        if r.id in first_seen:
            a, b = first_seen[r.id].meta.get("source"), r.meta.get("source")
            where = f" (training: {a}; evaluation: {b})" if a and b else ""
            raise UserError(
                f"dataset: id '{r.id}' appears in both the training and the evaluation data{where}; "
                "ids must be unique across splits"
            )
