"""How alike two texts are, word by word: the teacher traces' diversity (report) and how close an
epoch's negatives are to the positives they are paired with (the ``pairs`` event). Pure functions."""

from __future__ import annotations

import difflib
import itertools
import math
import re
from typing import Any, Mapping, Sequence

_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Lower-cased words and punctuation marks, in order."""
    return _WORD.findall(text.lower())


def similarity(a: str, b: str) -> float:
    """difflib's ratio on words: 2 x matching words / total words (1.0 the same words, 0.0 none shared)."""
    return difflib.SequenceMatcher(None, words(a), words(b), autojunk=False).ratio()


def mean_pairwise_similarity(texts: Sequence[str]) -> float:
    """Mean :func:`similarity` over all pairs of ``texts``."""
    sims = [similarity(a, b) for a, b in itertools.combinations(texts, 2)]
    return sum(sims) / len(sims) if sims else math.nan


def pair_similarity(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """How close an epoch's rejected responses are to their chosen ones: the mean :func:`similarity` over
    the rows with a rejected side, overall (``all``) and per kind of negative (``student@E``: sampled from
    the student as it was before epoch E; ``teacher``: a wrong teacher trace). Negatives far from the
    positive (a different style, an early stop) are told apart at once and the odds-ratio term saturates;
    negatives that share most words with the positive make it push on those shared words. Empty when no
    row has a rejected side (SFT, NLL-only rows)."""
    groups: dict[str, list[float]] = {}
    for row in rows:
        if not row.get("rejected"):
            continue
        s = similarity(row["chosen"][0]["content"], row["rejected"][0]["content"])
        source = row.get("rejected_source") or "unknown"
        kind = f"{source}@{row['rejected_epoch']}" if source == "student" and row.get("rejected_epoch") else source
        for key in ("all", kind):
            groups.setdefault(key, []).append(s)
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}
