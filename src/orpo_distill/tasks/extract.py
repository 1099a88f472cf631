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
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, localcontext
from fractions import Fraction
from typing import Callable, Sequence, TypeVar

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
DEFAULT_LETTERS = "ABCD"

T = TypeVar("T")


@dataclass(frozen=True)
class Span:
    """The text a final-answer marker introduces, and where in the output it starts."""

    pos: int
    text: str


# ---------------------------------------------------------------------------------------------
# finding final-answer statements

_MARKER_RE = re.compile(
    r"""
    \banswer\s+to\s+(?:the|this)\s+(?:question|problem)\s+is\b
    | \banswer(?:\*\*|__)?\s*(?:is\b|:|=|(?:would|should|will|must)\s+be\b)
    | \b(?:correct|right|best)\s+(?:option|choice|letter)\s*(?:is\b|:|=)
    | \bi\s*(?:would\s+|will\s+|'d\s+|'ll\s+)?(?:choose|pick|select|go\s+with)\b
    | \#\#\#\#
    """,
    re.IGNORECASE | re.VERBOSE,
)
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BLANKISH_RE = re.compile(r"^[\s*_:`]*$")
_SPAN_MAX = 300


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """Content of the ``{...}`` whose opening brace is just before ``start``, braces balanced."""
    depth = 1
    for i in range(start, min(len(text), start + 2000)):
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start:i], i + 1
    return None


def answer_spans(text: str) -> list[Span]:
    """Every final-answer statement in ``text``, in order of position.

    A marker's span runs to the end of its line; when the rest of the line is blank ("Answer:" then the
    answer on the next line) the next non-empty line is taken instead. A ``\\boxed{}`` span is its
    content.
    """
    spans: list[Span] = []
    for m in _MARKER_RE.finditer(text):
        end = text.find("\n", m.end())
        rest = text[m.end() : end if end >= 0 else len(text)]
        if _BLANKISH_RE.match(rest) and end >= 0:
            for line in text[end + 1 : end + 1 + _SPAN_MAX * 2].split("\n"):
                if not _BLANKISH_RE.match(line):
                    rest = line
                    break
        spans.append(Span(m.start(), rest[:_SPAN_MAX]))
    for m in _BOXED_RE.finditer(text):
        got = _braced(text, m.end())
        if got is not None:
            spans.append(Span(m.start(), got[0]))
    spans.sort(key=lambda s: s.pos)
    return spans


def _parts(text: str) -> list[str]:
    """The answer part of a reasoning model's output first, then the whole text."""
    if "</think>" in text:
        after = text.rsplit("</think>", 1)[1]
        if after.strip():
            return [after, text]
    return [text]


def is_cut(finish_reason: str | None) -> bool:
    """Whether a generator's finish reason says the text stopped at the token limit."""
    return finish_reason == "length"


def _extract(
    text: str,
    parse_span: Callable[[str], T | None],
    fallback: Callable[[str], T | None],
    extra: Callable[[str], list[tuple[int, T]]] | None = None,
    cut: bool = False,
) -> T | None:
    """Rule 1-5 of the module docstring, with the kind's own span parser and fallback; ``cut``: the
    text stopped at the token limit, so only final-answer statements count (rule 5)."""
    if not isinstance(text, str) or not text.strip():
        return None
    for part in _parts(text):
        found: list[tuple[int, T]] = []
        for span in answer_spans(part):
            value = parse_span(span.text)
            if value is not None:
                found.append((span.pos, value))
        if extra is not None:
            found.extend(extra(part))
        if found:
            return max(found, key=lambda pv: pv[0])[1]
        if cut:
            continue
        value = fallback(part)
        if value is not None:
            return value
    return None


# ---------------------------------------------------------------------------------------------
# cleaning a span

