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


# ---- ROUGE-L and near-duplicate rejection (the paper's diversity filter) ---------------------------

_ROUGE_SPLIT = re.compile(r"[^a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """The tokens ROUGE-L compares, as the ``rouge-score`` package makes them without stemming:
    lower-cased runs of ASCII letters and digits (everything else separates)."""
    return [t for t in _ROUGE_SPLIT.split(text.lower()) if t]


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists, bit-parallel (Allison and Dix 1986;
    Hyyro 2004): one big-integer step per token of ``b`` instead of a len(a) x len(b) table, so a
    question's eight 150-token traces compare in microseconds."""
    if not a or not b:
        return 0
    match: dict[str, int] = {}
    for i, tok in enumerate(a):
        match[tok] = match.get(tok, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for tok in b:
        u = v & match.get(tok, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F-measure of two texts (symmetric): 2PR/(P+R) with P, R the LCS over each text's length.
    0.0 when either text has no token."""
    return _rouge_tokens_f(rouge_tokens(a), rouge_tokens(b))


def near_duplicates(texts: Sequence[str], threshold: float) -> list[int]:
    """Indices of the texts to discard, in order: a text whose ROUGE-L with a text already kept exceeds
    ``threshold`` (the first of a group is kept). The paper's rejection of near-identical samples
    (threshold 0.8), which keeps K samples from counting one reasoning path K times."""
    kept: list[list[str]] = []
    dropped: list[int] = []
    for i, text in enumerate(texts):
        toks = rouge_tokens(text)
        if any(_rouge_tokens_f(toks, k) > threshold for k in kept):
            dropped.append(i)
        else:
            kept.append(toks)
    return dropped


def _rouge_tokens_f(ta: Sequence[str], tb: Sequence[str]) -> float:
    """2PR/(P+R) with P = lcs/len(ta), R = lcs/len(tb), which is 2 lcs / (len(ta) + len(tb))."""
    lcs = lcs_length(ta, tb)
    return 0.0 if lcs == 0 else 2 * lcs / (len(ta) + len(tb))


def closest(text: str, others: Sequence[str]) -> float:
    """The highest ROUGE-L F of ``text`` with any of ``others`` (0.0 when there are none)."""
    toks = rouge_tokens(text)
    return max((_rouge_tokens_f(toks, rouge_tokens(o)) for o in others), default=0.0)
