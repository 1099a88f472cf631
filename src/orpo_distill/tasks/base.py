"""Task kinds: how a record becomes a prompt, how an answer is read back, and how it is checked.

One small class per kind. They share the prompt layout and differ only in the default instruction,
the canonical final line, and which extractor from :mod:`.extract` reads the answer. Every method is
pure, so a task is cheap to build and safe to share between stages.

The canonical final lines (the scripted teacher ends every trace with one; the default instructions
ask for them; :meth:`Task.answer_line` writes them):

- mcq     ``The answer is (C).``
- numeric ``The answer is 42.``
- yesno   ``The answer is yes.``
- exact   ``The answer is <text>.``
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from typing import Any, Callable, ClassVar, Sequence

from ..errors import UserError
from ..records import Record
from .extract import (
    DEFAULT_LETTERS,
    LETTERS,
    extract_choice,
    extract_exact,
    extract_number,
    extract_yesno,
    normalize_exact,
    normalize_yesno,
    parse_number,
)
from .steps import earliest, first_arithmetic_error, first_mapping_error

Message = dict[str, str]


def _short(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


# An option's own label: "A." "A:" "A)" "(A)" "[A]" (a letter, any case), then spacing. ")" and "]"
# close the label themselves, so "A)21" (AQuA's layout) counts without a space; "A." and "A:" need one,
# so "A.5" is not a label.
_OWN_LABEL_RE = re.compile(r"^\s*(?:\((?P<p>[A-Za-z])\)\s*|\[(?P<b>[A-Za-z])\]\s*|(?P<c>[A-Za-z])\)\s*|(?P<d>[A-Za-z])[.:]\s+)")


def _own_label(choice: str) -> tuple[str, str, int] | None:
    """(letter, label style, where the text starts) of a choice's leading label, or ``None``."""
    m = _OWN_LABEL_RE.match(choice)
    if m is None:
        return None
    style = next(k for k in "pbcd" if m.group(k))
    letter = m.group(style)
    return letter, style + (":" if style == "d" and ":" in m.group(0) else ""), m.end()


def unletter_choices(choices: Sequence[str]) -> list[str]:
    """``choices`` without the letters they carry themselves, so a prompt that letters them does not
    show "A. A. 08:00" (MedQA ships its options lettered).

    The rule: the letters go only when EVERY choice (two or more) starts with its own letter in order,
    A, B, C, ... (or a, b, c, ...), all in one label style: "A." / "A:" / "A)" / "(A)" / "[A]" (the dot
    and colon followed by a space). Then each label and the spacing after it are removed; otherwise
    nothing changes. So ["A. 08:00", "B. 09:00"] become ["08:00", "09:00"], while an option that
    merely starts like a label ("B. subtilis" among other names, or first among options that carry no
    label) is left as it is, and so are options that would be left empty ("A. ").
    """
    texts = [str(c) for c in choices]
    if len(texts) < 2:
        return texts
    labels = [_own_label(c) for c in texts]
    if any(x is None for x in labels):
        return texts
    letters = "".join(x[0] for x in labels)  # type: ignore[index]
    if letters not in (LETTERS[: len(texts)], LETTERS[: len(texts)].lower()):
        return texts
    if len({x[1] for x in labels}) != 1:  # type: ignore[index]
        return texts
    out = [c[x[2]:].strip() for c, x in zip(texts, labels)]  # type: ignore[index]
    return out if all(out) else texts


