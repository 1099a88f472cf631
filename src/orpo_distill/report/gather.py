"""The report's data, gathered from a run folder's files into plain values: training curves and
refresh counts from ``metrics.jsonl``, and the teacher-trace diversity figures (distinct n-grams and
mean pairwise similarity among a question's K traces; pure functions of the texts)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..layout import RunLayout
from ..metrics import latest_events, read_metrics
from ..text_similarity import mean_pairwise_similarity, words

# ---- gathering: training curves and refreshes -------------------------------------------------------


def training_rows(run_dir: Path) -> tuple[list[float], list[Mapping[str, Any]]]:
    """The run's ``train`` lines in step order (one per step) and their position in epochs."""
    return training_rows_of(read_metrics(RunLayout(run_dir).metrics))


def training_rows_of(events: Sequence[Mapping[str, Any]]) -> tuple[list[float], list[Mapping[str, Any]]]:
    """:func:`training_rows` from a run's events already read."""
    steps = sorted(latest_events(events, "train", "step").values(), key=lambda r: r["step"])
    epoch_steps = {int(e["epoch"]): int(e["steps"]) for e in latest_events(events, "epoch", "epoch").values()}
    x, start = [], 0
    by_epoch: dict[int, list[Mapping[str, Any]]] = {}
    for r in steps:
        by_epoch.setdefault(int(r["epoch"]), []).append(r)
    for e in sorted(by_epoch):
        rows = by_epoch[e]
        n = epoch_steps.get(e) or max(1, rows[-1]["step"] - start)
        x += [(e - 1) + (r["step"] - start) / n for r in rows]
        start += n
    return x, steps


def training_series(run_dirs: Sequence[Path]) -> dict[str, Any] | None:
    """One variant's curves: the mean over its seeds, step by step (cut to the shortest seed)."""
    per_seed = [training_rows(d) for d in run_dirs]
    per_seed = [(x, r) for x, r in per_seed if r]
    if not per_seed:
        return None
    n = min(len(r) for _, r in per_seed)
    keys = sorted({k for _, rows in per_seed for row in rows for k in row if isinstance(row[k], (int, float))})
    metrics = {}
    for k in keys:
        m = np.array([[float(row.get(k, math.nan)) if isinstance(row.get(k), (int, float)) else math.nan
                       for row in rows[:n]] for _, rows in per_seed])
        with np.errstate(all="ignore"):
            metrics[k] = [float(v) for v in np.nanmean(m, axis=0)] if np.isfinite(m).any() else []
    return {"x": per_seed[0][0][:n], "seeds": len(per_seed), "metrics": metrics}


ODDS_RATIO_KEYS = ("nll", "or_loss", "reward_accuracy", "log_odds_ratio")


