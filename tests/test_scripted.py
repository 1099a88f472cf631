"""The scripted teacher: diverse, deterministic traces with an honest share of genuine mistakes."""

from __future__ import annotations

import re

import pytest

from orpo_distill.config import DatasetConfig
from orpo_distill.datasets import load_splits
from orpo_distill.errors import UserError
from orpo_distill.generators.base import Generator, Request
from orpo_distill.generators.scripted import STYLE_NAMES, ScriptedTeacher
from orpo_distill.records import Record

EQUATION = re.compile(r"(\d+) ([+-]) (\d+) = (\d+)")
FINAL = re.compile(r"\nThe answer is \(([A-H])\)\.$")


@pytest.fixture(scope="module")
def records() -> list[Record]:
    return load_splits(DatasetConfig(train_size=200, eval_size=1))[0]


def ask(teacher: ScriptedTeacher, recs: list[Record], n: int, seed: int | None = 0) -> list[list[str]]:
    out = teacher.generate([Request(key=r.id, messages=({"role": "user", "content": r.question},), n=n, seed=seed) for r in recs])
    return [[s.text for s in samples] for samples in out]


def equations(text: str) -> list[tuple[int, str, int, int]]:
    return [(int(a), op, int(b), int(c)) for a, op, b, c in EQUATION.findall(text)]


def stated_letter(text: str) -> str:
    m = FINAL.search(text)
    assert m, f"no canonical answer line in {text!r}"
    return m.group(1)


def test_is_a_generator_and_deterministic(records):
    t1, t2 = ScriptedTeacher(records, seed=3), ScriptedTeacher({r.id: r for r in records}, seed=3)
    assert isinstance(t1, Generator) and t1.name == "scripted"
    assert ask(t1, records[:20], 4) == ask(t2, records[:20], 4)
    assert ask(t1, records[:20], 4) != ask(t1, records[:20], 4, seed=1)
    assert ask(t1, records[:20], 4) != ask(ScriptedTeacher(records, seed=4), records[:20], 4)


def test_k_samples_use_distinct_styles(records):
    teacher = ScriptedTeacher(records, error_rate=0.0)
    assert len(STYLE_NAMES) >= 4
    for r, texts in zip(records[:30], ask(teacher, records[:30], len(STYLE_NAMES))):
        styles = [teacher.plan(r.id, 0, i)[0] for i in range(len(texts))]
        assert sorted(styles) == sorted(STYLE_NAMES)
        # the layouts really differ: with digits masked, no two traces read the same, nor start the same
        shapes = {re.sub(r"\d+", "#", t) for t in texts}
        openings = {t.split()[0] for t in texts}
        assert len(shapes) == len(texts) and len(openings) >= 4, texts


def test_correct_traces_follow_the_program(records):
    teacher = ScriptedTeacher(records, error_rate=0.0)
    for r, texts in zip(records, ask(teacher, records, 3)):
        m = r.meta
        for text in texts:
            assert stated_letter(text) == r.answer
            assert text.endswith(f"The answer is ({r.answer}).")
            eqs = equations(text)
            assert [(a, c) for a, _, _, c in eqs] == list(zip(m["values"], m["values"][1:]))
            assert [(op, b) for _, op, b, _ in eqs] == [("+" if o == "add" else "-", amt) for o, amt, _ in m["steps"]]
            assert all((a + b if op == "+" else a - b) == c for a, op, b, c in eqs)
            listed = ", ".join(f"({L}) {c}" for L, c in zip("ABCDEFGH", r.choices))
            assert f"The options are {listed}; {m['correct']} is ({r.answer})." in text, text
            assert 20 <= len(text.split()) <= 90


