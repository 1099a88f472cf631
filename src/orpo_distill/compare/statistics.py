"""The comparison's statistics: bootstrap intervals over seeds and questions, and paired differences.

Pure functions of in-memory values (no files): ``correct`` maps seed -> question id -> whether the
answer was right.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

Correct = dict[int, dict[str, bool]]  # seed -> question id -> correct


def bootstrap_mean(matrix: np.ndarray, iters: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a seeds x questions matrix with a 95% interval from a two-level bootstrap.

    Each draw resamples the seeds and, independently, the questions (both with replacement), so the
    interval carries both the training noise (seeds) and the test-set noise (questions). With one seed
    it is the plain bootstrap over questions.
    """
    m = np.asarray(matrix, dtype=float)
    if m.ndim != 2 or m.size == 0:
        return (math.nan, math.nan, math.nan)
    s, q = m.shape
    rng = np.random.default_rng(seed)
    stats = np.empty(iters)
    chunk = max(1, 2_000_000 // (s * q))  # bound the memory of the fancy index
    for start in range(0, iters, chunk):
        n = min(chunk, iters - start)
        si = rng.integers(0, s, size=(n, s))
        qi = rng.integers(0, q, size=(n, q))
        stats[start:start + n] = m[si[:, :, None], qi[:, None, :]].mean(axis=(1, 2))
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return (float(m.mean()), float(lo), float(hi))


def _matrix(per_seed: Correct, seeds: Sequence[int], qids: Sequence[str]) -> np.ndarray:
    return np.array([[float(per_seed[s][q]) for q in qids] for s in seeds])


def paired_difference(a: Correct, b: Correct) -> dict[str, Any] | None:
    """Accuracy of ``a`` minus ``b`` over the seeds and questions both have, with a bootstrap interval
    over the same (paired) seeds and questions."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    qids = sorted(set.intersection(*(set(a[s]) & set(b[s]) for s in seeds)))
    if not qids:
        return None
    diff = _matrix(a, seeds, qids) - _matrix(b, seeds, qids)
    mean, lo, hi = bootstrap_mean(diff)
    return {"diff": mean, "ci95": [lo, hi], "seeds": len(seeds), "questions": len(qids)}


def summarise(per_seed_rows: dict[int, list[dict[str, Any]]]) -> tuple[dict[str, Any], Correct]:
    """One arm's accuracy (mean, per seed, std, bootstrap interval over the questions every seed has),
    parse failures and mean length, from its per-question evaluation rows by seed; and its ``correct``."""
    seeds = sorted(per_seed_rows)
    correct = {s: {str(r["id"]): bool(r["correct"]) for r in per_seed_rows[s]} for s in seeds}
    qids = sorted(set.intersection(*(set(c) for c in correct.values())))
    accs = [sum(correct[s][q] for q in qids) / len(qids) for s in seeds] if qids else []
    mean, lo, hi = bootstrap_mean(_matrix(correct, seeds, qids)) if qids else (math.nan,) * 3
    all_rows = [r for s in seeds for r in per_seed_rows[s]]
    return {
        "seeds": seeds,
        "questions": len(qids),
        "accuracy_per_seed": accs,
        "accuracy": mean,
        "std": float(np.std(accs, ddof=1)) if len(accs) > 1 else None,
        "ci95": [lo, hi],
        "parse_failure_rate": sum(r["prediction"] is None for r in all_rows) / len(all_rows) if all_rows else math.nan,
        "mean_length": sum(r["num_tokens"] for r in all_rows) / len(all_rows) if all_rows else math.nan,
    }, correct


def paired_rows(pairs: Sequence[tuple[str, str]], correct: dict[str, Correct]) -> list[dict[str, Any]]:
    """:func:`paired_difference` for each (variant, reference) pair both of which have results. The
    reference ``base`` evaluated once (one seed) serves every seed of the variant."""
    out = []
    for a, b in pairs:
        if a not in correct or b not in correct:
            continue
        ref = correct[b]
        if b == "base" and len(ref) == 1:  # one base evaluation serves every seed
            ref = {s: next(iter(ref.values())) for s in correct[a]}
        d = paired_difference(correct[a], ref)
        if d is not None:
            out.append({"variant": a, "reference": b, **d})
    return out
