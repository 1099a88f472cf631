"""Answer extraction against realistic model output, one table per task kind."""

from __future__ import annotations

import random
from fractions import Fraction

import pytest

from orpo_distill.records import Record
from orpo_distill.tasks import ExactTask, McqTask, NumericTask, YesNoTask, extract_answer
from orpo_distill.tasks.extract import (
    answer_spans,
    extract_choice,
    extract_number,
    format_number,
    normalize_exact,
    open_calculator_note,
    parse_number,
)

MCQ = McqTask()
NUM = NumericTask()
YN = YesNoTask()
EXACT = ExactTask()

NUM_CHOICES = Record("q1", "How many marbles?", "C", choices=("12", "14", "15", "17"))
TEXT_CHOICES = Record("q2", "Capital of France?", "B", choices=("Berlin", "Paris", "Rome", "Madrid", "Lyon"))

COT = (
    "Mia starts with 9 marbles. She buys 6 more, so 9 + 6 = 15.\n"
    "Then she gives 3 away: 15 - 3 = 12.\n"
)

# (model output, expected letter) for NUM_CHOICES (letters A-D)
MCQ_CASES = [
    ("The answer is (B).", "B"),
    ("Answer: b", "B"),
    ("**B**", "B"),
    ("(B) is correct", "B"),
    ("B", "B"),
    ("b)", "B"),
    (COT + "The answer is (A).", "A"),
    (COT + "So the correct answer is C: 15", "C"),
    (COT + "Final answer: Option D", "D"),
    (COT + "**Answer:** (c)", "C"),
    (COT + "The answer is \\boxed{A}.", "A"),
    (COT + "Therefore, the answer is **(B)** because 14 is closest.", "B"),
    ("The answer is (A). Wait, I made a slip: 15 - 3 = 12... no. The answer is (C).", "C"),
    ("Answer: A\n\nOn reflection, option B is the correct answer.", "B"),
    ("The answer is 15.", "C"),  # the text of a choice, stated in a final-answer statement
    ("The answer is 15 marbles (option C).", "C"),
    (COT + "I choose D.", "D"),
    (COT + "Final answer:\n\n**D**", "D"),
    (COT + "That leaves 12, which is option (A).\nThe answer is (A).<|im_end|>", "A"),
    ("<think>Maybe the answer is (A)?</think>\nThe answer is (D).", "D"),
    (COT + "So she has 12 marbles.\n\nA", "A"),
    ("A. 12\nB. 14\nC. 15\nD. 17\nThe correct option is B.", "B"),
    # parse failures
    (COT + "So she has 12 marbles left.", None),  # a number, but no letter stated
    ("The answer is a tricky one.", None),  # 'a' is an English word here
    ("The answer is (X).", None),  # the instruction echoed, not an answer
    ("The answer is (E).", None),  # not a valid letter for four choices
    ("", None),
    ("I am not sure which one it is.", None),
]


@pytest.mark.parametrize("text, expected", MCQ_CASES)
def test_mcq_extraction(text: str, expected: str | None) -> None:
    assert MCQ.extract(text, record=NUM_CHOICES) == expected


def test_mcq_choice_text_and_letter_range() -> None:
    assert MCQ.extract("Final answer: Paris.", record=TEXT_CHOICES) == "B"
    assert MCQ.extract("The answer is paris, the city of light", record=TEXT_CHOICES) == "B"
    assert MCQ.extract("The answer is (E).", record=TEXT_CHOICES) == "E"  # five choices: E is valid
    assert MCQ.extract("The answer is (E).") is None  # no record: A-D
    assert MCQ.extract("The answer is Paris.") is None  # no record, no choices to match
    assert extract_choice("The answer is (F).", letters="ABCDEF") == "F"


