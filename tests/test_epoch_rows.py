"""The pairs stage as a pure function: no Run, no tokenizer, no files."""

from __future__ import annotations

from typing import Any

from orpo_distill.config import PairsConfig, TrainConfig
from orpo_distill.epoch_rows import chosen_texts, epoch_rows, examples_upper_bound, group_traces, largest_group
from orpo_distill.pairs import Negative
from orpo_distill.records import Record


def _trace(qid: str, sample: int, text: str, correct: bool) -> dict[str, Any]:
    return {"id": qid, "sample": sample, "text": text, "answer": "x", "correct": correct}


RECORDS = [Record(id=q, question=f"question {q}", answer="1") for q in ("a", "b", "c")]
TEACHER = group_traces([
    _trace("a", 1, "a right 2", True), _trace("a", 0, "a right 1", True), _trace("a", 2, "a wrong", False),
    _trace("b", 0, "b right", True),  # no teacher negative
    _trace("c", 0, "c wrong", False),  # no positive
])


def messages(r: Record) -> list[dict[str, str]]:
    return [{"role": "user", "content": r.question}]


def test_group_traces_orders_samples() -> None:
    assert [t["sample"] for t in TEACHER["a"]] == [0, 1, 2]


def test_every_positive_with_student_negatives_and_teacher_fallback() -> None:
    train = TrainConfig(method="orpo")
    pairs = PairsConfig(negatives="student", pairing="every_positive", no_negative="teacher")
    student = {"a": [], "b": [Negative("b student wrong", "student", 1)]}
    data = epoch_rows(RECORDS, messages, TEACHER, student, train, pairs, seed=0, epoch=1)
    assert (data.dropped_no_positive, data.dropped_no_negative, data.teacher_fallback) == (1, 0, 1)
    by_q = chosen_texts(data.rows)
    assert sorted(by_q["a"]) == ["a right 1", "a right 2"] and by_q["b"] == ["b right"]
    # a's negatives came from the teacher (fallback: the student had none), b's from the student
    assert {r["rejected_source"] for r in data.rows if r["id"] == "a"} == {"teacher"}
    assert [r["rejected"][0]["content"] for r in data.rows if r["id"] == "b"] == ["b student wrong"]
    assert all(r["prompt"] == messages(RECORDS[0]) for r in data.rows if r["id"] == "a")
    assert examples_upper_bound(TEACHER, ["a", "b"], train, pairs) == 3
    assert largest_group(TEACHER, ["a", "b"], train, pairs) == 2


def test_drop_leaves_out_questions_without_a_negative() -> None:
    train = TrainConfig(method="orpo")
    pairs = PairsConfig(negatives="student", pairing="every_positive", no_negative="drop")
    data = epoch_rows(RECORDS, messages, TEACHER, {}, train, pairs, seed=0, epoch=1)
    assert data.rows == [] and (data.dropped_no_positive, data.dropped_no_negative) == (1, 2)


def test_sft_rows_and_bounds() -> None:
    pairs = PairsConfig()
    for traces, expected in (("all", 3), ("single", 2)):
        train = TrainConfig(method="sft", traces=traces)
        data = epoch_rows(RECORDS, messages, TEACHER, {}, train, pairs, seed=0, epoch=1)
        assert len(data.rows) == expected and all("completion" in r for r in data.rows)
        assert examples_upper_bound(TEACHER, ["a", "b"], train, pairs) == expected
        assert largest_group(TEACHER, ["a", "b"], train, pairs) == 1


def test_the_same_seed_gives_the_same_rows_whatever_the_record_order() -> None:
    train = TrainConfig(method="orpo")
    pairs = PairsConfig(negatives="teacher", pairs_per_question=1, pairing="capped")
    one = epoch_rows(RECORDS, messages, TEACHER, {}, train, pairs, seed=3, epoch=2)
    other = epoch_rows(RECORDS[::-1], messages, TEACHER, {}, train, pairs, seed=3, epoch=2)
    assert sorted(map(str, one.rows)) == sorted(map(str, other.rows))


def test_nll_fallback_keeps_every_positive_as_an_nll_only_row() -> None:
    """pairs.no_negative: nll. Teacher negatives: b has none, so its positive trains on the NLL term alone
    (rejected None), and the chosen side covers exactly sft-diverse's positives; a list tries each in turn."""
    train = TrainConfig(method="orpo")
    sft = chosen_texts(epoch_rows(RECORDS, messages, TEACHER, {}, TrainConfig(method="sft", traces="all"),
                                  PairsConfig(), seed=0, epoch=1).rows)
    pairs = PairsConfig(negatives="teacher", pairing="every_positive", no_negative="nll")
    data = epoch_rows(RECORDS, messages, TEACHER, {}, train, pairs, seed=0, epoch=1)
    assert (data.dropped_no_negative, data.teacher_fallback, data.nll_only) == (0, 0, 1)
    b_rows = [r for r in data.rows if r["id"] == "b"]
    assert [(r["chosen"][0]["content"], r["rejected"], r["rejected_source"]) for r in b_rows] == [("b right", None, None)]
    assert {q: sorted(t) for q, t in chosen_texts(data.rows).items()} == {q: sorted(t) for q, t in sft.items()}
    # student negatives with [teacher, nll]: a has teacher negatives (fallback 1), b has none (fallback 2)
    chain = PairsConfig(negatives="student", pairing="every_positive", no_negative=["teacher", "nll"])
    data = epoch_rows(RECORDS, messages, TEACHER, {}, train, chain, seed=0, epoch=1)
    assert (data.dropped_no_negative, data.teacher_fallback, data.nll_only) == (0, 1, 1)
    assert {r["rejected_source"] for r in data.rows if r["id"] == "a"} == {"teacher"}
    # capped pairing: at most pairs_per_question NLL-only rows, in the pairing's order
    capped = PairsConfig(negatives="teacher", pairing="capped", pairs_per_question=1, no_negative="nll")
    many = group_traces([_trace("b", i, f"b right {i}", True) for i in range(3)])
    rows = epoch_rows(RECORDS[1:2], messages, many, {}, train, capped, seed=0, epoch=1).rows
    assert len(rows) == 1 and rows[0]["rejected"] is None
    assert PairsConfig(no_negative="drop").fallbacks == () and chain.fallbacks == ("teacher", "nll")
