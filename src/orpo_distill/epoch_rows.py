"""The pairs stage: what one epoch trains on, as rows in TRL's conversational format.

Pure: it takes the training records, the task's prompt builder, the verified teacher traces and the
student negatives of the epoch, and returns the rows of ``pairs/epoch_E.jsonl`` with what was left out.
The training stage writes them and tokenizes them; ``orpo-distill pairs`` writes epoch 1's alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from .config import PairsConfig, TrainConfig
from .pairs import (Negative, Trace, far_from_positives, make_pairs, nll_only_positives, pairs_for_every_positive,
                    positives, sft_targets, teacher_negatives)
from .records import Record

Messages = Callable[[Record], list[dict[str, str]]]  # the task's prompt, as chat messages
FirstError = Callable[[str, Record], "int | None"]  # the task's first_error(text, record): where a wrong step starts


@dataclass
class EpochData:
    rows: list[dict[str, Any]]  # what pairs/epoch_E.jsonl holds
    dropped_no_positive: int
    dropped_no_negative: int
    teacher_fallback: int = 0  # questions with no negative of the run's kind, paired with teacher negatives
    nll_only: int = 0  # questions with no negative whose positives train on the NLL term alone
    too_similar: int = 0  # negatives left out for their similarity to a positive (pairs.max_similarity)
    localised: int = 0  # pairs whose rejected side starts later, at a located first error (pairs.rejected_span)


def group_traces(rows: Sequence[Trace]) -> dict[str, list[Trace]]:
    """A store's rows by question id, each question's in sample order."""
    out: dict[str, list[Trace]] = {}
    for r in rows:
        out.setdefault(r["id"], []).append(r)
    for v in out.values():
        v.sort(key=lambda r: r["sample"])
    return out


def epoch_rows(records: Sequence[Record], messages: Messages, teacher: Mapping[str, Sequence[Trace]],
               student_negatives: Mapping[str, Sequence[Negative]], train: TrainConfig, pairs: PairsConfig,
               seed: int, epoch: int, first_error: FirstError | None = None,
               chosen_ref: Mapping[tuple[str, str], float] | None = None) -> EpochData:
    """The pairs (ORPO) or targets (SFT) of epoch ``epoch``.

    ``teacher``: each question's teacher traces; ``student_negatives``: each question's negatives from the
    negative buffer (used when ``pairs.negatives`` is student or both). ``seed`` is the run's seed; the
    pairing adds ``pairs.seed`` to it, so arms with the same seeds pick the same positives. A question
    whose pool is empty takes ``pairs.no_negative``'s fallbacks in turn; an NLL-only row has
    ``"rejected": None``. ``first_error`` (the task's, needed by ``pairs.rejected_span: first_error``)
    gives each rejected row a ``rejected_from``: the character offset its odds-ratio term starts at (None:
    the whole trace). ``chosen_ref`` (``train.protect_chosen``): each (question id, positive)'s mean
    log-probability when the term started, given to each pair row as ``chosen_ref_logp``. ``train`` is the epoch's (``Distiller.epoch_config``: an SFT stage's epochs are SFT on
    every correct trace)."""
    seed = pairs.seed + seed
    localise = pairs.rejected_span == "first_error" and train.method == "orpo"
    if localise and first_error is None:
        raise ValueError("pairs.rejected_span first_error needs the task's first_error")
    rows, no_pos, no_neg, fallback, nll_only, too_similar, localised = [], 0, 0, 0, 0, 0, 0
    for r in records:
        traces = teacher.get(r.id, [])
        pos = positives(traces)
        if not pos:
            no_pos += 1
            continue
        prompt = messages(r)
        if train.method == "sft":
            for text in sft_targets(r.id, pos, train.traces, seed):
                rows.append({"id": r.id, "prompt": prompt, "completion": [{"role": "assistant", "content": text}]})
            continue
        teacher_negs = teacher_negatives(traces)
        negs: list[Negative] = []
        if pairs.negatives in ("teacher", "both"):
            negs += teacher_negs
        if pairs.negatives in ("student", "both"):
            negs += student_negatives.get(r.id, [])
        negs, left_out = far_from_positives(negs, pos, pairs.max_similarity)
        too_similar += left_out
        if pairs.max_similarity is not None and not negs and pairs.negatives == "student" and "teacher" in pairs.fallbacks:
            teacher_negs, left_out = far_from_positives(teacher_negs, pos, pairs.max_similarity)
            too_similar += left_out
        n = None if pairs.pairing == "every_positive" else pairs.pairs_per_question
        chosen_rejected = _pairs(r.id, pos, negs, n, seed, epoch)
        for way in pairs.fallbacks if not negs else ():
            if way == "teacher" and teacher_negs:
                chosen_rejected, fallback = _pairs(r.id, pos, teacher_negs, n, seed, epoch), fallback + 1
                break
            if way == "nll":  # the positives its pairs would have used, on the NLL term alone
                chosen_rejected = [(p, None) for p in nll_only_positives(r.id, pos, n, seed, epoch)]
                nll_only += 1
                break
        if not chosen_rejected:
            no_neg += 1
        for chosen, neg in chosen_rejected:
            row = {
                "id": r.id,
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": None if neg is None else [{"role": "assistant", "content": neg.text}],
                "rejected_source": None if neg is None else neg.source,
                "rejected_epoch": None if neg is None else neg.epoch,
            }
            if chosen_ref is not None and neg is not None:
                row["chosen_ref_logp"] = chosen_ref[(r.id, chosen)]
            if localise and neg is not None:
                row["rejected_from"] = first_error(neg.text, r)  # type: ignore[misc]
                localised += bool(row["rejected_from"])  # an error at offset 0: the whole trace, as without
            rows.append(row)
    return EpochData(rows, no_pos, no_neg, fallback, nll_only, too_similar, localised)


def _pairs(qid: str, pos: Sequence[str], pool: Sequence[Negative], n: int | None, seed: int,
           epoch: int) -> list[tuple[str, Negative | None]]:
    """A question's (chosen, rejected) pairs: one per positive (``n`` None, ``every_positive``) or up to ``n``."""
    if n is None:
        return list(pairs_for_every_positive(qid, pos, pool, seed, epoch))
    return list(make_pairs(qid, pos, pool, n, seed, epoch))


