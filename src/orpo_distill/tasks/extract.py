"""Final-answer extraction from free-form model output: pure functions, no task objects.

Why it matters: every label in ORPO-Distill comes from here. A teacher trace is a positive only if its
extracted answer checks out, a student trace is a negative only if it does not, and eval accuracy is
the share that checks out. A parser that misreads real model output silently poisons the pairs.

The rules, shared by all kinds:

1. An explicit final-answer statement wins over a bare mention. Markers: "answer is / would be /
   should be ...", "Answer:", "Final answer:", "answer to the question is", "correct option is",
   "I choose ...", "#### x" (GSM8K), ``\\boxed{x}`` (and, for letters, "(B) is correct").
2. Among statements the LAST one that parses wins ("The answer is (B). Wait... the answer is (C)."
   gives C). A statement whose text does not parse (the model echoing "The answer is (X).", or "The
   answer is not 5") is skipped.
3. When no statement parses, a kind-specific fallback looks for a bare answer only where that is
   sensible: numeric takes the last number in the text (the usual GSM8K practice); mcq a line holding
   only a letter, a bold letter, or a one-line reply starting with one; yes/no a line holding only the
   word, or a reply that starts "Yes," / "No."; exact a one-line reply. Otherwise ``None``.
4. Text after a closing ``</think>`` is searched first (reasoning models think, then answer).
5. A text cut off at the token limit (``finish_reason == "length"``) has no fallback: only a
   final-answer statement made before the cut counts, since the last number or letter of an
   unfinished text is whatever the model was in the middle of writing ("= <<796224" is no answer).
   For numbers, a number the cut text ends on may itself be cut short and does not count either.

Numeric answers have one more marker: ``A:`` opening a line or following a sentence (GSM8K's
few-shot "Q: ... A: ..." layout), when the number comes right after it: "A: 18 (9 eggs at $2)" is 18,
"A: 18 dollars, which is 2 more than 16" is 18, but "A: Janet sells 16 - 3 - 4 = 9 eggs ..." is the
working, not a statement, and is not read as one. A calculator note left open (``<<16-3``, the GSM8K
annotation) that the text ends in also marks it as cut off, with or without a finish reason.

Extractors never raise; ``None`` means "could not parse". Outputs are normalised (letter "B", number
"1234", "yes"/"no", lower-cased text) so ``extract(extract(x)) == extract(x)``.

Numbers: commas as thousands separators, ``$``, ``%`` and trailing units are dropped; a leading minus
counts ("-3"), a minus between two numbers does not ("5-3" is not -3). Fractions ``1/2`` and
``\\frac{1}{2}`` are accepted and kept exact: a terminating one is written as a decimal ("0.5"), any
other as "p/q" ("1/3"), so "1/2" == "0.5" but "0.33" != "1/3". An expression after a marker ("The
answer is 3 + 5 = 8") gives the value after its last "=".

Where: ``spans.py`` finds and cleans the statements and applies rules 1-5, ``numbers.py`` reads
numbers, and this module reads letters, yes/no and exact text; all their names import from here.
"""

from __future__ import annotations

import re
from typing import Sequence

from .numbers import (  # noqa: F401  (importable from here, as before the split)
    NUM_RE,
    last_number,
    number_in_span,
    strip_money,
    extract_number,
    format_number,
    open_calculator_note,
    parse_number,
)
from .spans import SPAN_MAX, Span, extract_with_rules, answer_spans, clean_span, first_sentence, is_cut  # noqa: F401

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
DEFAULT_LETTERS = "ABCD"


# ---------------------------------------------------------------------------------------------
# multiple choice letters


