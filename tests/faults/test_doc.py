"""docs/reliability.md stays true to the tests: every test it names exists, its figures are the counts
of its own tables and of the bad-input cases, and every bad-input id it cites is a row."""

from __future__ import annotations

import re

from .common import REPO
from .test_bad_inputs import CASES, DOC


def _block(text: str, name: str) -> str:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    assert start in text and end in text, f"{DOC} lacks the {name} block"
    return text[text.index(start) + len(start): text.index(end)]


def _rows(block: str) -> list[list[str]]:
    rows = [line for line in block.strip().splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    return [[c.strip() for c in row.strip("|").split(" | ")] for row in rows[1:]]  # without the header


def test_every_test_the_doc_names_exists() -> None:
    text = DOC.read_text(encoding="utf-8")
    named = set(re.findall(r"(tests/[\w/]+\.py)::(\w+)", text))
    assert len(named) > 20
    for path, name in sorted(named):
        source = (REPO / path).read_text(encoding="utf-8")
        assert re.search(rf"^(def |class )?{name}\b", source, re.M), f"{path}::{name} named in {DOC.name} does not exist"


def test_the_figures_are_the_counts_of_the_tables() -> None:
    text = DOC.read_text(encoding="utf-8")
    faults = _rows(_block(text, "faults"))
    assert [int(r[0]) for r in faults] == list(range(1, len(faults) + 1))
    here = [r for r in faults if "tests/faults/" in r[-1] or r[-1].startswith("same")]
    figures = _block(text, "figures")
    assert f"Faults tried: **{len(faults)}** (the rows of the fault table below; {len(here)} of them in `tests/faults/`" \
        in " ".join(figures.split()), figures
    assert f"Bad inputs tried: **{len(CASES)}**" in figures
    assert "Keys lost: **0**. Keys stored twice: **0**." in figures


def test_every_bad_input_the_doc_cites_is_a_row() -> None:
    text = DOC.read_text(encoding="utf-8")
    ids = {c.id for c in CASES}
    cited = set()
    for group in re.findall(r"bad inputs? ((?:`[a-z0-9-]+`(?:, )?)+)", text):
        cited |= set(re.findall(r"`([a-z0-9-]+)`", group))
    fixed = text[text.index("Fixed on the way"): text.index("## Not tested")]
    for group in re.findall(r"\((`[a-z0-9-]+`(?:, `[a-z0-9-]+`)*)\)", fixed):
        cited |= set(re.findall(r"`([a-z0-9-]+)`", group))
    assert len(cited) > 10
    assert cited <= ids, f"cited but not rows: {sorted(cited - ids)}"