def _signature_takes_finish_reason(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "finish_reason" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


_cached_takes_finish_reason = lru_cache(maxsize=256)(_signature_takes_finish_reason)


def _takes_finish_reason(fn: Callable[..., Any]) -> bool:
    try:
        return _cached_takes_finish_reason(fn)
    except TypeError:  # an unhashable callable
        return _signature_takes_finish_reason(fn)


def extract_answer(task: Any, text: str, record: Record | None = None, finish_reason: str | None = None) -> str | None:
    """``task.extract(text, record=record, finish_reason=finish_reason)``, for any task.

    The callers that hold a generator's sample (sampling, evaluation) call this with the sample's
    ``finish_reason``, so a text cut off at the token limit is read as extract.py's rule 5 says. A
    task whose ``extract`` takes no ``finish_reason`` (a user's own Task subclass) is called without it.
    """
    method = task.extract
    if _takes_finish_reason(getattr(method, "__func__", method)):
        return method(text, record=record, finish_reason=finish_reason)
    return method(text, record=record)


@dataclass(frozen=True)
class Task:
    """The shared prompt layout and check; subclasses supply the answer format.

    The user message is the question, then the choices as "A. ..." lines when the record has any
    (without the letters the choices carry themselves, see :func:`unletter_choices`), then the
    instruction (``instruction`` replaces the kind's default; ``""`` means none). A set
    ``system_prompt`` adds a system message first.
    """

    kind: ClassVar[str] = "task"
    default_instruction: ClassVar[str] = ""

    system_prompt: str | None = None
    instruction: str | None = None

    # ---- prompt --------------------------------------------------------------------------------

    def messages(self, record: Record) -> list[Message]:
        out: list[Message] = []
        if self.system_prompt:
            out.append({"role": "system", "content": self.system_prompt})
        out.append({"role": "user", "content": self.user_content(record)})
        return out

    def user_content(self, record: Record) -> str:
        parts = [record.question.strip()]
        if record.choices:
            choices = unletter_choices(record.choices)
            parts.append("\n".join(f"{LETTERS[i]}. {c.strip()}" for i, c in enumerate(choices)))
        instruction = self.default_instruction if self.instruction is None else self.instruction
        if instruction.strip():
            parts.append(instruction.strip())
        return "\n\n".join(parts)

    def answer_line(self, answer: str) -> str:
        """The canonical final line for ``answer`` (what the default instruction asks for)."""
        return f"The answer is {answer}."

    # ---- answers -------------------------------------------------------------------------------

    def extract(self, text: str, record: Record | None = None, finish_reason: str | None = None) -> str | None:
        """The normalised final answer of a model output, or ``None`` when there is none.

        ``finish_reason`` is the generator's for that output; ``"length"`` (cut off at the token limit)
        means only a final-answer statement counts (extract.py, rule 5). ``None``: not known.
        """
        raise NotImplementedError

    def normalize_gold(self, record: Record) -> str:
        """The gold answer in ``extract``'s normal form. Raises :class:`UserError` when it has none,
        so a pipeline can validate every record before any generation."""
        raise NotImplementedError

    def check(self, prediction: str | None, record: Record) -> bool:
        """Whether ``prediction`` (an ``extract`` output) matches the gold answer.

        The prediction is read again with ``extract`` so stored or hand-written forms ("b", "18.00")
        still compare right; extraction is idempotent on its own outputs.
        """
        if prediction is None:
            return False
        pred = self.extract(str(prediction), record=record)
        return pred is not None and self._same(pred, self.normalize_gold(record))

    def _same(self, pred: str, gold: str) -> bool:
        return pred == gold

    # ---- steps ---------------------------------------------------------------------------------

    def first_error(self, text: str, record: Record | None = None) -> int | None:
        """Where the first wrong step of a wrong trace starts (a character offset into ``text``), for
        error-localised negatives (``pairs.rejected_span: first_error``); None when no step is found
        wrong, and the whole trace stays the rejected side. Every kind checks the trace's arithmetic
        (``tasks/steps.py``); a custom task may supply its own ``first_error(text, record)``."""
        return first_arithmetic_error(text)


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class McqTask(Task):
    """Multiple choice: the answer is a letter. The valid letters are one per choice of the record,
    A-D when the record has no choices (extended to the gold letter when that is later, for records
    whose question lists its own options)."""

    kind: ClassVar[str] = "mcq"
    default_instruction: ClassVar[str] = (
        'Think step by step, then finish with the line "The answer is (X)." where X is the letter of your choice.'
    )

    def answer_line(self, answer: str) -> str:
        return f"The answer is ({answer})."

    def letters(self, record: Record | None) -> str:
        if record is None:
            return DEFAULT_LETTERS
        if record.choices:
            return LETTERS[: len(record.choices)]
        gold = record.answer.strip().strip("().").upper()
        if len(gold) == 1 and gold in LETTERS and gold > DEFAULT_LETTERS[-1]:
            return LETTERS[: LETTERS.index(gold) + 1]
        return DEFAULT_LETTERS

    def extract(self, text: str, record: Record | None = None, finish_reason: str | None = None) -> str | None:
        choices = unletter_choices(record.choices) if record is not None and record.choices else None
        return extract_choice(text, self.letters(record), choices, finish_reason=finish_reason)

    def first_error(self, text: str, record: Record | None = None) -> int | None:
        """The arithmetic, and any ``V is (L)`` whose option ``L`` holds another number."""
        choices = unletter_choices(record.choices) if record is not None and record.choices else []
        return earliest(first_arithmetic_error(text), first_mapping_error(text, choices))

    def normalize_gold(self, record: Record) -> str:
        letters = self.letters(record)
        raw = record.answer.strip()
        bare = raw.strip("()[]. ").upper()
        if len(bare) == 1 and bare in letters:
            return bare
        if record.choices:
            wanted = normalize_exact(raw)
            for texts in (record.choices, unletter_choices(record.choices)):
                for i, c in enumerate(texts):
                    if normalize_exact(str(c)) == wanted:
                        return LETTERS[i]
        raise UserError(
            f"record {record.id}: mcq answer {_short(raw)} is neither a letter {letters[0]}-{letters[-1]} "
            "nor the text of one of its choices"
        )


@dataclass(frozen=True)
class NumericTask(Task):
    """A number (GSM8K style). Compared by value: "18.00" == "18", "1,234" == "1234", "1/2" == "0.5".
    Gold answers may be plain numbers or whole solutions ending "#### 72"."""

    kind: ClassVar[str] = "numeric"
    default_instruction: ClassVar[str] = (
        'Think step by step, then finish with the line "The answer is N." where N is the final number.'
    )

    def extract(self, text: str, record: Record | None = None, finish_reason: str | None = None) -> str | None:
        return extract_number(text, finish_reason=finish_reason)

    def normalize_gold(self, record: Record) -> str:
        gold = extract_number(record.answer)
        if gold is None:
            raise UserError(f"record {record.id}: numeric answer {_short(record.answer)} holds no number")
        return gold

    def _same(self, pred: str, gold: str) -> bool:
        a, b = parse_number(pred), parse_number(gold)
        return a is not None and b is not None and Fraction(a) == Fraction(b)


@dataclass(frozen=True)
class YesNoTask(Task):
    """Yes or no; "true"/"false" count as "yes"/"no"."""

    kind: ClassVar[str] = "yesno"
    default_instruction: ClassVar[str] = (
        'Think step by step, then finish with the line "The answer is yes." or "The answer is no."'
    )

    def extract(self, text: str, record: Record | None = None, finish_reason: str | None = None) -> str | None:
        return extract_yesno(text, finish_reason=finish_reason)

    def normalize_gold(self, record: Record) -> str:
        gold = normalize_yesno(record.answer)
        if gold is None:
            raise UserError(f"record {record.id}: yesno answer {_short(record.answer)} is not yes/no/true/false")
        return gold


@dataclass(frozen=True)
class ExactTask(Task):
    """Free text compared after normalisation: case, whitespace and trailing punctuation do not count."""

    kind: ClassVar[str] = "exact"
    default_instruction: ClassVar[str] = (
        'Think step by step, then finish with the line "The answer is <answer>." giving just the answer.'
    )

    def extract(self, text: str, record: Record | None = None, finish_reason: str | None = None) -> str | None:
        return extract_exact(text, finish_reason=finish_reason)

    def normalize_gold(self, record: Record) -> str:
        gold = normalize_exact(record.answer)
        if not gold:
            raise UserError(f"record {record.id}: empty answer")
        return gold

    def check(self, prediction: str | None, record: Record) -> bool:
        # the prediction is already a stated answer: only normalise it, never re-extract a part of it
        if prediction is None:
            return False
        return normalize_exact(str(prediction)) == self.normalize_gold(record)


TASK_KINDS: dict[str, type[Task]] = {t.kind: t for t in (McqTask, NumericTask, YesNoTask, ExactTask)}