def _choice_in_span(s: str, letters: str, choices: Sequence[str]) -> str | None:
    """The choice whose text the span states (longest match wins, numbers compare by value)."""
    best: tuple[int, str] | None = None
    text = normalize_exact(first_sentence(s))
    stated = number_in_span(s)
    value = parse_number(stated) if stated is not None else None
    for i, choice in enumerate(choices[: len(letters)]):
        c = normalize_exact(choice)
        if not c:
            continue
        cnum = parse_number(strip_money(c)) if NUM_RE.fullmatch(strip_money(c).strip()) else None
        if cnum is not None:
            hit = value is not None and value == cnum
        else:
            hit = text == c or (text.startswith(c) and not text[len(c)].isalnum())
        if hit and (best is None or len(c) > best[0]):
            best = (len(c), letters[i])
    return best[1] if best else None


_OPTION_WORD_RE = re.compile(r"^(?:the\s+)?(?:option|choice|letter)\b\s*:?\s*", re.IGNORECASE)
_LEAD_LETTER_RE = re.compile(r"^[\(\[]?([A-Za-z])(?:([\)\]])|(?=[\s.,:;!?*'\"]|$))")
_PAREN_LETTER_RE = re.compile(r"\(([A-Za-z])\)")


def _letter_in_span(span: str, letters: str, choices: Sequence[str] | None) -> str | None:
    s = clean_span(span)
    if re.match(r"^not\b", s, re.IGNORECASE):
        return None
    s = _OPTION_WORD_RE.sub("", s)
    m = _LEAD_LETTER_RE.match(s)
    if m:
        letter, bracket = m.group(1), m.group(2)
        rest = s[m.end() :]
        # a lower-case letter is an English word ("a number") unless bracketed or standing alone
        plausible = letter.isupper() or bracket or re.match(r"^\s*(?:[.,:;!?)\]*'\"]|$)", rest)
        if plausible and letter.upper() in letters:
            return letter.upper()
    for p in _PAREN_LETTER_RE.finditer(first_sentence(s)):
        if p.group(1).upper() in letters:
            return p.group(1).upper()
    if choices:
        return _choice_in_span(s, letters, choices)
    return None


_LETTER_IS_CORRECT_RE = re.compile(
    r"(?:\b(?:option|choice)\s+)?(?:\(([A-Za-z])\)|(?-i:\b([A-Z])\b))[\s*]*"
    r"(?:is|would\s+be|seems)\s+(?:the\s+)?(?:most\s+)?(?:correct|right|best)\b",
    re.IGNORECASE,
)
_BOLD_LETTER_RE = re.compile(r"\*\*\s*[\(\[]?([A-Za-z])[\)\]]?[.:]?\s*\*\*")
_LETTER_LINE_RE = re.compile(
    r"^[\s*#>]*(?:(?:so|therefore|thus|hence)\b,?\s*)?[\(\[]?([A-Za-z])[\)\]]?[.!]?[\s*]*$",
    re.IGNORECASE | re.MULTILINE,
)
_LEADING_LETTER_REPLY_RE = re.compile(r"^\s*[\(\[]?([A-Z])(?:[\)\].:]|$)")


def extract_choice(text: str, letters: str = DEFAULT_LETTERS, choices: Sequence[str] | None = None,
                   finish_reason: str | None = None) -> str | None:
    """The chosen letter among ``letters``, upper-case, or ``None``.

    With ``choices`` a final-answer statement may give the choice's text instead of its letter
    ("The answer is Paris." -> the letter of "Paris"; numbers compare by value). ``finish_reason``
    "length" (cut off): statements only, no bare letter (rule 5).
    """
    letters = letters.upper()

    def is_correct(part: str) -> list[tuple[int, str]]:
        out = []
        for m in _LETTER_IS_CORRECT_RE.finditer(part):
            letter = (m.group(1) or m.group(2)).upper()
            if letter in letters:
                out.append((m.start(), letter))
        return out

    def fallback(part: str) -> str | None:
        # a bold letter opening a line is more likely an echoed option list ("**B.** 14") than a verdict
        found = [
            (m.start(), m.group(1).upper())
            for m in _BOLD_LETTER_RE.finditer(part)
            if part[part.rfind("\n", 0, m.start()) + 1 : m.start()].strip()
        ]
        found += [(m.start(), m.group(1).upper()) for m in _LETTER_LINE_RE.finditer(part)]
        found = [(p, x) for p, x in found if x in letters]
        if found:
            return max(found)[1]
        stripped = part.strip()
        m = _LEADING_LETTER_REPLY_RE.match(stripped)
        if m and "\n" not in stripped and m.group(1) in letters:
            return m.group(1)
        return None

    return extract_with_rules(text, lambda s: _letter_in_span(s, letters, choices), fallback, extra=is_correct,
                    cut=is_cut(finish_reason))


