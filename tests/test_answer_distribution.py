"""Accuracy that means what it says: the predicted answers against the gold, the warning when one
answer takes most predictions, and the mcq check of whether the working computes the gold option."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import pytest

from orpo_distill import report
from orpo_distill.cli import eval_rows
from orpo_distill.evaluation import (
    EvalSummary,
    answer_collapse,
    answer_distribution,
    computed_option,
    evaluate,
    option_text_agreement,
    strip_option_listings,
)
from orpo_distill.generators.base import GenerationStats, Request, Sample
from orpo_distill.records import Record
from orpo_distill.tasks import build_task


def rows(preds: Sequence[str | None], golds: Sequence[str]) -> list[dict[str, Any]]:
    return [{"prediction": p, "gold": g} for p, g in zip(preds, golds)]


# ---- the distribution ----------------------------------------------------------------------------------


def test_mcq_distribution_counts_every_letter_and_unparsed() -> None:
    got = rows(["D", "D", "D", "A", None, "D"], ["A", "B", "D", "C", "B", "A"])
    predicted, gold = answer_distribution(got, mcq=True)
    assert predicted == {"A": 1, "B": 0, "C": 0, "D": 4, "unparsed": 1}
    assert gold == {"A": 2, "B": 2, "C": 1, "D": 1}
    assert list(predicted)[:4] == ["A", "B", "C", "D"]  # in letter order, never by count
    assert sum(predicted.values()) == sum(gold.values()) == len(got)


def test_numeric_distribution_keeps_the_top_values_and_sums_the_rest() -> None:
    preds = ["0"] * 6 + ["1", "2", "3", "4", "5"] + [None, None]
    golds = [str(10 + i) for i in range(11)] + ["0", "1"]
    predicted, gold = answer_distribution(rows(preds, golds), mcq=False, top=3)
    # kept: "0" (6 predicted), then "1" (1 predicted, 1 gold) over "2" (1 predicted, 0 gold)
    assert predicted == {"0": 6, "1": 1, "2": 1, "other": 3, "unparsed": 2}
    assert gold == {"0": 1, "1": 1, "2": 0, "other": 11}
    assert sum(predicted.values()) == sum(gold.values()) == 13
    # few values: nothing to fold, so no "other" bucket
    p, g = answer_distribution(rows(["yes", "no", "yes"], ["yes", "yes", "no"]), mcq=False)
    assert p == {"yes": 2, "no": 1} and g == {"yes": 2, "no": 1}


# ---- the collapse warning ---------------------------------------------------------------------------------

BALANCED_GOLD = list("ABCD") * 5  # 20 questions, 25% each


def test_warning_fires_when_every_answer_is_D() -> None:
    answer, warning = answer_collapse(rows(["D"] * 20, BALANCED_GOLD))
    assert answer == "D"
    assert warning is not None and "'D' for 20 of 20 questions (100.0%)" in warning and "25.0%" in warning


def test_no_warning_on_balanced_predictions_or_a_gold_that_is_skewed_the_same_way() -> None:
    assert answer_collapse(rows(list("DCBA") * 5, BALANCED_GOLD)) == (None, None)
    # half the answers "D", but the gold is 40% D: 0.5 < 1.5 x 0.4, a fair reading of a skewed gold
    gold = ["D"] * 8 + list("ABC") * 4
    assert answer_collapse(rows(["D"] * 10 + list("ABCAB") * 2, gold)) == (None, None)
    # just under half: no warning; half: a warning
    assert answer_collapse(rows(["D"] * 9 + list("ABC") * 3 + ["A", "B"], BALANCED_GOLD))[0] is None
    assert answer_collapse(rows(["D"] * 10 + list("ABCAB") * 2, BALANCED_GOLD))[0] == "D"
    # unparsed predictions are not an answer, and they count in the denominator
    assert answer_collapse(rows(["D"] * 9 + [None] * 11, BALANCED_GOLD)) == (None, None)
    # too few questions to say anything
    assert answer_collapse(rows(["D"] * 8, BALANCED_GOLD[:8])) == (None, None)


# ---- mcq: does the working compute the gold option? ----------------------------------------------------

CHOICES = ("4", "10", "9", "11")  # gold (D) 11


def response(value: int, letter: str, choices: Sequence[str] = CHOICES) -> str:
    listed = ", ".join(f"({'ABCD'[i]}) {c}" for i, c in enumerate(choices))
    return (f"The bag starts with 8 marbles. 8 - 4 = 4, then 4 + 7 = {value}. The bag has {value} marbles.\n"
            f"The options are {listed}; {value} is ({letter}).\nThe answer is ({letter}).")


def test_option_listings_are_removed_but_the_computed_value_stays() -> None:
    text = "The options are (A) 4, (B) 10, (C) 9, (D) 11; 11 is (D)."
    assert strip_option_listings(text) == "The options are ; 11 is (D)."
    assert strip_option_listings("A. 4\nB. 10\nSo it is 11.") == "So it is 11."  # an echoed prompt
    assert strip_option_listings("It is (D) 11.") == "It is (D) 11."  # one label is no listing


@pytest.mark.parametrize("text, value, index", [
    (response(11, "D"), "11", 3),  # right working, right letter
    (response(11, "A"), "11", 3),  # right working, wrong letter: the collapse case
    (response(10, "D"), "10", 1),  # wrong working (10 is option B), gold letter anyway
    (response(12, "D"), "12", None),  # a value that is no option
    ("The answer is (D).", None, None),  # no working at all
    ("", None, None),  # a failed request
    ("First 8 - 4 = 4.\nA. 4\nB. 10\nC. 9\nD. 11\nThe answer is (D).", "4", 0),  # echo ignored
    ("Has 11. Options: (A) 4, (B) 10, (C) 9, (D) 11, (E) 12.\nThe answer is (D).", "11", 3),  # listed last
    ("8 - 4 = 4, 4 + 7 = 11.\nThe answer is (D). Check: 11 - 7 = 4.", "11", 3),  # after the answer: not working
])
def test_computed_option_reads_the_working_before_the_answer(text: str, value: str | None, index: int | None) -> None:
    assert computed_option(text, CHOICES) == (value, index)


def test_computed_option_with_text_choices() -> None:
    choices = ("Lyon", "Paris", "New York", "York")
    assert computed_option("Not Lyon: the capital is Paris.\nThe answer is (A).", choices) == ("paris", 1)
    assert computed_option("It was founded as New York.\nThe answer is (C).", choices) == ("new york", 2)
    assert computed_option("I have no idea.\nThe answer is (B).", choices) == (None, None)


def test_option_text_agreement_on_hand_written_responses() -> None:
    task = build_task("mcq")
    records = [Record(id=f"q{i}", question="?", answer="D", choices=CHOICES) for i in range(4)]
    texts = [
        response(11, "D"),  # right letter, right text: match and agreement
        response(11, "A"),  # wrong letter, right text: match, no agreement
        response(10, "D"),  # right letter, wrong text: neither
        "I am not sure.",  # unparsed: neither
    ]
    got = [{"text": t, "prediction": task.extract(t, r), "gold": task.normalize_gold(r)}
           for t, r in zip(texts, records)]
    assert [g["prediction"] for g in got] == ["D", "A", "D", None]
    assert option_text_agreement(got, records) == (pytest.approx(2 / 4), pytest.approx(1 / 4))
    # mcq records without choices have nothing to compare: no figure rather than 0%
    bare = [Record(id="x", question="? (A) 1 (B) 2", answer="B")]
    assert option_text_agreement([{"text": "2", "prediction": "B", "gold": "B"}], bare) == (None, None)


# ---- the summary ---------------------------------------------------------------------------------------------


def test_old_summaries_without_the_new_fields_still_load() -> None:
    old = {"n": 4, "correct": 1, "accuracy": 0.25, "ci95": [0.05, 0.7], "parse_failures": 0,
           "parse_failure_rate": 0.0, "mean_length": 9.0, "failed_requests": 0, "self_consistency_k": 0,
           "self_consistency_accuracy": None, "epoch": 2, "split": "eval", "tokens_per_s": 3.0}
    s = EvalSummary.from_dict(old)
    assert s.accuracy == 0.25 and s.ci95 == (0.05, 0.7)
    assert s.predicted_answers is None and s.gold_answers is None
    assert s.collapsed_answer is None and s.warning is None
    assert s.option_text_match is None and s.letter_text_agreement is None
    assert ("WARNING", None) not in eval_rows(s) and all(k != "WARNING" for k, _ in eval_rows(s))


class AlwaysD:
    """A student that has learned one thing: the right number, then "(D)" whatever it computed."""

    name = "always-d"

    def __init__(self, records: Sequence[Record]):
        self.stats = GenerationStats()
        self.by_id = {r.id: r for r in records}

    def generate(self, requests: Sequence[Request]) -> list[list[Sample]]:
        out = []
        for req in requests:
            r = self.by_id[req.key]
            text = response(int(r.meta["correct"]), "D", r.choices or ())
            out.append([Sample(text=text, num_tokens=len(text.split())) for _ in range(req.n)])
        return out


def test_evaluate_warns_on_a_student_that_always_answers_D(tmp_path: Path) -> None:
    from orpo_distill.config import DatasetConfig
    from orpo_distill.datasets.synthetic import make_record

    records = [make_record(DatasetConfig(kind="synthetic"), i) for i in range(40)]
    task = build_task("mcq")
    golds = [task.normalize_gold(r) for r in records]
    rows_, s = evaluate(records, task, AlwaysD(records), max_tokens=64)

    share_d = golds.count("D") / len(records)
    assert 0 < share_d < 0.5  # the set is mixed, so the accuracy is D's share and nothing more
    assert s.accuracy == pytest.approx(share_d)
    assert s.collapsed_answer == "D" and s.warning is not None and "'D' for 40 of 40" in s.warning
    assert s.predicted_answers == {"A": 0, "B": 0, "C": 0, "D": 40}
    assert s.gold_answers == {k: golds.count(k) for k in "ABCD"}
    # the working was right every time; the letter agrees with it only where the gold is D
    assert s.option_text_match == 1.0
    assert s.letter_text_agreement == pytest.approx(share_d)
    assert ("WARNING", s.warning) in eval_rows(s)

    # it survives summary.json (as the pipeline writes it) and reaches the run report
    entry = {**s.as_dict(), "epoch": 2, "split": "eval", "tokens_per_s": 1.0}
    assert EvalSummary.from_dict(json.loads(json.dumps(entry))) == s
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "summary.json").write_text(json.dumps({"eval_epoch_2": entry}))
    (tmp_path / "config.yaml").write_text("train: {epochs: 2}\n")
    (tmp_path / "metrics.jsonl").write_text("")
    md = report.render_markdown(report.run_report(tmp_path), tmp_path)
    assert "**Warning (epoch 2):** one answer takes most predictions: 'D' for 40 of 40" in md
    assert "## Predicted answers" in md and "| answer | gold | epoch 2 |" in md
    assert f"| D | {golds.count('D')} ({100 * share_d:.0f}%) | 40 (100%) |" in md
    assert "| A | " in md and " | 0 (0%) |" in md
    assert "computes the gold option" in md and "| 100.0% |" in md


def test_report_of_a_balanced_run_has_no_warning(tmp_path: Path) -> None:
    gold = {"A": 5, "B": 5, "C": 5, "D": 5}
    entry = {"n": 20, "correct": 15, "accuracy": 0.75, "ci95": [0.5, 0.9], "parse_failures": 0,
             "parse_failure_rate": 0.0, "mean_length": 9.0, "predicted_answers": {"A": 6, "B": 5, "C": 5, "D": 4},
             "gold_answers": gold, "collapsed_answer": None, "warning": None}
    old = {k: v for k, v in entry.items() if k not in ("predicted_answers", "gold_answers", "collapsed_answer",
                                                        "warning")}
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "summary.json").write_text(json.dumps({"eval_epoch_0": old, "eval_epoch_1": entry}))
    (tmp_path / "config.yaml").write_text("train: {epochs: 1}\n")
    (tmp_path / "metrics.jsonl").write_text("")
    md = report.render_markdown(report.run_report(tmp_path), tmp_path)
    assert "Warning" not in md
    assert "| answer | gold | epoch 1 |" in md  # the old summary (epoch 0) has no distribution: no column
    assert "| A | 5 (25%) | 6 (30%) |" in md
    assert "computes the gold option" not in md  # not mcq figures: no empty columns


def test_report_marks_answers_an_evaluation_folded_into_other(tmp_path: Path) -> None:
    base = {"n": 10, "correct": 1, "accuracy": 0.1, "ci95": [0.0, 0.4], "parse_failures": 0,
            "parse_failure_rate": 0.0, "mean_length": 9.0}
    before = {**base, "predicted_answers": {"5": 3, "other": 7}, "gold_answers": {"5": 1, "other": 9}}
    after = {**base, "predicted_answers": {"7": 6, "other": 3, "unparsed": 1}, "gold_answers": {"7": 1, "other": 9}}
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "summary.json").write_text(json.dumps({"eval_epoch_0": before, "eval_epoch_3": after}))
    (tmp_path / "config.yaml").write_text("train: {epochs: 3}\n")
    (tmp_path / "metrics.jsonl").write_text("")
    md = report.render_markdown(report.run_report(tmp_path), tmp_path)
    assert "| 7 | 1 (10%) | - | 6 (60%) |" in md  # "7" was inside epoch 0's "other"
    assert "| other | 9 (90%) | 7 (70%) | 3 (30%) |" in md
    assert "| unparsed | - | 0 (0%) | 1 (10%) |" in md  # never folded: none is 0
    assert "in its \"other\"" in md