def epoch_means(runs: Sequence[Sequence[Mapping[str, Any]]],
                keys: Sequence[str] = ODDS_RATIO_KEYS) -> dict[int, dict[str, float]]:
    """Per epoch, the mean over its steps of each of ``keys`` (``train`` events), then the mean over the
    runs (seeds; each given as its events, ``read_metrics``); each epoch's last quarter of steps also on
    its own (``KEY@end``), where a term that has saturated shows. Epochs or keys a run did not log are
    left out (an SFT run has no odds ratio)."""
    per_epoch: dict[int, dict[str, list[float]]] = {}
    for events in runs:
        _, steps = training_rows_of(events)
        by_epoch: dict[int, list[Mapping[str, Any]]] = {}
        for r in steps:
            by_epoch.setdefault(int(r["epoch"]), []).append(r)
        for e, rows in by_epoch.items():
            end = rows[len(rows) - max(1, len(rows) // 4):]
            for k in keys:
                for name, part in ((k, rows), (f"{k}@end", end)):
                    values = [float(r[k]) for r in part if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
                    if values:
                        per_epoch.setdefault(e, {}).setdefault(name, []).append(float(np.mean(values)))
    return {e: {k: float(np.mean(v)) for k, v in sorted(m.items())} for e, m in sorted(per_epoch.items())}


def pair_similarity_means(runs: Sequence[Sequence[Mapping[str, Any]]]) -> dict[int, dict[str, float]]:
    """Per epoch, how close the negatives were to their positives (the ``similarity`` of ``pairs``
    events, ``text_similarity.pair_similarity``), each kind's mean over the runs that logged it. Runs
    from before the field existed, and SFT runs, add nothing."""
    per_epoch: dict[int, dict[str, list[float]]] = {}
    for events in runs:
        for e, row in latest_events(events, "pairs", "epoch").items():
            for kind, value in (row.get("similarity") or {}).items():
                per_epoch.setdefault(int(e), {}).setdefault(kind, []).append(float(value))
    return {e: {k: float(np.mean(v)) for k, v in sorted(m.items())} for e, m in sorted(per_epoch.items())}


def refresh_counts(run_dirs: Sequence[Path]) -> dict[int, dict[str, float]]:
    """Mean over seeds of each epoch's refresh event (selected, refreshed, all_correct, phi, ...)."""
    per_epoch: dict[int, list[Mapping[str, Any]]] = {}
    for d in run_dirs:
        for e, row in latest_events(read_metrics(RunLayout(d).metrics), "refresh", "epoch").items():
            per_epoch.setdefault(int(e), []).append(row)
    keys = ("selected", "refreshed", "all_correct", "fell_back_to_teacher", "questions", "phi")
    return {e: {k: float(np.mean([float(r.get(k, 0.0)) for r in rows])) for k in keys}
            for e, rows in sorted(per_epoch.items())}


# ---- teacher trace diversity --------------------------------------------------------------------------

def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique n-grams over all n-grams, pooled over ``texts`` (the K traces of one question): 1.0 when
    no n-gram repeats across or within traces, small when the traces say the same thing."""
    grams = [tuple(ws[i:i + n]) for ws in map(words, texts) for i in range(len(ws) - n + 1)]
    return len(set(grams)) / len(grams) if grams else math.nan


def teacher_diversity(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Per question: distinct-1/2/3 and mean pairwise similarity of its K traces, and how many are
    correct; returned as means and per-question lists for the plots."""
    by_q: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        by_q.setdefault(str(r["id"]), []).append(r)
    if not by_q:
        return None
    k = max(len(v) for v in by_q.values())
    distinct: dict[str, dict[str, float]] = {}
    for n in (1, 2, 3):
        vals = np.array([distinct_n([t["text"] for t in v], n) for v in by_q.values()])
        vals = vals[np.isfinite(vals)]
        distinct[str(n)] = {"mean": float(vals.mean()) if vals.size else math.nan,
                            "std": float(vals.std()) if vals.size else math.nan}
    sims = [mean_pairwise_similarity([t["text"] for t in v]) for v in by_q.values()]
    ncorrect = [sum(bool(t["correct"]) for t in v) for v in by_q.values()]
    finite = [s for s in sims if math.isfinite(s)]
    return {
        "questions": len(by_q),
        "k": k,
        "distinct": distinct,
        "mean_similarity": float(np.mean(finite)) if finite else math.nan,
        "per_question_similarity": sims,
        "correct_share": sum(ncorrect) / sum(len(v) for v in by_q.values()),
        "correct_histogram": [sum(1 for c in ncorrect if c == j) for j in range(k + 1)],
    }


COST_FIELDS = ("requests", "new_samples", "failed_requests", "prompt_tokens", "completion_tokens",
               "reasoning_tokens", "seconds")


def generation_cost(events: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Per sampling stage (``teacher``, ``student/epoch_E``), the sums over its ``sampling`` events of what
    it asked for and used: requests, new samples, failed requests, the prompt, completion and reasoning
    tokens the generator reported, and seconds. Every rerun's event adds what that rerun generated."""
    out: dict[str, dict[str, float]] = {}
    for e in events:
        if e.get("event") != "sampling":
            continue
        sums = out.setdefault(str(e.get("stage")), dict.fromkeys(COST_FIELDS, 0))
        for k in COST_FIELDS:
            sums[k] += e.get(k) or 0
    return out
