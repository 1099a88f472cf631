"""Evaluation figures: Wilson interval, paired bootstrap, majority vote, and evaluate() on a fake generator."""

from __future__ import annotations

from typing import Sequence

import pytest

from orpo_distill.evaluation import EvalSummary, evaluate, majority, paired_bootstrap_diff, wilson_interval
from orpo_distill.generators.base import GenerationStats, Request, Sample
from orpo_distill.records import Record
from orpo_distill.tasks import build_task


# Newcombe (1998), "Two-sided confidence intervals for the single proportion", Table I, method 3 (Wilson).
@pytest.mark.parametrize("correct, n, lo, hi", [
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0, 0.1611),
    (1, 29, 0.0061, 0.1718),
    (5, 10, 0.2366, 0.7634),
])
def test_wilson_interval_known_values(correct: int, n: int, lo: float, hi: float) -> None:
    got = wilson_interval(correct, n)
    assert got == pytest.approx((lo, hi), abs=6e-5)


def test_wilson_interval_edges() -> None:
    assert wilson_interval(0, 0) == (0.0, 0.0)
    lo, hi = wilson_interval(20, 20)
    assert hi == pytest.approx(1.0) and hi <= 1.0
    assert lo == pytest.approx(1 - 0.1611, abs=6e-5)  # symmetric to 0/20
    lo, hi = wilson_interval(0, 5)
    assert lo == 0.0 and 0 < hi < 1


def test_paired_bootstrap_diff() -> None:
    before = [False] * 10 + [True] * 10
    after = [True] * 20
    diff, lo, hi = paired_bootstrap_diff(before, after, iters=2000, seed=0)
    assert diff == pytest.approx(0.5)
    assert 0.2 < lo < 0.5 < hi <= 0.8
    assert paired_bootstrap_diff(before, after, seed=0) == (diff, lo, hi)  # seeded
    # identical results: no change and a zero-width interval
    assert paired_bootstrap_diff(after, after) == (0.0, 0.0, 0.0)
    # a uniform gain on every question has no sampling noise
    assert paired_bootstrap_diff([False] * 7, [True] * 7) == pytest.approx((1.0, 1.0, 1.0))
    assert paired_bootstrap_diff([], []) == (0.0, 0.0, 0.0)
    d, lo, hi = paired_bootstrap_diff(after, before)
    assert d == pytest.approx(-0.5) and lo <= d <= hi < 0
    with pytest.raises(AssertionError):
        paired_bootstrap_diff([True], [True, False])


def test_majority_vote() -> None:
    assert majority(["A", "B", "B", None]) == "B"
    assert majority(["A", "B", "B", "A"]) == "A"  # ties: the one seen first
    assert majority(["C", None, "D", "D", "C"]) == "C"
    assert majority([None, None]) is None
    assert majority([]) is None


class FakeGenerator:
    """Greedy requests get ``greedy[key]``; sampled ones get ``sampled[key]`` (n texts). Records every request."""

    name = "fake"

    def __init__(self, greedy: dict[str, str | None], sampled: dict[str, list[str]] | None = None):
        self.greedy = greedy
        self.sampled = sampled or {}
        self.stats = GenerationStats()
        self.requests: list[Request] = []

    def generate(self, requests: Sequence[Request]) -> list[list[Sample]]:
        out = []
        for r in requests:
            self.requests.append(r)
            if r.temperature == 0:
                text = self.greedy[r.key]
                if text is None:  # the request failed for good
                    self.stats.failed_requests += 1
                    out.append([Sample(text="", error="HTTP 500")])
                else:
                    out.append([Sample(text=text, num_tokens=len(text.split()), finish_reason="stop")])
            else:
                texts = self.sampled[r.key]
                assert len(texts) == r.n
                out.append([Sample(text=t, num_tokens=len(t.split())) for t in texts])
        return out


RECORDS = [
    Record(id="a", question="1+1?", answer="2"),
    Record(id="b", question="2+2?", answer="4"),
    Record(id="c", question="3+3?", answer="6"),
    Record(id="d", question="4+4?", answer="8"),
]


