"""Finding final-answer statements in model output, cleaning what they say, and the extraction rule
every answer kind shares (rules 1-5 in the docstring of ``tasks/extract.py``). Pure functions."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, TypeVar

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
SPAN_MAX = 300


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
            for line in text[end + 1 : end + 1 + SPAN_MAX * 2].split("\n"):
                if not _BLANKISH_RE.match(line):
                    rest = line
                    break
        spans.append(Span(m.start(), rest[:SPAN_MAX]))
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


def extract_with_rules(
    text: str,
    parse_span: Callable[[str], T | None],
    fallback: Callable[[str], T | None],
    extra: Callable[[str], list[tuple[int, T]]] | None = None,
    cut: bool = False,
) -> T | None:
    """Rule 1-5 of ``tasks/extract.py``'s docstring, with the kind's own span parser and fallback; ``cut``: the
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
FRAC_RE = re.compile(r"\\[dt]?frac\s*\{\s*([^{}]*?)\s*\}\s*\{\s*([^{}]*?)\s*\}")
_FILLER_RE = re.compile(
    r"^(?:therefore|thus|then|so|hence|clearly|probably|likely|definitely|simply|just|indeed|actually|"
    r"obviously|most\s+likely)\b[,:]?\s*",
    re.IGNORECASE,
)
# A sentence ends at . ! ? or ; followed by a space or the end, unless the dot follows a capital
# letter ("B. 12", "D.C.") or sits between digits ("1.5").
_SENTENCE_END_RE = re.compile(r"(?<![A-Z\s])[.!?;](?=\s|$)")


def clean_span(span: str) -> str:
    """Drop markdown and LaTeX wrapping and leading filler: "**Therefore, \\boxed{B}**" -> "B"."""
    s = span
    for _ in range(3):
        s = _LATEX_WRAP_RE.sub(r"\1", s)
    s = FRAC_RE.sub(r"\1/\2", s)
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
