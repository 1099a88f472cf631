"""Generator that replays recorded traces from a JSONL file, keyed by question id.

Why: traces produced elsewhere (another tool, an earlier run, a paid API batch job) can feed the
pipeline without calling any model, and tests get a deterministic teacher. The file is data only:
it is parsed as JSON, never executed.

One JSON object per line, blank lines skipped. The id is ``id`` or ``question_id`` (a string or an
integer, compared as a string); the trace is ``text``, ``output`` or ``response`` (one trace per
line), or ``texts`` (a list of traces). Several lines may share an id; their traces keep file order.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from ..config import GeneratorConfig
from ..errors import UserError
from ..store import iter_jsonl
from .base import GenerationStats, Request, Sample

ID_FIELDS = ("id", "question_id")
TEXT_FIELDS = ("text", "output", "response")


def _first_present(obj: dict[str, Any], names: Sequence[str]) -> tuple[str, Any] | None:
    for name in names:
        if name in obj:
            return name, obj[name]
    return None


def parse_trace_line(obj: Any, where: str) -> tuple[str, list[str]]:
    """(question id, traces) from one decoded line; ``where`` is ``file:line`` for error messages."""
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    found_id = _first_present(obj, ID_FIELDS)
    if found_id is None:
        raise UserError(f"{where}: no question id (expected one of the fields {', '.join(ID_FIELDS)})")
    id_field, qid = found_id
    if isinstance(qid, bool) or not isinstance(qid, (str, int)):
        raise UserError(f"{where}: field '{id_field}' must be a string or an integer, got {type(qid).__name__}")
    if "texts" in obj:
        texts = obj["texts"]
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise UserError(f"{where}: field 'texts' must be a list of strings")
        return str(qid), list(texts)
    found_text = _first_present(obj, TEXT_FIELDS)
    if found_text is None:
        raise UserError(f"{where}: no trace (expected one of the fields {', '.join(TEXT_FIELDS)} or texts)")
    text_field, text = found_text
    if not isinstance(text, str):
        raise UserError(f"{where}: field '{text_field}' must be a string, got {type(text).__name__}")
    return str(qid), [text]


def load_traces(path: Path) -> dict[str, list[str]]:
    """All traces in ``path`` by question id, in file order; bad lines raise :class:`UserError`."""
    traces: dict[str, list[str]] = {}
    for where, obj in iter_jsonl(path, what="generator.path: replay file"):
        qid, texts = parse_trace_line(obj, where)
        traces.setdefault(qid, []).extend(texts)
    return traces


class ReplayGenerator:
    """For each request, the first ``n`` recorded traces of its question id (``Request.key``).

    A request with fewer recorded traces gets fewer samples; the shortfall is counted in
    ``stats.extra["missing"]`` (samples) and ``stats.extra["short_requests"]`` (requests). Sampling
    settings are ignored: the traces are what they are.
    """

    def __init__(self, cfg: GeneratorConfig) -> None:
        if not cfg.path:
            raise UserError("generator.path: the replay generator needs a JSONL file of recorded traces")
        self.path = Path(cfg.path)
        self.name = f"replay:{self.path.name}"
        self.stats = GenerationStats()
        self._traces = load_traces(self.path)

    def __repr__(self) -> str:
        return f"ReplayGenerator(path={str(self.path)!r}, questions={len(self._traces)})"

    def check_ids(self, records: Sequence[Any]) -> None:
        """Refuse a file that holds traces for none of ``records`` (the replay file of another dataset, or
        ids written differently): every question would silently end up without a trace."""
        ids = [r.id for r in records]
        if not ids or any(i in self._traces for i in ids):
            return
        theirs = ", ".join(repr(k) for k in list(self._traces)[:3]) or "none"
        raise UserError(
            f"{self.path} holds traces for none of the {len(ids)} training questions (its ids: {theirs}; the "
            f"questions': {', '.join(repr(i) for i in ids[:3])}); is it the replay file of this dataset?"
        )

    def generate(self, requests: Sequence[Request]) -> list[list[Sample]]:
        out: list[list[Sample]] = []
        for req in requests:
            texts = self._traces.get(req.key, [])[: req.n]
            samples = [Sample(text=t, num_tokens=math.ceil(len(t) / 4), finish_reason="stop") for t in texts]
            short = req.n - len(samples)
            if short > 0:
                self.stats.extra["missing"] = self.stats.extra.get("missing", 0) + short
                self.stats.extra["short_requests"] = self.stats.extra.get("short_requests", 0) + 1
            self.stats.requests += 1
            self.stats.samples += len(samples)
            self.stats.completion_tokens += sum(s.num_tokens for s in samples)
            out.append(samples)
        return out
