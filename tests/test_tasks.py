"""Task objects: prompts, gold normalisation, checking, build_task and custom tasks."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from orpo_distill.config import TaskConfig
from orpo_distill.errors import UserError
from orpo_distill.records import Record
from orpo_distill.tasks import ExactTask, McqTask, NumericTask, Task, YesNoTask, build_task, unletter_choices

MCQ_REC = Record("m1", "Mia has 9 marbles and buys 6. How many now?", "C", choices=("13", "14", "15", "16"))
NUM_REC = Record("n1", "What is 9 + 6?", "Nine plus six is <<9+6=15>>15.\n#### 15")


# ---- prompts ----------------------------------------------------------------------------------


def test_mcq_prompt_lists_choices_then_instruction() -> None:
    msgs = McqTask().messages(MCQ_REC)
    assert msgs == [{"role": "user", "content": msgs[0]["content"]}]
    content = msgs[0]["content"]
    assert content.startswith(MCQ_REC.question + "\n\nA. 13\nB. 14\nC. 15\nD. 16\n\n")
    assert '"The answer is (X)."' in content and "step by step" in content
    assert len(content) < len(MCQ_REC.question) + 200  # short: small students have short contexts


@pytest.mark.parametrize(
    "kind, line",
    [("mcq", "The answer is (X)."), ("numeric", "The answer is N."), ("yesno", "The answer is yes."),
     ("exact", "The answer is <answer>.")],
)
def test_default_instruction_names_the_canonical_line(kind: str, line: str) -> None:
    content = build_task(kind).messages(Record("r", "Q?", "1"))[-1]["content"]
    assert content.startswith("Q?\n\n") and line in content


def test_system_prompt_and_instruction_override() -> None:
    task = build_task(TaskConfig(kind="numeric", system_prompt="You are a careful tutor.", instruction="Be brief."))
    msgs = task.messages(NUM_REC)
    assert msgs == [
        {"role": "system", "content": "You are a careful tutor."},
        {"role": "user", "content": "What is 9 + 6?\n\nBe brief."},
    ]
    assert build_task(TaskConfig(kind="numeric", instruction="")).messages(NUM_REC)[0]["content"] == "What is 9 + 6?"


@pytest.mark.parametrize(
    "task, answer, line",
    [(McqTask(), "C", "The answer is (C)."), (NumericTask(), "42", "The answer is 42."),
     (YesNoTask(), "yes", "The answer is yes."), (ExactTask(), "Paris", "The answer is Paris.")],
)
def test_answer_line_is_canonical_and_reads_back(task: Task, answer: str, line: str) -> None:
    assert task.answer_line(answer) == line
    record = MCQ_REC if task.kind == "mcq" else Record("r", "q", answer)
    assert task.check(task.extract("Some reasoning.\n" + line, record=record), record)


# ---- options that carry their own letters (MedQA) ------------------------------------------------


@pytest.mark.parametrize(
    "choices, expected",
    [
        (["A. 08:00", "B. 09:00", "C. 10:00"], ["08:00", "09:00", "10:00"]),
        (["(A) 8", "(B) 9"], ["8", "9"]),
        (["A) 8", "B) 9"], ["8", "9"]),
        (["A)21", "B)21.5"], ["21", "21.5"]),  # AQuA writes no space after ")"
        (["A: x", "B: y"], ["x", "y"]),
        (["[A] x", "[B] y"], ["x", "y"]),
        (["a) x", "b) y"], ["x", "y"]),
        # left alone: not every option carries its own letter in order, in one style
        (["E. coli", "B. subtilis", "S. aureus"], ["E. coli", "B. subtilis", "S. aureus"]),
        (["Staph", "B. subtilis"], ["Staph", "B. subtilis"]),  # "B. subtilis" is in B's place, but alone
        (["A. x", "B) y"], ["A. x", "B) y"]),  # two styles
        (["A. x", "C. y"], ["A. x", "C. y"]),  # out of order
        (["B. x", "A. y"], ["B. x", "A. y"]),
        (["A.5", "B.6"], ["A.5", "B.6"]),  # no space after the dot: no label
        (["A. x"], ["A. x"]),  # a single option
        (["A. ", "B. y"], ["A. ", "B. y"]),
        (["8", "9"], ["8", "9"]),
    ],
)
def test_unletter_choices_strips_only_a_full_run_of_own_letters(choices: list[str], expected: list[str]) -> None:
    assert unletter_choices(choices) == expected
    assert unletter_choices(unletter_choices(choices)) == expected


def test_lettered_options_are_not_lettered_twice() -> None:
    record = Record("med", "What time?", "A", choices=("A. 08:00", "B. 09:00", "C. 10:00"))
    content = McqTask().messages(record)[0]["content"]
    assert "A. 08:00\nB. 09:00\nC. 10:00" in content and "A. A." not in content
    species = Record("bio", "Which is gram-positive?", "B", choices=("E. coli", "B. subtilis"))
    assert "A. E. coli\nB. B. subtilis" in McqTask().messages(species)[0]["content"]  # their own text, kept
    # the gold as the option's text, and answers naming the text, read the same without the letters
    assert McqTask().normalize_gold(Record("med", "q", "09:00", choices=record.choices)) == "B"
    assert McqTask().normalize_gold(Record("med", "q", "B. 09:00", choices=record.choices)) == "B"
    assert McqTask().extract("So it is at nine.\nThe answer is 10:00.", record=record) == "C"


# ---- gold answers and checking -----------------------------------------------------------------


@pytest.mark.parametrize(
    "task, record, gold",
    [
        (McqTask(), MCQ_REC, "C"),
        (McqTask(), Record("m", "q", "(b)", choices=("x", "y")), "B"),
        (McqTask(), Record("m", "q", "Paris", choices=("Rome", "Paris")), "B"),
        (McqTask(), Record("m", "q", "E"), "E"),  # options inside the question text: letter range grows
        (NumericTask(), NUM_REC, "15"),
        (NumericTask(), Record("n", "q", "1,200"), "1200"),
        (NumericTask(), Record("n", "q", "$18.00"), "18"),
        (YesNoTask(), Record("y", "q", "True"), "yes"),
        (YesNoTask(), Record("y", "q", "no"), "no"),
        (ExactTask(), Record("e", "q", "  Paris. "), "paris"),
    ],
)
def test_normalize_gold(task: Task, record: Record, gold: str) -> None:
    assert task.normalize_gold(record) == gold


@pytest.mark.parametrize(
    "task, record, match",
    [
        (McqTask(), Record("bad1", "q", "Z", choices=("x", "y")), "bad1.*neither a letter A-B"),
        (NumericTask(), Record("bad2", "q", "many"), "bad2.*no number"),
        (YesNoTask(), Record("bad3", "q", "maybe"), "bad3.*not yes/no"),
        (ExactTask(), Record("bad4", "q", " . "), "bad4.*empty"),
    ],
)
def test_unusable_gold_is_a_user_error_naming_the_record(task: Task, record: Record, match: str) -> None:
    with pytest.raises(UserError, match=match):
        task.normalize_gold(record)


def test_check() -> None:
    mcq, num, yn, ex = McqTask(), NumericTask(), YesNoTask(), ExactTask()
    assert mcq.check("C", MCQ_REC) and mcq.check("c", MCQ_REC) and not mcq.check("B", MCQ_REC)
    assert not mcq.check(None, MCQ_REC)
    assert num.check("15", NUM_REC) and num.check("15.00", NUM_REC) and not num.check("16", NUM_REC)
    assert num.check("1234", Record("n", "q", "#### 1,234"))
    assert num.check("0.5", Record("n", "q", "1/2"))
    assert not num.check(None, NUM_REC)
    assert yn.check("yes", Record("y", "q", "true")) and not yn.check("no", Record("y", "q", "yes"))
    assert ex.check("paris", Record("e", "q", "PARIS.")) and not ex.check("lyon", Record("e", "q", "Paris"))
    assert not ex.check(None, Record("e", "q", "Paris"))


def test_full_output_round_trip() -> None:
    """What sampling does: extract from the model text, then check against the record."""
    num = NumericTask()
    good = "9 + 6 = 15.\nThe answer is 15."
    bad = "9 + 6 = 16.\nThe answer is 16."
    assert num.check(num.extract(good, record=NUM_REC), NUM_REC)
    assert not num.check(num.extract(bad, record=NUM_REC), NUM_REC)
    mcq = McqTask()
    assert mcq.check(mcq.extract("9 + 6 = 15, option (C).\nThe answer is (C).", record=MCQ_REC), MCQ_REC)


# ---- build_task and custom ----------------------------------------------------------------------


@pytest.mark.parametrize("kind, cls", [("mcq", McqTask), ("numeric", NumericTask), ("yesno", YesNoTask),
                                       ("exact", ExactTask)])
def test_build_task_kinds(kind: str, cls: type) -> None:
    task = build_task(TaskConfig(kind=kind))
    assert type(task) is cls and task.kind == kind


def test_custom_set_on_builtin_kind_is_refused() -> None:
    with pytest.raises(UserError, match="task.kind: custom"):
        build_task(TaskConfig(kind="mcq", custom="m:f"))


CUSTOM_MODULE = '''
from orpo_distill.tasks import NumericTask

calls = []

def last_word(text, record):
    """Extractor form: the last word of the output."""
    calls.append(record.id if record is not None else None)
    if "crash" in text:
        raise RuntimeError("boom")
    words = text.split()
    return words[-1] if words else None


class Upper:
    """Factory form (a class taking the config): extract without record, own check, no messages."""

    def __init__(self, cfg):
        self.cfg = cfg

    def extract(self, text):
        return text.strip().upper() or None

    def check(self, prediction, record):
        return prediction == record.answer.upper()


def make_numeric():
    return NumericTask(instruction="Numbers only.")


def broken_factory(cfg):
    raise ValueError("no config for you")


def returns_junk():
    return 42

NOT_CALLABLE = 3
'''


@pytest.fixture
def custom_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = "my_custom_verifier"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(CUSTOM_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    yield name
    sys.modules.pop(name, None)


def custom_cfg(spec: str, **kw) -> TaskConfig:
    return TaskConfig(kind="custom", custom=spec, allow_custom_code=True, **kw)


def test_custom_needs_allow_custom_code(custom_module: str) -> None:
    with pytest.raises(UserError, match="allow_custom_code"):
        build_task(TaskConfig(kind="custom", custom=f"{custom_module}:last_word"))
    assert custom_module not in sys.modules  # refused before importing anything


def test_custom_extractor_function(custom_module: str) -> None:
    task = build_task(custom_cfg(f"{custom_module}:last_word", instruction="Say one word last."))
    rec = Record("c1", "Capital of France?", "Paris")
    assert task.kind == "custom"
    assert task.messages(rec) == [{"role": "user", "content": "Capital of France?\n\nSay one word last."}]
    assert task.extract("I think it is Paris.", record=rec) == "paris"
    assert sys.modules[custom_module].calls == ["c1"]
    assert task.check(task.extract("It is PARIS", record=rec), rec)
    assert not task.check(task.extract("It is Lyon", record=rec), rec)
    assert task.extract("crash please", record=rec) is None  # user code raising counts as unparsed
    assert task.failures == {"extract": 1}
    assert task.extract("", record=rec) is None


def test_custom_factory_class(custom_module: str) -> None:
    task = build_task(custom_cfg(f"{custom_module}:Upper"))
    rec = Record("c2", "Symbol of gold?", "au")
    assert task.extract(" au ", record=rec) == "AU"
    assert task.check("AU", rec) and not task.check("AG", rec) and not task.check(None, rec)
    assert "The answer is <answer>." in task.messages(rec)[0]["content"]  # exact prompt stands in
    assert task.normalize_gold(rec) == "au"


def test_custom_factory_returning_builtin_task(custom_module: str) -> None:
    task = build_task(custom_cfg(f"{custom_module}:make_numeric"))
    assert isinstance(task, NumericTask) and task.instruction == "Numbers only."


@pytest.mark.parametrize(
    "spec, match",
    [
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
        ("{mod}:missing", "has no attribute 'missing'"),
        ("{mod}:NOT_CALLABLE", "not a function or class"),
        ("{mod}:broken_factory", "factory raised ValueError: no config for you"),
        ("{mod}:returns_junk", "extract\\(text\\)"),
        ("just_a_module", "module:function"),
    ],
)
def test_custom_errors_are_user_errors(custom_module: str, spec: str, match: str) -> None:
    with pytest.raises(UserError, match=match):
        build_task(custom_cfg(spec.format(mod=custom_module)))


def test_custom_from_file_path(tmp_path: Path) -> None:
    path = tmp_path / "verify.py"
    path.write_text("def pick(text, record):\n    return text.split('=')[-1]\n")
    task = build_task(custom_cfg(f"{path}:pick"))
    assert task.extract("x = 42") == "42"
    with pytest.raises(UserError, match="not found"):
        build_task(custom_cfg(f"{tmp_path / 'nope.py'}:pick"))


def test_custom_module_failing_on_import_names_the_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "broken_verifier_mod.py").write_text("def f(text, record):\n    return text\nraise ImportError('needs torch9')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match="cannot import module 'broken_verifier_mod'.*needs torch9"):
        build_task(custom_cfg("broken_verifier_mod:f"))


def test_gsm8k_sample_gold_answers_and_solutions_check() -> None:
    """Every packaged GSM8K row: the gold normalises, and the human solution read as output checks."""
    import json
    from importlib.resources import files

    task = NumericTask()
    rows = files("orpo_distill").joinpath("data/gsm8k_test_sample.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(rows) >= 50
    for i, line in enumerate(rows):
        row = json.loads(line)
        record = Record(str(i), row["question"], row["answer"])
        assert task.normalize_gold(record) == row["answer"].split("####")[-1].strip().replace(",", "")
        assert task.check(task.extract(row["answer"]), record)
