"""Evaluation: greedy accuracy on held-out questions through the same task code as training.

Also reported: parse failures, mean response length in tokens, a 95% interval for the accuracy
(Wilson score), and optionally self-consistency@k (majority vote over k sampled answers).
The paired comparison of two evaluations of the same questions (before and after training) uses a
bootstrap over questions, which is the noise that matters for "did training help".
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import asdict, dataclass, fields
from typing import Any, Sequence

from .generators.base import Generator, Request
from .records import Record


@dataclass
class EvalSummary:
    n: int
    correct: int
    accuracy: float
    ci95: tuple[float, float]
    parse_failures: int
    parse_failure_rate: float
    mean_length: float
    failed_requests: int = 0
    self_consistency_k: int = 0
    self_consistency_accuracy: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EvalSummary":
        names = {f.name for f in fields(cls)}
        kept = {k: v for k, v in d.items() if k in names}
        kept["ci95"] = tuple(kept["ci95"])
        return cls(**kept)


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval for a binomial share; sound at 0% and 100% too."""
    if n == 0:
        return (0.0, 0.0)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_bootstrap_diff(before: Sequence[bool], after: Sequence[bool], iters: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Accuracy difference (after - before) on the same questions, with a 95% bootstrap interval."""
    assert len(before) == len(after), "paired comparison needs the same questions"
    n = len(before)
    if n == 0:
        return (0.0, 0.0, 0.0)
    diffs = [int(a) - int(b) for a, b in zip(after, before)]
    rng = random.Random(seed)
    stats = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(iters))
    return (sum(diffs) / n, stats[int(0.025 * iters)], stats[int(0.975 * iters) - 1])


def majority(answers: Sequence[str | None]) -> str | None:
    """The most common parsed answer (ties go to the one seen first); None if none parsed."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)


def evaluate(
    records: Sequence[Record],
    task: Any,
    generator: Generator,
    max_tokens: int,
    self_consistency: int = 0,
    temperature: float = 0.7,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], EvalSummary]:
    """Greedy predictions for ``records``; returns (prediction rows, summary)."""
    requests = [Request(key=r.id, messages=tuple(task.messages(r)), n=1, temperature=0.0, max_tokens=max_tokens) for r in records]
    failed_before = generator.stats.failed_requests
    outputs = generator.generate(requests)
    sc_outputs: list[list[Any]] = [[] for _ in records]
    if self_consistency > 0:
        sc_requests = [
            Request(key=r.id, messages=tuple(task.messages(r)), n=self_consistency, temperature=temperature,
                    max_tokens=max_tokens, seed=seed + i)
            for i, r in enumerate(records)
        ]
        sc_outputs = generator.generate(sc_requests)
    rows = []
    for record, samples, sc in zip(records, outputs, sc_outputs):
        ok_samples = [s for s in samples if not s.failed]
        text = ok_samples[0].text if ok_samples else ""
        pred = task.extract(text, record=record) if ok_samples else None
        row = {
            "id": record.id,
            "prediction": pred,
            "gold": task.normalize_gold(record),
            "correct": bool(task.check(pred, record)),
            "num_tokens": ok_samples[0].num_tokens if ok_samples else 0,
            "failed": not ok_samples,
            "text": text,
        }
        if self_consistency > 0:
            votes = [task.extract(s.text, record=record) for s in sc if not s.failed]
            row["sc_prediction"] = majority(votes)
            row["sc_correct"] = bool(task.check(row["sc_prediction"], record))
        rows.append(row)
    n = len(rows)
    correct = sum(r["correct"] for r in rows)
    parse_failures = sum(r["prediction"] is None for r in rows)
    summary = EvalSummary(
        n=n,
        correct=correct,
        accuracy=correct / n if n else 0.0,
        ci95=wilson_interval(correct, n),
        parse_failures=parse_failures,
        parse_failure_rate=parse_failures / n if n else 0.0,
        mean_length=sum(r["num_tokens"] for r in rows) / n if n else 0.0,
        failed_requests=generator.stats.failed_requests - failed_before,
        self_consistency_k=self_consistency,
        self_consistency_accuracy=(sum(r["sc_correct"] for r in rows) / n if n and self_consistency else None),
    )
    return rows, summary
