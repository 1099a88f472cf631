"""Numeric answers: number tokens as exact fractions, their canonical text, and the final number of
a model's output (the rules in the docstring of ``tasks/extract.py``). Pure functions."""

from __future__ import annotations

import re
from decimal import Decimal, localcontext
from fractions import Fraction

from .spans import FRAC_RE, SPAN_MAX, extract_with_rules, clean_span, first_sentence, is_cut


_SIGN = r"(?:(?<![\w)\].])[-−])?"
_DIGITS = r"(?:\d{1,3}(?:,\d{3})+(?!\d|,\d)|\d+)(?:\.\d+)?(?:/\d+(?![\d/]))?"
_NUM = _SIGN + r"(?<![\w.])" + _DIGITS
NUM_RE = re.compile(_NUM)
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


def strip_money(s: str) -> str:
    return s.replace("$", " ").replace("€", " ").replace("£", " ")


def number_in_span(span: str) -> str | None:
    """The first number of the span's first sentence, or the value after "=" when it opens an expression."""
    s = first_sentence(strip_money(clean_span(span)))
    if re.match(r"^not\b", s, re.IGNORECASE):
        return None
    m = NUM_RE.search(s)
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


def last_number(text: str) -> str | None:
    s = strip_money(text.replace("**", "").replace("{,}", ","))
    s = FRAC_RE.sub(r"\1/\2", s)
    for m in reversed(list(NUM_RE.finditer(s))):
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
        value = number_in_span(part[m.end() : end if end >= 0 else len(part)][:SPAN_MAX])
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
    return extract_with_rules(text, number_in_span, last_number, extra=_a_statements, cut=cut)
