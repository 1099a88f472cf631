"""Generator that replays recorded traces from a JSONL file, keyed by question id.

Why: traces produced elsewhere (another tool, an earlier run, a paid API batch job) can feed the
pipeline without calling any model, and tests get a deterministic teacher. The file is data only:
it is parsed as JSON, never executed.

One JSON object per line, blank lines skipped. The id is ``id`` or ``question_id`` (a string or an
integer, compared as a string); the trace is ``text``, ``output`` or ``response`` (one trace per
line), or ``texts`` (a list of traces). Several lines may share an id; their traces keep file order.
An optional ``finish_reason`` (``"length"`` for a trace cut off at the token limit) applies to the
line's traces; it defaults to ``"stop"``. Any other field (a question, a score, a model name) is
ignored.

Fewer traces for a question than ``sampling.samples`` asks (a file of 4 per question, ``samples: 8``):
the generator says so when it is built, counting the questions and the samples that will be missing,
and then warns (``on_missing: warn``, the default: the stage stores what there is) or refuses
(``on_missing: error``) before anything is stored.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Sequence

from ..config import ReplayGeneratorConfig
from ..errors import UserError
from ..store import iter_jsonl
from .base import GenerationStats, Request, Sample

log = logging.getLogger(__name__)

ID_FIELDS = ("id", "question_id")
TEXT_FIELDS = ("text", "output", "response")
FINISH_FIELD = "finish_reason"


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


def parse_finish_reason(obj: dict[str, Any], where: str) -> str:
    """The line's ``finish_reason`` (``"stop"`` when absent or null)."""
    reason = obj.get(FINISH_FIELD)
    if reason is None:
        return "stop"
    if not isinstance(reason, str):
        raise UserError(f"{where}: field '{FINISH_FIELD}' must be a string such as \"stop\" or \"length\", "
                        f"got {type(reason).__name__}")
    return reason


def load_replay(path: Path) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """``(traces, finish reasons)`` by question id, in file order; bad lines raise :class:`UserError`."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"generator.path: replay file {path} is a directory, not a file")
    traces: dict[str, list[str]] = {}
    reasons: dict[str, list[str]] = {}
    for where, obj in iter_jsonl(path, what="generator.path: replay file"):
        qid, texts = parse_trace_line(obj, where)
        reason = parse_finish_reason(obj, where)
        traces.setdefault(qid, []).extend(texts)
        reasons.setdefault(qid, []).extend([reason] * len(texts))
    return traces, reasons


class ReplayGenerator:
    """For each request, ``n`` recorded traces of its question id (``Request.key``): from trace
    ``Request.start`` on when the request carries that field (the index of the question's first
    missing sample), else from the first.

    A request with fewer recorded traces gets fewer samples; the shortfall is counted in
    ``stats.extra["missing"]`` (samples) and ``stats.extra["short_requests"]`` (requests).
    :meth:`check_ids` (called when the generator is built for a stage) compares the file with the
    stage's questions and ``sampling.samples`` first, and warns or refuses by ``on_missing``. Other
    sampling settings are ignored: the traces are what they are.
    """

    def __init__(self, cfg: ReplayGeneratorConfig) -> None:
        if not cfg.path:
            raise UserError("generator.path: the replay generator needs a JSONL file of recorded traces")
        self.path = Path(cfg.path)
        self.name = f"replay:{self.path.name}"
        self.stats = GenerationStats()
        self.samples = cfg.sampling.samples
        self.on_missing = cfg.on_missing
        self._traces, self._reasons = load_replay(self.path)
        self.shortfall: dict[str, int] = {}  # set by check_ids: question id -> samples the file lacks

    def __repr__(self) -> str:
        return f"ReplayGenerator(path={str(self.path)!r}, questions={len(self._traces)})"

    def check_ids(self, records: Sequence[Any]) -> None:
        """Refuse a file that holds traces for none of ``records`` (the replay file of another dataset, or
        ids written differently): every question would silently end up without a trace. Then
        :meth:`check_samples`: fewer traces than ``sampling.samples`` warn or refuse."""
        ids = [r.id for r in records]
        if not ids:
            return
        if any(i in self._traces for i in ids):
            self.check_samples(records)
            return
        theirs = ", ".join(repr(k) for k in list(self._traces)[:3]) or "none"
        raise UserError(
            f"{self.path} holds traces for none of the {len(ids)} training questions (its ids: {theirs}; the "
            f"questions': {', '.join(repr(i) for i in ids[:3])}); is it the replay file of this dataset?"
        )

    def check_samples(self, records: Sequence[Any], k: int | None = None) -> dict[str, int]:
        """Compare the file with ``k`` (default ``sampling.samples``) traces for each of ``records``.

        Returns the shortfall by question id (empty when the file has enough) and keeps it in
        ``self.shortfall``. A shortfall warns once (``on_missing: warn``) or raises :class:`UserError`
        (``on_missing: error``), in both cases naming the questions and samples missing and the fixes.
        """
        k = self.samples if k is None else k
        short = {r.id: k - len(self._traces.get(r.id, [])) for r in records}
        self.shortfall = short = {i: n for i, n in short.items() if n > 0}
        if not short:
            return short
        first = next(iter(short))
        fewest = min(len(self._traces.get(r.id, [])) for r in records)
        what = (f"{self.path} holds fewer than the {k} traces per question that sampling.samples asks for, for "
                f"{len(short)} of the {len(records)} questions ({sum(short.values())} samples missing; "
                f"{first!r} has {k - short[first]})")
        fixes = f"record more traces, set sampling.samples to {fewest}" if fewest > 0 else "record more traces"
        if self.on_missing == "error":
            raise UserError(f"generator.on_missing is error: {what}; {fixes}, or set on_missing: warn to store "
                            "what there is")
        log.warning("%s: %s; the stage stores what there is and counts the missing samples (%s, or set "
                    "on_missing: error to refuse)", self.name, what, fixes)
        return short

    def generate(self, requests: Sequence[Request]) -> list[list[Sample]]:
        out: list[list[Sample]] = []
        for req in requests:
            start = max(0, int(req.start))
            texts = self._traces.get(req.key, [])[start : start + req.n]
            reasons = self._reasons.get(req.key, [])[start : start + req.n]
            samples = [Sample(text=t, num_tokens=math.ceil(len(t) / 4), finish_reason=f) for t, f in zip(texts, reasons)]
            short = req.n - len(samples)
            if short > 0:
                self.stats.extra["missing"] = self.stats.extra.get("missing", 0) + short
                self.stats.extra["short_requests"] = self.stats.extra.get("short_requests", 0) + 1
            self.stats.requests += 1
            self.stats.samples += len(samples)
            self.stats.completion_tokens += sum(s.num_tokens for s in samples)
            out.append(samples)
        return out
