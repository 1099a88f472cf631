"""Preference pairs and the negative buffer with its mixed-policy refresh.

Everything here is pure: it takes traces as plain dicts (the rows of the trace stores) and returns new
values; the training stage does the sampling and the file I/O. Randomness comes from
``random.Random`` seeded by (run seed, epoch, question id), so results do not depend on the order in
which questions are processed or on how many processes share the work.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Mapping, Sequence

from .errors import UserError
from .text_similarity import closest, near_duplicates

Trace = Mapping[str, Any]  # a row of a trace store: id, sample, text, answer, correct, source, ...


def _rng(*parts: Any) -> random.Random:
    return random.Random(zlib.crc32("|".join(map(str, parts)).encode()))


# ---- negatives ------------------------------------------------------------------------------------


@dataclass
class Negative:
    text: str
    source: Literal["teacher", "student"]
    epoch: int = 0  # for student negatives: the epoch they were sampled before (1 = initial student)

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "source": self.source, "epoch": self.epoch}


def student_negatives(traces: Iterable[Trace], epoch: int, filter: str = "incorrect") -> list[Negative]:
    """The student's traces that count as negatives: the wrong ones (``incorrect``) or all (``any``)."""
    return [Negative(t["text"], "student", epoch) for t in traces if filter == "any" or not t["correct"]]


def teacher_negatives(traces: Iterable[Trace]) -> list[Negative]:
    return [Negative(t["text"], "teacher") for t in traces if not t["correct"]]


def positives(traces: Iterable[Trace]) -> list[str]:
    """Correct traces that ended on their own: one cut off at ``max_tokens`` may be "correct" only
    because an intermediate number matched, and would teach the student to stop mid-sentence."""
    return [t["text"] for t in traces if t["correct"] and t.get("finish_reason") != "length"]


def without_near_duplicates(traces: Sequence[Trace], threshold: float | None) -> tuple[list[Trace], int]:
    """A question's traces with near-duplicates discarded (``pairs.dedup_rouge_l``) and how many went.

    Correct and wrong traces are compared within their own kind: a wrong trace that shares most words
    with a correct one is a close negative, which pairing wants, not a duplicate. ``None``: all kept."""
    if threshold is None:
        return list(traces), 0
    drop: set[int] = set()
    for correct in (True, False):
        idx = [i for i, t in enumerate(traces) if bool(t["correct"]) == correct]
        drop.update(idx[j] for j in near_duplicates([traces[i]["text"] for i in idx], threshold))
    return [t for i, t in enumerate(traces) if i not in drop], len(drop)


def far_from_positives(negatives: Sequence[Negative], pos: Sequence[str],
                       threshold: float | None) -> tuple[list[Negative], int]:
    """The negatives whose ROUGE-L F with every positive of their question is at most ``threshold``
    (``pairs.max_similarity``), and how many were left out. ``None``: all kept."""
    if threshold is None:
        return list(negatives), 0
    kept = [n for n in negatives if closest(n.text, pos) <= threshold]
    return kept, len(negatives) - len(kept)


# ---- pairs ----------------------------------------------------------------------------------------


def make_pairs(
    qid: str, pos: Sequence[str], neg: Sequence[Negative], n: int, seed: int, epoch: int
) -> list[tuple[str, Negative]]:
    """Up to ``n`` (chosen, rejected) pairs for one question (``pairs.pairing: capped``).

    Positives are shuffled and cycled; negatives are shuffled and drawn without replacement, so a
    question yields ``min(n, len(neg))`` pairs (none without a positive or a negative).
    """
    if not pos or not neg:
        return []
    pos, neg = _shuffled(qid, pos, neg, seed, epoch)
    return [(pos[i % len(pos)], neg[i]) for i in range(min(n, len(neg)))]


def pairs_for_every_positive(
    qid: str, pos: Sequence[str], neg: Sequence[Negative], seed: int, epoch: int
) -> list[tuple[str, Negative]]:
    """One pair per positive (``pairs.pairing: every_positive``): the chosen side is exactly the
    question's positives, the set that SFT on all diverse traces trains on, so ORPO and SFT arms see the
    same positives. Negatives are shuffled and drawn without replacement while they last, then reused
    in the same order. None without a negative (see ``pairs.no_negative`` for the fallback)."""
    if not pos or not neg:
        return []
    pos, neg = _shuffled(qid, pos, neg, seed, epoch)
    return [(p, neg[i % len(neg)]) for i, p in enumerate(pos)]


def nll_only_positives(qid: str, pos: Sequence[str], n: int | None, seed: int, epoch: int) -> list[str]:
    """The positives a question with no negative trains on the NLL term alone (``pairs.no_negative: nll``):
    those its pairs would have used. ``n`` None (``every_positive``): every positive; a number
    (``capped``, ``pairs_per_question``): the first ``min(n, len(pos))`` in the pairing's shuffled order."""
    shuffled, _ = _shuffled(qid, pos, [], seed, epoch)
    return shuffled if n is None else shuffled[:n]