# (model output, expected canonical number)
NUMERIC_CASES = [
    ("The answer is 42.", "42"),
    ("#### 1,234", "1234"),
    ("\\boxed{72}", "72"),
    ("$18.00", "18"),
    ("72.", "72"),
    ("-3", "-3"),
    ("1/2", "0.5"),
    ("The answer is \\frac{1}{3}.", "1/3"),
    (COT + "The answer is 12.", "12"),
    (COT + "The answer is $1,234.50 in total.", "1234.5"),
    (COT + "So the final answer is: **18**", "18"),
    ("She makes 9 * 2 = $18 every day.\n#### 18", "18"),
    ("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18", "18"),
    ("The answer is 3 + 5 = 8.", "8"),
    ("The answer is 5 - 8 = -3 degrees.", "-3"),
    ("The answer is 50%.", "50"),
    ("The answer is 12 apples, since 4 * 3 = 12 and 2 is left over.", "12"),
    ("The answer is 7. Wait, I forgot the last step: 7 + 5 = 12. The answer is 12.", "12"),
    ("Final Answer: The final answer is $\\boxed{25}$. I hope it is correct.", "25"),
    ("<think>The answer is 3?</think>The answer is 4.", "4"),
    ("Answer:\n\n1,000,000", "1000000"),
    ("The answer is −7.", "-7"),
    # "A:" (GSM8K's "Q: ... A: ..." layout) is a final-answer marker when the number comes right after it
    ("A: 18 (9 eggs at $2)", "18"),
    ("A: 18 dollars, which is 2 more than 16", "18"),
    ("Q: How much does she make?\nA: $18 a day.", "18"),
    ("Q: How much? A: 18.", "18"),
    ("**A:** 18", "18"),
    ("A: 18\nWait, 9 * 3 = 27, so the answer is 27.", "27"),  # the last marker wins
    ("The answer is 20.\nA: 18", "18"),
    ("A: Janet sells 16 - 3 - 4 = 9 eggs. She makes 9 * 2 = $18.", "18"),  # the working, not a statement
    ("Plan A: 3 apples, then 5 more.", "5"),  # "A:" inside a sentence is no marker
    # no marker: the last number stands
    (COT + "So Mia has 12 marbles now.", "12"),
    ("She had 10, lost 5-3 of them", "3"),  # a minus between numbers is not a sign
    # parse failures
    ("I don't know.", None),
    ("The answer is unknown.", None),
    ("", None),
]


@pytest.mark.parametrize("text, expected", NUMERIC_CASES)
def test_numeric_extraction(text: str, expected: str | None) -> None:
    assert NUM.extract(text) == expected


# (model output, finish reason, expected): a text cut off at max_tokens ("length") has no fallback
NUMERIC_CUT_CASES = [
    ("She pays 3 * 265408 = <<796224", "length", None),  # the trace: not 796224
    ("She pays 3 * 265408 = <<796224", None, None),  # an open calculator note is a cut text by itself
    ("= <<796224", "stop", None),
    ("Janet sells 16 - 3 - 4 = 9 eggs", "length", None),  # no marker before the cut
    ("Janet sells 16 - 3 - 4 = 9 eggs", "stop", "9"),  # the same text, finished: the last number
    ("Janet sells 16 - 3 - 4 = 9 eggs", None, "9"),  # finish reason not known: as before
    ("The answer is 18. Let me check: 9 * 2 = 1", "length", "18"),  # a statement made before the cut counts
    ("A: 18 (9 eggs at $2) and then", "length", "18"),
    ("So the total is 9 * 2 = 18.\n#### 1,2", "length", None),  # the number the cut text ends on may be cut
    ("The answer is 12", "length", None),
    ("The answer is 12\n", "length", "12"),  # a line end after it: the number is whole
    ("The answer is 12", "stop", "12"),
    ("Let me compute 12 * 3 = <<12*3=36>>36 and", "length", None),  # a closed note: cut by the finish reason
]


@pytest.mark.parametrize("text, finish_reason, expected", NUMERIC_CUT_CASES)
def test_numeric_cut_off_at_max_tokens_without_a_marker_is_a_parse_failure(
        text: str, finish_reason: str | None, expected: str | None) -> None:
    assert NUM.extract(text, finish_reason=finish_reason) == expected
    assert extract_number(text, finish_reason) == expected
    assert extract_answer(NUM, text, None, finish_reason) == expected


def test_open_calculator_note() -> None:
    assert open_calculator_note("9 * 2 = <<9*2") and open_calculator_note("= <<796224")
    assert open_calculator_note("= <<")
    assert not open_calculator_note("9 * 2 = <<9*2=18>>18")
    assert not open_calculator_note("no note")
    assert not open_calculator_note("1 << 3 = 8")  # a shift, not a note
    assert NUM.extract("1 << 3 = 8") == "8"
    assert NUM.extract("She sells <<16-3=13>>13, then <<13*2") is None


def test_cut_off_texts_of_the_other_kinds_need_a_statement_too() -> None:
    bare_letter = COT + "So she has 12 marbles.\n\nA"
    assert MCQ.extract(bare_letter, record=NUM_CHOICES) == "A"
    assert MCQ.extract(bare_letter, record=NUM_CHOICES, finish_reason="length") is None
    stated = COT + "The answer is (A). Let me double-check: 9 + 6"
    assert MCQ.extract(stated, record=NUM_CHOICES, finish_reason="length") == "A"
    assert extract_choice("B", finish_reason="length") is None and extract_choice("B", finish_reason="stop") == "B"
    assert YN.extract("Yes, because water", finish_reason="length") is None
    assert YN.extract("Yes, because water") == "yes"
    assert YN.extract("The answer is no. Because", finish_reason="length") == "no"
    assert EXACT.extract("Paris", finish_reason="length") is None
    assert EXACT.extract("Paris") == "paris"
    assert EXACT.extract("The answer is Paris. It is", finish_reason="length") == "paris"