# ---------------------------------------------------------------------------------------------
# yes / no

_YES_NO = {"yes": "yes", "no": "no", "true": "yes", "false": "no"}
_YESNO_LEAD_RE = re.compile(r"^[\s\"'`(]*(yes|no|true|false)\b", re.IGNORECASE)
_YESNO_LINE_RE = re.compile(
    r"^[\s*#>]*(?:(?:so|therefore|thus|hence)\b,?\s*)?(yes|no|true|false)[.!]?[\s*]*$",
    re.IGNORECASE | re.MULTILINE,
)
_YESNO_REPLY_RE = re.compile(r"^[\s*]*(yes|no)\b[\s*]*(?:[,.!;:\n]|$)", re.IGNORECASE)


def normalize_yesno(s: str) -> str | None:
    """ "Yes", "TRUE", " no." -> "yes"/"no"; anything else -> ``None``."""
    m = re.fullmatch(r"[\s\"'`*(]*(yes|no|true|false)[\s.!\"'`*)]*", s, re.IGNORECASE)
    return _YES_NO[m.group(1).lower()] if m else None


def _yesno_in_span(span: str) -> str | None:
    m = _YESNO_LEAD_RE.match(clean_span(span))
    return _YES_NO[m.group(1).lower()] if m else None


def _yesno_fallback(part: str) -> str | None:
    lines = list(_YESNO_LINE_RE.finditer(part))
    if lines:
        return _YES_NO[lines[-1].group(1).lower()]
    m = _YESNO_REPLY_RE.match(part)
    return _YES_NO[m.group(1).lower()] if m else None


def extract_yesno(text: str, finish_reason: str | None = None) -> str | None:
    """ "yes" or "no" (true/false map to yes/no), or ``None``; cut off (``"length"``): statements only."""
    return extract_with_rules(text, _yesno_in_span, _yesno_fallback, cut=is_cut(finish_reason))


# ---------------------------------------------------------------------------------------------
# exact text

_TRAIL_PUNCT = ".,;:!?"
_WRAP_PAIRS = {"*": "*", "`": "`", '"': '"', "'": "'", "“": "”", "‘": "’", "_": "_"}


def normalize_exact(s: str) -> str:
    """Case, whitespace, wrapping quotes or markdown, and trailing punctuation do not matter."""
    s = " ".join(str(s).split()).casefold()
    prev = None
    while prev != s:
        prev = s
        s = s.strip().rstrip(_TRAIL_PUNCT).strip()
        if len(s) >= 2 and _WRAP_PAIRS.get(s[0]) == s[-1]:
            s = s[1:-1]
        s = s.strip("*`").strip()  # stray markdown
    return s


def _exact_in_span(span: str) -> str | None:
    s = clean_span(span)
    if re.match(r"^not\b", s, re.IGNORECASE):
        return None
    s = normalize_exact(first_sentence(s))
    return s or None


def _exact_fallback(part: str) -> str | None:
    stripped = part.strip()
    if "\n" in stripped or len(stripped) > SPAN_MAX:
        return None
    return normalize_exact(clean_span(stripped)) or None


def extract_exact(text: str, finish_reason: str | None = None) -> str | None:
    """The stated final answer, normalised with :func:`normalize_exact`; a one-line reply counts whole,
    unless it was cut off (``"length"``): then statements only."""
    return extract_with_rules(text, _exact_in_span, _exact_fallback, cut=is_cut(finish_reason))