_LATEX_WRAP_RE = re.compile(r"\\(?:boxed|fbox|text|textbf|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{\s*([^{}]*?)\s*\}\s*\{\s*([^{}]*?)\s*\}")
_FILLER_RE = re.compile(
    r"^(?:therefore|thus|then|so|hence|clearly|probably|likely|definitely|simply|just|indeed|actually|"
    r"obviously|most\s+likely)\b[,:]?\s*",
    re.IGNORECASE,
)
_OPTION_WORD_RE = re.compile(r"^(?:the\s+)?(?:option|choice|letter)\b\s*:?\s*", re.IGNORECASE)
# A sentence ends at . ! ? or ; followed by a space or the end, unless the dot follows a capital
# letter ("B. 12", "D.C.") or sits between digits ("1.5").
_SENTENCE_END_RE = re.compile(r"(?<![A-Z\s])[.!?;](?=\s|$)")


def clean_span(span: str) -> str:
    """Drop markdown and LaTeX wrapping and leading filler: "**Therefore, \\boxed{B}**" -> "B"."""
    s = span
    for _ in range(3):
        s = _LATEX_WRAP_RE.sub(r"\1", s)
    s = _FRAC_RE.sub(r"\1/\2", s)
    s = s.replace("\\(", " ").replace("\\)", " ").replace("\\[", " ").replace("\\]", " ")
    s = s.replace("\\!", "").replace("\\,", "").replace("{,}", ",").replace("\\%", "%").replace("\\$", "$")
    s = s.replace("**", "").replace("__", "")
    s = s.strip().lstrip(":*`>#=-–— \t").strip() if not re.match(r"^\s*[-−]\s*\d", s) else s.strip()
    for _ in range(3):
        s2 = _FILLER_RE.sub("", s)
        if s2 == s:
            break
        s = s2
    return s


def first_sentence(s: str) -> str:
    m = _SENTENCE_END_RE.search(s)
    return s[: m.start()] if m else s


# ---------------------------------------------------------------------------------------------
# numbers

_SIGN = r"(?:(?<![\w)\].])[-−])?"
_DIGITS = r"(?:\d{1,3}(?:,\d{3})+(?!\d|,\d)|\d+)(?:\.\d+)?(?:/\d+(?![\d/]))?"
_NUM = _SIGN + r"(?<![\w.])" + _DIGITS
_NUM_RE = re.compile(_NUM)
# one more link of an expression after a number: "+ 5", "x 3", "= 8"
_CHAIN_RE = re.compile(r"\s*(?:[-+*/×÷]|\sx\s|(=))\s*(" + _SIGN + _DIGITS + ")")


def parse_number(s: str) -> Fraction | None:
    """One number token ("1,234.5", "-3", "1/2", "−7") as an exact fraction; ``None`` if it is not one."""
    s = s.strip().replace("−", "-").replace(",", "")
    try:
        if "/" in s:
            num, den = s.split("/", 1)
            d = Fraction(den)
            return None if d == 0 else Fraction(Decimal(num)) / d
        return Fraction(Decimal(s))
    except (ValueError, ArithmeticError):
        return None


