"""The sampling stages: ask a generator for K traces per question, verify them, store them.

Work goes in chunks of questions; each chunk's verified samples are appended (and fsynced) before the
next chunk starts, so a kill loses at most one chunk of generation and a rerun asks only for what is
missing. Failed requests are logged to ``failures.jsonl`` beside the store and retried on the next run.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from tqdm.auto import tqdm

from .config import SamplingConfig
from .generators.base import Generator, Request
from .records import Record
from .store import TraceStore


@dataclass
class SampleSummary:
    """What a sampling stage did, printed at its end and kept in metrics.jsonl."""

    stage: str
    questions: int = 0
    samples: int = 0
    new_samples: int = 0
    correct: int = 0
    no_positive: int = 0
    parse_failures: int = 0
    failed_requests: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def correct_share(self) -> float:
        return self.correct / self.samples if self.samples else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(correct_share=self.correct_share, tokens_per_second=self.tokens_per_second)
        return d

    def rows(self) -> list[tuple[str, str]]:
        return [
            ("questions", str(self.questions)),
            ("samples (new)", f"{self.samples} ({self.new_samples})"),
            ("correct share", f"{self.correct_share:.1%}"),
            ("questions with no positive", str(self.no_positive)),
            ("parse failures", str(self.parse_failures)),
            ("failed requests", str(self.failed_requests)),
            ("tokens/s (new samples)", f"{self.tokens_per_second:.1f}"),
        ]


def sampling_settings(generator_name: str, sampling: SamplingConfig, task_fingerprint: Any) -> dict[str, Any]:
    """What determines a stored sample; its hash guards the store against silent reuse."""
    return {
        "generator": generator_name,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_tokens": sampling.max_tokens,
        "seed": sampling.seed,
        "task": task_fingerprint,
    }


def request_seed(base: int, qid: str, start: int) -> int:
    """A per-request seed that depends on the question and the first sample index, not on order."""
    import zlib

    return (base * 1_000_003 + zlib.crc32(qid.encode()) * 31 + start) % (2**31 - 1)


def sample_traces(
    records: Sequence[Record],
    task: Any,
    generator: Generator | None,
    sampling: SamplingConfig,
    store: TraceStore,
    source: str,
    k: int | None = None,
    chunk_questions: int = 32,
    progress: bool = True,
) -> SampleSummary:
    """Make sure ``store`` holds ``k`` (default ``sampling.samples``) samples per record.

    ``generator`` may be None when the store is already complete (nothing is generated then).
    """
    k = sampling.samples if k is None else k
    summary = SampleSummary(stage=source, questions=len(records))
    failures_path = store.path.with_name(store.path.stem + ".failures.jsonl")
    todo = [(r, store.count(r.id)) for r in records if store.count(r.id) < k]
    if not todo:
        return summarise_store(store, records, k, summary)
    assert generator is not None, "missing samples but no generator"
    bar = tqdm(total=sum(k - have for _, have in todo), desc=f"{source} samples", unit="sample", disable=not progress)
    start = time.perf_counter()
    tokens_before = generator.stats.completion_tokens
    failed_before = generator.stats.failed_requests
    for c in range(0, len(todo), chunk_questions):
        chunk = todo[c : c + chunk_questions]
        requests = [
            Request(
                key=r.id,
                messages=tuple(task.messages(r)),
                n=k - have,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_tokens,
                seed=request_seed(sampling.seed, r.id, have),
            )
            for r, have in chunk
        ]
        results = generator.generate(requests)
        rows, failures = [], []
        for (record, have), samples in zip(chunk, results):
            idx = have
            for s in samples:
                if s.failed:
                    failures.append({"id": record.id, "error": s.error, "time": time.time()})
                    continue
                answer = task.extract(s.text, record=record)
                rows.append(
                    {
                        "id": record.id,
                        "sample": idx,
                        "text": s.text,
                        "answer": answer,
                        "correct": bool(task.check(answer, record)),
                        "source": source,
                        "generator": generator.name,
                        "num_tokens": s.num_tokens,
                        "finish_reason": s.finish_reason,
                    }
                )
                idx += 1
        summary.new_samples += store.append(rows)
        if failures and store.writer:
            with failures_path.open("a", encoding="utf-8") as f:
                f.write("".join(json.dumps(x) + "\n" for x in failures))
        bar.update(sum(len(s) for s in results))
    bar.close()
    summary.seconds = time.perf_counter() - start
    summary.completion_tokens = generator.stats.completion_tokens - tokens_before
    summary.failed_requests = generator.stats.failed_requests - failed_before
    return summarise_store(store, records, k, summary)


def summarise_store(store: TraceStore, records: Sequence[Record], k: int, summary: SampleSummary) -> SampleSummary:
    """Fill the totals of ``summary`` from what the store holds for ``records``."""
    summary.questions = len(records)
    for r in records:
        got = store.for_question(r.id)[:k]
        summary.samples += len(got)
        n_ok = sum(1 for x in got if x["correct"])
        summary.correct += n_ok
        summary.parse_failures += sum(1 for x in got if x["answer"] is None)
        summary.no_positive += n_ok == 0
    return summary