def _shuffled(qid: str, pos: Sequence[str], neg: Sequence[Negative], seed: int,
              epoch: int) -> tuple[list[str], list[Negative]]:
    """Copies of a question's positives and negatives in the order (seed, epoch, question) gives."""
    rng = _rng(seed, epoch, qid)
    pos, neg = list(pos), list(neg)
    rng.shuffle(pos)
    rng.shuffle(neg)
    return pos, neg


def sft_targets(qid: str, pos: Sequence[str], traces: Literal["single", "all"], seed: int) -> list[str]:
    """SFT targets: one teacher positive per question (plain CoT distillation) or all of them."""
    if not pos:
        return []
    if traces == "all":
        return list(pos)
    return [pos[_rng(seed, "sft", qid).randrange(len(pos))]]


# ---- the mixed-policy negative buffer --------------------------------------------------------------


def phi_for_epoch(epoch: int, epochs: int, phi: float | Sequence[float], linear: bool = False) -> float:
    """The share of questions whose student negatives are regenerated before ``epoch`` (>= 2; epoch 1
    trains on the initial student's negatives, so it is 0 there).

    ``phi`` a number: that share at every refresh (0 off-policy, 1 on-policy, between mixed). A
    sequence: one value per refresh (index 0 is the refresh before epoch 2). ``linear``: ``phi`` is
    (start, end), ramped from start before epoch 2 to end before the last epoch.
    """
    if epoch < 2:
        return 0.0
    if linear:
        start, end = phi  # type: ignore[misc]
        if epochs <= 2:
            return float(end)
        return start + (epoch - 2) / (epochs - 2) * (end - start)
    if isinstance(phi, (int, float)):
        return float(phi)
    if epoch - 2 >= len(phi):
        raise UserError(f"train.phi lists {len(phi)} values, but epoch {epoch} needs value {epoch - 1} "
                        f"(one per refresh, epochs 2..{epochs})")
    return float(phi[epoch - 2])


def choose_refresh(qids: Sequence[str], phi: float, seed: int, epoch: int) -> list[str]:
    """Exactly ``round(phi * len(qids))`` question ids, drawn with the run's seed, in input order."""
    k = int(round(phi * len(qids)))
    chosen = set(_rng(seed, "refresh", epoch).sample(sorted(qids), k))
    return [q for q in qids if q in chosen]


@dataclass
class RefreshResult:
    refreshed: int = 0  # questions whose negatives were replaced by the current student's
    all_correct: int = 0  # refreshed questions where the current student got every sample right
    fell_back_to_teacher: int = 0


@dataclass
class NegativeBuffer:
    """Student negatives per question id; refreshed in part before each epoch after the first."""

    negatives: dict[str, list[Negative]] = field(default_factory=dict)

    @classmethod
    def from_traces(cls, traces_by_qid: Mapping[str, Sequence[Trace]], epoch: int, filter: str) -> "NegativeBuffer":
        return cls({q: student_negatives(t, epoch, filter) for q, t in traces_by_qid.items()})

    def refresh(
        self,
        new_traces: Mapping[str, Sequence[Trace]],
        epoch: int,
        filter: str,
        when_all_correct: str = "keep",
        teacher_negs: Mapping[str, Sequence[Negative]] | None = None,
        anchor: Mapping[str, Sequence[Negative]] | None = None,
    ) -> RefreshResult:
        """Replace the negatives of the questions in ``new_traces`` with the new student samples.

        ``anchor`` (``train.unrefreshed: initial``, the paper's mixed policy): every question not
        resampled now returns to these negatives (the initial student's) instead of keeping what it
        trained on last epoch. A question whose new samples hold no negative keeps its unrefreshed
        negatives (the anchor's, or the old ones without one: ``keep``) or takes the teacher's
        (``teacher``); either way it is counted in ``all_correct``.
        """
        result = RefreshResult()
        if anchor is not None:
            for qid in self.negatives:
                if qid not in new_traces:
                    self.negatives[qid] = list(anchor.get(qid, []))
        for qid, traces in new_traces.items():
            fresh = student_negatives(traces, epoch, filter)
            if fresh:
                self.negatives[qid] = fresh
                result.refreshed += 1
                continue
            result.all_correct += 1
            if when_all_correct == "teacher" and teacher_negs and teacher_negs.get(qid):
                self.negatives[qid] = list(teacher_negs[qid])
                result.fell_back_to_teacher += 1
            elif anchor is not None:
                self.negatives[qid] = list(anchor.get(qid, []))
        return result

    def to_dict(self) -> dict[str, Any]:
        return {q: [n.to_dict() for n in negs] for q, negs in self.negatives.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "NegativeBuffer":
        return cls({q: [Negative(**n) for n in negs] for q, negs in d.items()})
