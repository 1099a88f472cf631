"""The first wrong step of a reasoning trace, for error-localised negatives (``pairs.rejected_span:
first_error``). Pure functions of text.

A wrong trace usually starts right: it restates the question and does a step or two the positives do
too. A whole-sequence preference term pushes those shared, correct tokens down with the error. When
the trace's steps can be checked, the term can act from the first wrong step on instead (Step-DPO,
arXiv 2406.18629; Setlur et al., arXiv 2406.14532). What is checked here:

* **arithmetic**: every equation ``a op b [op c ...] = r`` (``+ - * / x × ÷``, precedence as usual;
  a running total ``14 + 1 = 15 + 3 = 18`` is two equations; GSM8K's ``<<48/2=24>>`` annotations are
  equations too). The first whose two sides differ is the first error, and the step starts where the
  equation starts;
* **a multiple-choice mapping** (``McqTask``): a statement ``V is (L)`` whose option ``L`` holds a number
  other than ``V`` ("29 is (C)" when option C is 23).

What is not: a right equation on the wrong numbers (a copied quantity, the wrong operation). Such a
trace has no located error and keeps the whole-sequence term. The offsets are character offsets into
the trace; the training stage turns them into token positions (``batching.tokenize_pair``).
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Sequence

_NUMBER = r"(?:\d{1,3}(?:,\d{3})+(?![\d,])|\d+)(?:\.\d+)?"
_OP = r"[-+*/×÷−]|(?<=\s)[xX](?=\s)"
# a left side of at least two numbers joined by operators (not after a sign, a digit or a letter: "-3 + 5" is
# not "3 + 5"), "=", a (possibly negative) right side that is a number (not a fraction "3/4", nor the first
# factor of a product "2 * 10"; "= 15 + 3 = 18" is a running total, read as two equations)
_EQUATION_RE = re.compile(
    rf"(?<![\w.,\-−])(?P<lhs>{_NUMBER}(?:\s*(?:{_OP})\s*{_NUMBER})+)\s*=\s*(?P<rhs>[-−]?{_NUMBER})"
    rf"(?![\w]|[.,]\d|\s*(?:[*/×÷]|[xX]\s)\s*\d)"
)
_TOKEN_RE = re.compile(rf"{_NUMBER}|{_OP}")
_MAPPING_RE = re.compile(rf"(?<![\w.,])(?P<value>[-−]?{_NUMBER})\s+is\s+\(?(?P<letter>[A-Z])\)", re.IGNORECASE)


def _number(text: str) -> Fraction:
    return Fraction(text.replace(",", "").replace("−", "-"))


def evaluate(expression: str) -> Fraction | None:
    """The value of ``a op b op c ...`` (``*`` and ``/`` before ``+`` and ``-``), exactly; None on a
    division by zero or text that is not such an expression."""
    tokens = _TOKEN_RE.findall(expression)
    if len(tokens) < 3 or len(tokens) % 2 == 0:
        return None
    ops = [t.replace("×", "*").replace("÷", "/").replace("−", "-").replace("X", "*").replace("x", "*")
           for t in tokens[1::2]]
    try:
        values = [_number(t) for t in tokens[0::2]]
    except (ValueError, ZeroDivisionError):
        return None
    terms, signs = [values[0]], []
    for op, v in zip(ops, values[1:]):
        if op in "*/":
            if op == "/" and v == 0:
                return None
            terms[-1] = terms[-1] * v if op == "*" else terms[-1] / v
        elif op in "+-":
            signs.append(op)
            terms.append(v)
        else:
            return None
    total = terms[0]
    for op, v in zip(signs, terms[1:]):
        total = total + v if op == "+" else total - v
    return total


def _holds(value: Fraction, rhs: str) -> bool:
    """Whether ``rhs`` states ``value``: exactly, or rounded to the decimals it writes ("10 / 3 = 3.33")."""
    stated = _number(rhs)
    decimals = len(rhs.split(".", 1)[1]) if "." in rhs else 0
    return stated == value if decimals == 0 else abs(stated - value) <= Fraction(1, 2 * 10**decimals)


def first_arithmetic_error(text: str) -> int | None:
    """Where the first wrong equation of ``text`` starts (a character offset), None when every equation
    holds or there is none. A division by zero counts as wrong; a decimal result may be rounded."""
    pos = 0
    while (m := _EQUATION_RE.search(text, pos)) is not None:
        value = evaluate(m.group("lhs"))
        if value is None or not _holds(value, m.group("rhs")):
            return m.start()
        pos = m.start("rhs")  # the result may start the next equation of a running total
    return None


def first_mapping_error(text: str, choices: Sequence[str]) -> int | None:
    """Where the first ``V is (L)`` statement whose option ``L`` is a number other than ``V`` starts; None
    when there is none (an option that is not a number, or a letter past the options, is not checked)."""
    options: dict[str, Fraction] = {}
    for i, c in enumerate(choices):
        c = str(c).strip()
        if re.fullmatch(rf"[-−]?{_NUMBER}", c):
            options[chr(ord("A") + i)] = _number(c)
    for m in _MAPPING_RE.finditer(text):
        held = options.get(m.group("letter").upper())
        if held is not None and held != _number(m.group("value")):
            return m.start()
    return None


def earliest(*offsets: int | None) -> int | None:
    """The smallest offset found, None when none was."""
    found = [o for o in offsets if o is not None]
    return min(found) if found else None