def format_number(x: Fraction) -> str:
    """Canonical text: "18", "-3", "0.5", "1/3"."""
    if x.denominator == 1:
        return str(x.numerator)
    d = x.denominator
    while d % 2 == 0:
        d //= 2
    while d % 5 == 0:
        d //= 5
    if d != 1:
        return f"{x.numerator}/{x.denominator}"
    with localcontext() as ctx:
        ctx.prec = 200
        text = format(Decimal(x.numerator) / Decimal(x.denominator), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _strip_money(s: str) -> str:
    return s.replace("$", " ").replace("€", " ").replace("£", " ")


def _number_in_span(span: str) -> str | None:
    """The first number of the span's first sentence, or the value after "=" when it opens an expression."""
    s = first_sentence(_strip_money(clean_span(span)))
    if re.match(r"^not\b", s, re.IGNORECASE):
        return None
    m = _NUM_RE.search(s)
    if m is None:
        return None
    value, pos, after_eq = m.group(0), m.end(), None
    while True:
        c = _CHAIN_RE.match(s, pos)
        if c is None:
            break
        if c.group(1):
            after_eq = c.group(2)
        pos = c.end()
    x = parse_number(after_eq if after_eq is not None else value)
    return format_number(x) if x is not None else None


def _last_number(text: str) -> str | None:
    s = _strip_money(text.replace("**", "").replace("{,}", ","))
    s = _FRAC_RE.sub(r"\1/\2", s)
    for m in reversed(list(_NUM_RE.finditer(s))):
        x = parse_number(m.group(0))
        if x is not None:
            return format_number(x)
    return None


# "A:" opening a line (after markdown) or following a sentence, then the number right after it
_NUMERIC_A_RE = re.compile(r"(?:^[ \t>#*]*|(?<=[.?!])[ \t]+)A[ \t*]*:[ \t*]*(?=[$€£]?[ \t]*[-−]?\d)", re.MULTILINE)
# the number (or its start) a cut text ends on: "= 79", "#### 1,2", "is 1."
_TRAILING_NUMBER_RE = re.compile(r"[-−]?[\d,./]*\d[.,/]?\Z")


def _a_statements(part: str) -> list[tuple[int, str]]:
    """Numeric ``A:`` statements: (position, number) for each one followed right away by a number."""
    out = []
    for m in _NUMERIC_A_RE.finditer(part):
        end = part.find("\n", m.end())
        value = _number_in_span(part[m.end() : end if end >= 0 else len(part)][:_SPAN_MAX])
        if value is not None:
            out.append((m.start(), value))
    return out


# the text ends inside a GSM8K calculator note: "<<" and then only what such a note holds ("16-3-4=9")
_OPEN_NOTE_RE = re.compile(r"<<[\d.,+\-*/=()]*\Z")


def open_calculator_note(text: str) -> bool:
    """The text ends inside a GSM8K calculator note (``<<16-3=13>>``) never closed: it was cut off there.
    Only the note's own characters may follow the ``<<``, so "1 << 3 = 8" (a shift) is no such note."""
    return _OPEN_NOTE_RE.search(text) is not None


def extract_number(text: str, finish_reason: str | None = None) -> str | None:
    """The final numeric answer, canonical ("18.00" -> "18", "#### 1,234" -> "1234"), or ``None``.

    ``finish_reason`` is the generator's ("length": cut off at the token limit; rule 5).
    """
    if not isinstance(text, str):
        return None
    cut = is_cut(finish_reason) or open_calculator_note(text)
    if cut:
        text = _TRAILING_NUMBER_RE.sub("", text)
    return _extract(text, _number_in_span, _last_number, extra=_a_statements, cut=cut)


# ---------------------------------------------------------------------------------------------
# multiple choice letters


def _choice_in_span(s: str, letters: str, choices: Sequence[str]) -> str | None:
    """The choice whose text the span states (longest match wins, numbers compare by value)."""
    best: tuple[int, str] | None = None
    text = normalize_exact(first_sentence(s))
    stated = _number_in_span(s)
    value = parse_number(stated) if stated is not None else None
    for i, choice in enumerate(choices[: len(letters)]):
        c = normalize_exact(choice)
        if not c:
            continue
        cnum = parse_number(_strip_money(c)) if _NUM_RE.fullmatch(_strip_money(c).strip()) else None
        if cnum is not None:
            hit = value is not None and value == cnum
        else:
            hit = text == c or (text.startswith(c) and not text[len(c)].isalnum())
        if hit and (best is None or len(c) > best[0]):
            best = (len(c), letters[i])
    return best[1] if best else None


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

    return _extract(text, lambda s: _letter_in_span(s, letters, choices), fallback, extra=is_correct,
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
    return _extract(text, _yesno_in_span, _yesno_fallback, cut=is_cut(finish_reason))


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
    if "\n" in stripped or len(stripped) > _SPAN_MAX:
        return None
    return normalize_exact(clean_span(stripped)) or None


def extract_exact(text: str, finish_reason: str | None = None) -> str | None:
    """The stated final answer, normalised with :func:`normalize_exact`; a one-line reply counts whole,
    unless it was cut off (``"length"``): then statements only."""
    return _extract(text, _exact_in_span, _exact_fallback, cut=is_cut(finish_reason))