def test_extract_answer_passes_the_finish_reason_only_to_tasks_that_take_it() -> None:
    class OldStyle(ExactTask):  # a user's own task, written before extract took a finish reason
        def extract(self, text, record=None):  # type: ignore[override]
            return "old:" + text

    assert extract_answer(OldStyle(), "x", None, "length") == "old:x"
    assert extract_answer(NUM, "Janet sells 9 eggs", None, "length") is None
    assert extract_answer(NUM, "Janet sells 9 eggs", None, "stop") == "9"
    assert extract_answer(MCQ, "B", NUM_CHOICES) == "B"


YESNO_CASES = [
    ("The answer is yes.", "yes"),
    ("Answer: No", "no"),
    ("**Yes**", "yes"),
    ("Yes, because water boils at 100 C at sea level.", "yes"),
    ("No.", "no"),
    ("The statement holds.\nThe answer is: True", "yes"),
    ("Final answer: false", "no"),
    ("The answer is yes. Hmm, on second thought the answer is no.", "no"),
    ("Let me check each fact.\nThe capital is Paris.\n\nSo, no.", "no"),
    ("The answer is \\boxed{\\text{Yes}}", "yes"),
    # parse failures
    ("No answer can be given without more data.", None),
    ("It depends on the altitude.", None),
    ("The answer is not obvious.", None),
]


@pytest.mark.parametrize("text, expected", YESNO_CASES)
def test_yesno_extraction(text: str, expected: str | None) -> None:
    assert YN.extract(text) == expected


EXACT_CASES = [
    ("The answer is Paris.", "paris"),
    ("Answer: **Mount Everest**", "mount everest"),
    ("The answer is \\boxed{\\text{Au}}.", "au"),
    ('The answer is "The Old Man and the Sea".', "the old man and the sea"),
    ("Paris", "paris"),
    ("  George   Washington. ", "george washington"),
    ("It is in Europe.\nThe answer is Paris. It is the capital of France.", "paris"),
    ("The answer is Washington D.C.", "washington d.c"),
    ("The answer is Lyon. No wait, the answer is Paris!", "paris"),
    # parse failures: several lines and no final-answer statement
    ("France has many cities.\nParis is one of them.", None),
    ("", None),
]


@pytest.mark.parametrize("text, expected", EXACT_CASES)
def test_exact_extraction(text: str, expected: str | None) -> None:
    assert EXACT.extract(text) == expected


def test_extraction_is_idempotent_on_its_outputs() -> None:
    """``check`` re-reads stored predictions, so extract(extract(x)) must equal extract(x)."""
    for text, expected in MCQ_CASES:
        if expected is not None:
            assert MCQ.extract(expected, record=NUM_CHOICES) == expected
    for text, expected in NUMERIC_CASES:
        if expected is not None:
            assert NUM.extract(expected) == expected
    for text, expected in YESNO_CASES:
        if expected is not None:
            assert YN.extract(expected) == expected


def test_extractors_never_raise_on_garbage() -> None:
    rng = random.Random(0)
    alphabet = "ab AB()[]{}*#$:.,-/=\\\n0123456789 answer is boxed frac </think> yes no"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        for task in (MCQ, NUM, YN, EXACT):
            out = task.extract(text, record=NUM_CHOICES)
            assert out is None or isinstance(out, str)
    assert NUM.extract(None) is None  # type: ignore[arg-type]


def test_answer_spans_order_and_next_line() -> None:
    spans = answer_spans("The answer is 3.\nAnswer:\n\n  5\n\\boxed{7}")
    assert [s.text.strip() for s in spans] == ["3.", "5", "7"]
    assert [s.pos for s in spans] == sorted(s.pos for s in spans)


@pytest.mark.parametrize(
    "raw, value",
    [("1,234", Fraction(1234)), ("-3", Fraction(-3)), ("1/2", Fraction(1, 2)), ("18.00", Fraction(18)),
     ("2/0", None), ("abc", None)],
)
def test_parse_number(raw: str, value: Fraction | None) -> None:
    assert parse_number(raw) == value


def test_format_number_is_canonical() -> None:
    assert [format_number(Fraction(x)) for x in ("18", "-3", "0.5", "1/3", "1234.50", "-0")] == [
        "18", "-3", "0.5", "1/3", "1234.5", "0"
    ]


def test_normalize_exact() -> None:
    assert normalize_exact("  The  OLD man.. ") == "the old man"
    assert normalize_exact("`x_1`") == "x_1"
    assert normalize_exact("“Quoted”!") == "quoted"
    assert extract_number("12 apples and 3 pears") == "3"