def test_evaluate_counts_accuracy_parse_failures_and_length() -> None:
    task = build_task("numeric")
    gen = FakeGenerator({
        "a": "one plus one is 2. The answer is 2.",  # correct, 9 tokens
        "b": "I do not know.",  # parse failure, 4 tokens
        "c": "The answer is 7.",  # wrong, 4 tokens
        "d": None,  # failed request
    })
    rows, s = evaluate(RECORDS, task, gen, max_tokens=32)
    assert [r["id"] for r in rows] == ["a", "b", "c", "d"]
    assert [r["correct"] for r in rows] == [True, False, False, False]
    assert [r["prediction"] for r in rows] == ["2", None, "7", None]
    assert [r["gold"] for r in rows] == ["2", "4", "6", "8"]
    assert rows[3]["failed"] and rows[3]["num_tokens"] == 0
    assert s.n == 4 and s.correct == 1 and s.accuracy == 0.25
    assert s.parse_failures == 2 and s.parse_failure_rate == 0.5  # "b" and the failed "d"
    assert s.mean_length == pytest.approx((9 + 4 + 4 + 0) / 4)  # a failed request counts 0 tokens
    assert s.failed_requests == 1
    assert s.ci95 == wilson_interval(1, 4)
    assert s.self_consistency_k == 0 and s.self_consistency_accuracy is None
    # greedy, with the task's prompt and the asked length
    assert all(r.temperature == 0 and r.n == 1 and r.max_tokens == 32 for r in gen.requests)
    assert gen.requests[0].messages == tuple(task.messages(RECORDS[0]))
    assert EvalSummary.from_dict({**s.as_dict(), "epoch": 3}) == s


def test_evaluate_self_consistency_is_a_majority_vote() -> None:
    task = build_task("numeric")
    gen = FakeGenerator(
        {"a": "The answer is 3.", "b": "The answer is 4.", "c": "The answer is 6.", "d": "nothing"},
        {
            "a": ["The answer is 2.", "The answer is 2.", "The answer is 3."],  # vote fixes a greedy error
            "b": ["The answer is 5.", "The answer is 5.", "The answer is 4."],  # vote breaks a greedy hit
            "c": ["no idea", "The answer is 6.", "no idea"],  # one parsed vote wins over failures
            "d": ["x", "y", "z"],  # nothing parses
        },
    )
    rows, s = evaluate(RECORDS, task, gen, max_tokens=16, self_consistency=3, temperature=0.9, seed=7)
    assert [r["sc_prediction"] for r in rows] == ["2", "5", "6", None]
    assert [r["sc_correct"] for r in rows] == [True, False, True, False]
    assert s.self_consistency_k == 3 and s.self_consistency_accuracy == 0.5
    assert s.accuracy == 0.5  # greedy: b and c
    sampled = [r for r in gen.requests if r.temperature > 0]
    assert len(sampled) == 4 and all(r.n == 3 and r.temperature == 0.9 for r in sampled)
    assert len({r.seed for r in sampled}) == 4


def test_evaluate_empty() -> None:
    rows, s = evaluate([], build_task("numeric"), FakeGenerator({}), max_tokens=8)
    assert rows == [] and s.n == 0 and s.accuracy == 0.0 and s.mean_length == 0.0


def test_evaluate_reads_a_cut_off_answer_as_a_parse_failure() -> None:
    """The evaluation passes the sample's finish_reason: "so x = 2" cut at max_tokens is no answer,
    the same text ending on its own is (and is right)."""

    class Cut(FakeGenerator):
        def generate(self, requests):
            return [[Sample(text="so x = " + {"a": "2", "b": "4"}[r.key], num_tokens=4,
                            finish_reason="length" if r.key == "a" else "stop")] for r in requests]

    rows, s = evaluate(RECORDS[:2], build_task("numeric"), Cut({}), max_tokens=4)
    assert [r["prediction"] for r in rows] == [None, "4"] and s.parse_failures == 1 and s.correct == 1
