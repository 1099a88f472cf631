"""The report's text as blocks (headings, paragraphs, tables, images), rendered twice: as Markdown
(images linked) and as one self-contained HTML page (images embedded, so the one file can be mailed or
attached to an issue); and the number formats the tables use."""

from __future__ import annotations

import base64
import html
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Image:
    path: Path  # relative to the report's folder
    caption: str


Block = Union[Heading, Para, Table, Image]


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: Sequence[Block], root: Path) -> str:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"{'#' * b.level} {b.text}\n")
        elif isinstance(b, Para):
            out.append(f"{b.text}\n")
        elif isinstance(b, Table):
            out.append("| " + " | ".join(map(_md_cell, b.header)) + " |")
            out.append("|" + "|".join(" --- " for _ in b.header) + "|")
            out.extend("| " + " | ".join(map(_md_cell, r)) + " |" for r in b.rows)
            out.append("")
        elif isinstance(b, Image):
            out.append(f"![{b.caption}]({b.path.as_posix()})\n\n*{b.caption}*\n")
    return "\n".join(out)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:0.92em}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f2f2f2}
td:first-child,th:first-child{text-align:left}figure{margin:1.5em 0}img{max-width:100%;border:1px solid #eee}
figcaption{color:#555;font-style:italic}code{background:#f5f5f5;padding:0 3px}
"""


def _inline_html(text: str) -> str:
    """Escape, then turn the Markdown we write ourselves (`code`, **bold**) into tags."""
    t = html.escape(text)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", t)


def render_html(blocks: Sequence[Block], root: Path, title: str) -> str:
    """One self-contained page: every image is embedded, nothing is fetched."""
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{_CSS}</style></head><body>"]
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{_inline_html(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            out.append(f"<p>{_inline_html(b.text)}</p>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{_inline_html(h)}</th>" for h in b.header)
            body = "".join("<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in r) + "</tr>" for r in b.rows)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif isinstance(b, Image):
            data = base64.b64encode((root / b.path).read_bytes()).decode("ascii")
            out.append(f"<figure><img alt='{html.escape(b.caption)}' src='data:image/png;base64,{data}'>"
                       f"<figcaption>{_inline_html(b.caption)}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out)


# ---- number formatting -----------------------------------------------------------------------------


def fmt_pct(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.{digits}f}%"


def fmt_pp(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:+.1f} pp"


def fmt_ci(ci: Sequence[float]) -> str:
    lo, hi = ci
    return "n/a" if not (math.isfinite(lo) and math.isfinite(hi)) else f"{100 * lo:.1f}-{100 * hi:.1f}%"


def fmt_num(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def fmt_count(x: float | None) -> str:
    """A count: "80", not "80.0"; a mean of counts over seeds or epochs keeps one decimal when it has one."""
    if x is None or not math.isfinite(x):
        return "n/a"
    return str(int(round(x))) if abs(x - round(x)) < 1e-9 else f"{x:.1f}"
