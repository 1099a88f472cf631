"""The sampling stages: ask a generator for K traces per question, verify them, store them.

Work goes in chunks of questions; each chunk's verified samples are appended (and fsynced) before the
next chunk starts, so a kill loses at most one chunk of generation and a rerun asks only for what is
missing. Failed requests are logged to ``failures.jsonl`` beside the store and retried on the next run.

A reasoning teacher's sample comes as an answer (``Sample.text``) and the reasoning its server sent
apart (``Sample.reasoning``). The row keeps both (``content``, ``reasoning``); its ``text``, what the
student trains on, is composed by :func:`training_text` as ``sampling.reasoning`` says; its ``answer`` is
extracted from the content alone, or from the reasoning when the content is empty.
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
from .tasks.base import extract_answer


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
    requests: int = 0  # requests (questions) sent to the generator by this stage
    missing: int = 0  # samples short of K after the stage (failed requests, or a source with fewer)
    prompt_tokens: int = 0  # the generator's token use for the new samples, as its server reported it
    reasoning_tokens: int = 0  # the part of completion_tokens spent on reasoning

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
        rows = [
            ("questions", str(self.questions)),
            ("samples (new)", f"{self.samples} ({self.new_samples})"),
            ("correct share", f"{self.correct_share:.1%}"),
            ("questions with no positive", str(self.no_positive)),
            ("parse failures", str(self.parse_failures)),
            ("failed requests", str(self.failed_requests)),
        ]
        if self.missing:
            rows.append(("missing samples", str(self.missing)))
        if self.prompt_tokens:
            rows.append(("prompt tokens (new samples)", str(self.prompt_tokens)))
        rows.append(("completion tokens (new samples)", str(self.completion_tokens)))
        if self.reasoning_tokens:
            rows.append(("of which reasoning", str(self.reasoning_tokens)))
        rows.append(("tokens/s (new samples)", f"{self.tokens_per_second:.1f}"))
        return rows


REASONING_DEFAULT = "think"


def sampling_settings(generator_name: str, sampling: SamplingConfig, task_fingerprint: Any) -> dict[str, Any]:
    """What determines a stored sample; its hash guards the store against silent reuse.

    ``sampling.reasoning`` is in it when it is not the default: any two choices give two hashes, and a
    store made before the choice existed (whose text is what the default makes of a teacher without
    separate reasoning) keeps its hash.
    """
    settings = {
        "generator": generator_name,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_tokens": sampling.max_tokens,
        "seed": sampling.seed,
        "task": task_fingerprint,
    }
    if sampling.reasoning != REASONING_DEFAULT:
        settings["reasoning"] = sampling.reasoning
    if sampling.greedy_first:  # left out when off: stores made before the setting keep their hashes
        settings["greedy_first"] = True
    return settings


def request_plan(have: int, k: int, sampling: SamplingConfig) -> list[tuple[int, int, float]]:
    """The requests that take a question from ``have`` stored samples to ``k``, as (index of the first
    sample, how many, temperature): with ``sampling.greedy_first`` the greedy decode comes first (sample 0),
    then the samples at ``sampling.temperature``."""
    plan = []
    if sampling.greedy_first and have == 0:
        plan.append((0, 1, 0.0))
        have = 1
    if have < k:
        plan.append((have, k - have, sampling.temperature))
    return plan


def training_text(content: str, reasoning: str | None, mode: str = REASONING_DEFAULT) -> str:
    """What the student trains on, from a sample's answer and the reasoning its server sent apart.

    ``think``: ``<think>\\nREASONING\\n</think>\\n\\nANSWER``; ``plain``: the reasoning, a blank line, the
    answer; ``drop``: the answer alone. Without reasoning the answer is the text, as it is; with an empty
    answer the reasoning is (the answer sits in it).
    """
    if not reasoning or not reasoning.strip():
        return content
    if not content.strip():
        return reasoning.strip()
    if mode == "drop":
        return content
    if mode == "plain":
        return f"{reasoning.strip()}\n\n{content.strip()}"
    return f"<think>\n{reasoning.strip()}\n</think>\n\n{content.strip()}"


def answer_text(content: str, reasoning: str | None) -> str:
    """Where the final answer is read: the content, or the reasoning when the content is empty."""
    return content if content.strip() else (reasoning or "")


def failed_requests_message(summary: SampleSummary, store_path: Any, stage: str, allowed: float) -> str:
    """One line for a stage that ended with too many failed requests: how many, where their errors are,
    and how to retry only them."""
    failures = store_path.with_name(store_path.stem + ".failures.jsonl")
    last = str(summary.extra.get("last_error") or "")
    last = f"; the last error: {last[:200]}" if last else ""
    return (f"{stage}: {summary.failed_requests} of {summary.requests} requests failed for good, so "
            f"{summary.missing} {stage} traces are missing ({summary.samples} stored){last}; every error is in "
            f"{failures}. Rerun the same command to ask again for the missing ones only (stored traces are kept), "
            f"or let a share of requests fail with {stage}.max_failed_share (now {allowed:g})")


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
    requests_before = generator.stats.requests
    prompt_before = getattr(generator.stats, "prompt_tokens", 0)
    reasoning_before = getattr(generator.stats, "reasoning_tokens", 0)
    for c in range(0, len(todo), chunk_questions):
        chunk = todo[c : c + chunk_questions]
        requests, owners = [], []
        for r, have in chunk:
            for first, n, temperature in request_plan(have, k, sampling):
                requests.append(Request(key=r.id, messages=tuple(task.messages(r)), n=n, temperature=temperature,
                                        top_p=sampling.top_p, max_tokens=sampling.max_tokens,
                                        seed=request_seed(sampling.seed, r.id, first), start=first))
                owners.append(r)
        results = generator.generate(requests)
        rows, failures = [], []
        next_index = {r.id: have for r, have in chunk}  # a question's samples are numbered on from what it has
        for record, samples in zip(owners, results):
            idx = next_index[record.id]
            for s in samples:
                if s.failed:
                    failures.append({"id": record.id, "error": s.error, "time": time.time()})
                    summary.extra["last_error"] = s.error
                    continue
                reasoning = getattr(s, "reasoning", None)
                answer = extract_answer(task, answer_text(s.text, reasoning), record, s.finish_reason)
                rows.append(
                    {
                        "id": record.id,
                        "sample": idx,
                        "text": training_text(s.text, reasoning, sampling.reasoning),
                        "answer": answer,
                        "correct": bool(task.check(answer, record)),
                        "source": source,
                        "generator": generator.name,
                        "num_tokens": s.num_tokens,
                        "finish_reason": s.finish_reason,
                        "content": s.text,
                        "reasoning": reasoning,
                        "reasoning_tokens": getattr(s, "reasoning_tokens", 0),
                        "prompt_tokens": getattr(s, "prompt_tokens", None),
                    }
                )
                idx += 1
            next_index[record.id] = idx
        summary.new_samples += store.append(rows)
        if failures and store.writer:
            with failures_path.open("a", encoding="utf-8") as f:
                f.write("".join(json.dumps(x) + "\n" for x in failures))
        bar.update(sum(len(s) for s in results))
    bar.close()
    summary.seconds = time.perf_counter() - start
    summary.completion_tokens = generator.stats.completion_tokens - tokens_before
    summary.failed_requests = generator.stats.failed_requests - failed_before
    summary.requests = generator.stats.requests - requests_before
    summary.prompt_tokens = getattr(generator.stats, "prompt_tokens", 0) - prompt_before
    summary.reasoning_tokens = getattr(generator.stats, "reasoning_tokens", 0) - reasoning_before
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
        summary.missing += k - len(got)
    return summary