def chosen_texts(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
    """The positives an epoch's rows train on, per question: the distinct chosen (ORPO) or target (SFT)
    texts. What ``comparison.md`` counts to show that arms saw the same positives."""
    out: dict[str, list[str]] = {}
    for row in rows:
        text = (row.get("chosen") or row.get("completion"))[0]["content"]
        texts = out.setdefault(row["id"], [])
        if text not in texts:
            texts.append(text)
    return out


def examples_upper_bound(teacher: Mapping[str, Sequence[Trace]], qids: Sequence[str], train: TrainConfig,
                         pairs: PairsConfig) -> int:
    """An upper bound on an epoch's examples (rows), for a learning-rate schedule that never runs past its
    end: the refresh changes the negatives, never the positives."""
    if train.method == "sft" and train.traces == "single":
        return len(qids)
    if train.method == "sft" or pairs.pairing == "every_positive":
        return sum(len(positives(teacher[q])) for q in qids)
    return len(qids) * pairs.pairs_per_question


def largest_group(teacher: Mapping[str, Sequence[Trace]], qids: Sequence[str], train: TrainConfig,
                  pairs: PairsConfig) -> int:
    """The most pairs one question can bring to a micro-batch (a question's pairs stay together, at most
    ``train.pairs_per_row`` of them in one row)."""
    if train.method != "orpo":
        return 1
    if pairs.pairing == "every_positive":
        most = max((len(positives(teacher[q])) for q in qids), default=1)
    else:
        most = pairs.pairs_per_question
    return min(most, train.pairs_per_row) if train.pairs_per_row else most