def test_wrong_traces_carry_a_real_mistake_to_a_wrong_letter(records):
    teacher = ScriptedTeacher(records, error_rate=1.0)
    kinds = set()
    for r, texts in zip(records, ask(teacher, records, 4)):
        m = r.meta
        for text in texts:
            letter = stated_letter(text)
            assert letter != r.answer
            eqs = equations(text)
            # the wrong total is carried through: each step starts where the last ended
            assert eqs[0][0] == m["start"]
            assert all(eqs[i][3] == eqs[i + 1][0] for i in range(len(eqs) - 1))
            arithmetic_ok = all((a + b if op == "+" else a - b) == c for a, op, b, c in eqs)
            follows_program = [(op, b) for _, op, b, _ in eqs] == [("+" if o == "add" else "-", amt) for o, amt, _ in m["steps"]]
            assert not (arithmetic_ok and follows_program), text  # a slip or a misreading, never a clean solve
            kinds.add("slip" if not arithmetic_ok else "reading")
            # the letter stated is the option holding the number the trace arrived at
            final = eqs[-1][3]
            assert final != m["correct"] and final >= 0
            assert r.choices["ABCDEFGH".index(letter)] == str(final)
    assert kinds == {"slip", "reading"}


def test_error_rate_is_honoured(records):
    teacher = ScriptedTeacher(records, error_rate=0.25, seed=7)
    texts = [t for ts in ask(teacher, records, 10) for t in ts]
    by_id = [r for r in records for _ in range(10)]
    wrong = sum(stated_letter(t) != r.answer for t, r in zip(texts, by_id))
    # 2000 samples: sd = sqrt(2000 * .25 * .75) ~ 19, so +-60 is over 3 sd
    assert 440 <= wrong <= 560
    assert teacher.stats.extra["wrong_traces"] == wrong
    assert teacher.stats.requests == 200 and teacher.stats.samples == 2000 and teacher.stats.completion_tokens > 0
    none_wrong = ScriptedTeacher(records, error_rate=0.0)
    assert all(stated_letter(t) == r.answer for t, r in zip((t for ts in ask(none_wrong, records, 10) for t in ts), by_id))


def test_numeric_task_kind():
    recs = load_splits(DatasetConfig(train_size=20, eval_size=1), task_kind="numeric")[0]
    teacher = ScriptedTeacher(recs, error_rate=0.0, task_kind="numeric")
    for r, texts in zip(recs, ask(teacher, recs, 2)):
        assert all(t.endswith(f"\nThe answer is {r.answer}.") and "option" not in t for t in texts)


def test_refuses_non_synthetic_data(records):
    other = Record(id="gsm8k-train-0", question="q", answer="72", meta={"solution": "..."})
    with pytest.raises(UserError, match="only serves the synthetic task"):
        ScriptedTeacher([other])
    teacher = ScriptedTeacher(records)
    with pytest.raises(UserError, match="only serves the synthetic task.*'gsm8k-train-0'"):
        teacher.generate([Request(key="gsm8k-train-0", messages=(), n=1)])
    with pytest.raises(UserError, match="error_rate"):
        ScriptedTeacher(records, error_rate=1.5)


def test_resumed_samples_equal_uninterrupted_ones():
    """Sample s of a question is the same text whether made in one request or after a resume,
    because the sampling stage seeds a request that starts at sample s with base + s."""
    from orpo_distill.config import DatasetConfig
    from orpo_distill.datasets import load_splits
    from orpo_distill.sampling import request_seed
    from orpo_distill.generators.base import Request
    from orpo_distill.generators.scripted import ScriptedTeacher

    train, _ = load_splits(DatasetConfig(kind="synthetic", train_size=10, eval_size=2))
    teacher = ScriptedTeacher(train, error_rate=0.4, seed=3)
    msgs = ({"role": "user", "content": "q"},)
    for r in train:
        whole = teacher.generate([Request(r.id, msgs, n=5, seed=request_seed(0, r.id, 0))])[0]
        first = teacher.generate([Request(r.id, msgs, n=2, seed=request_seed(0, r.id, 0))])[0]
        rest = teacher.generate([Request(r.id, msgs, n=3, seed=request_seed(0, r.id, 2))])[0]
        assert [s.text for s in whole] == [s.text for s in first + rest]
