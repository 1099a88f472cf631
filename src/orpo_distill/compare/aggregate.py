"""The comparison table from the run folders on disk: ``comparison.json`` and ``comparison.md``.

Reads every finished run of a plan (its final evaluation, metrics and ``pairs`` events), lists the
missing ones, and leaves the statistics to :mod:`.statistics`. See docs/architecture.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..evaluation import best_dev_epoch
from ..layout import CompareLayout, RunLayout, eval_key_epoch
from ..metrics import latest_events, read_metrics
from ..report import comparison_blocks, render_markdown
from ..report.gather import epoch_means, pair_similarity_means
from ..store import atomic_write_json, atomic_write_text, read_jsonl
from .claims import read_claims
from .plan import Plan, is_finished
from .statistics import Correct, paired_rows, summarise
from .variants import comparison_pairs, variant_config, variant_overrides


def _eval_rows(layout: RunLayout, split: str, epoch: int) -> list[dict[str, Any]] | None:
    path = layout.eval_rows(split, epoch)
    return list(read_jsonl(path)) if path.is_file() else None


def epoch_curve(per_epoch_rows: dict[int, dict[int, list[dict[str, Any]]]],
                logps: dict[int, dict[int, float]] | None = None) -> dict[str, Any]:
    """Per epoch: the accuracy over the seeds (with its interval) and, given ``logps`` (the dev split's), the
    held-out positives' mean log-probability (mean over the seeds that logged it); JSON keys are strings."""
    out: dict[str, Any] = {}
    for e in sorted(per_epoch_rows):
        es, _ = summarise(per_epoch_rows[e])
        out[str(e)] = {"accuracy": es["accuracy"], "ci95": es["ci95"], "seeds": es["seeds"]}
        if logps is not None:
            values = [v for v in logps.get(e, {}).values() if v is not None]
            out[str(e)]["chosen_logp"] = float(np.mean(values)) if values else None
    return out


def _epoch_evaluations(layout: RunLayout, split: str, seed: int, rows: dict[int, dict[int, list[dict[str, Any]]]],
                       logps: dict[int, dict[int, float]]) -> None:
    """Add one run's evaluations of ``split`` (rows and chosen_logp by epoch, then seed) to ``rows`` and
    ``logps``."""
    for key, entry in layout.eval_summaries().items():
        e = eval_key_epoch(key, split)
        if e is not None and (ev := _eval_rows(layout, split, e)) is not None:
            rows.setdefault(e, {})[seed] = ev
            logps.setdefault(e, {})[seed] = entry.get("chosen_logp")


def run_timing(events: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Seconds of training (``epoch`` events) and of the refresh sampling (``sampling`` events), from a
    run's events (``read_metrics``)."""
    epochs = latest_events(events, "epoch", "epoch")
    train = sum(float(e.get("seconds", 0.0)) for e in epochs.values())
    sampling = sum(float(e.get("seconds", 0.0)) for e in events if e.get("event") == "sampling")
    return {"train_seconds": train, "sampling_seconds": sampling}


def computed_with(events: Sequence[dict[str, Any]]) -> list[str]:
    """How a run's epochs were computed, from its ``epoch`` events: precision, device or CPU, and the code
    (``provenance.code_version``), each distinct combination once. Older runs lack some of these fields."""
    epochs = latest_events(events, "epoch", "epoch")
    seen: list[str] = []
    for e in epochs.values():
        where = e.get("cpu") if e.get("device", "cpu") == "cpu" else e.get("device")
        line = (f"{e.get('precision', 'precision not recorded')} on {where or 'a machine not recorded'}, "
                f"code {e.get('code', 'not recorded')}")
        if line not in seen:
            seen.append(line)
    return seen


def training_data(events: Sequence[dict[str, Any]]) -> dict[str, float]:
    """What a run trained on, per epoch (mean over its epochs), from its ``pairs`` events: rows,
    distinct positives on the chosen (or SFT target) side and their tokens, questions covered, and the
    questions left out for want of a negative or covered by a fallback (teacher negatives, NLL-only rows)."""
    pairs = latest_events(events, "pairs", "epoch")
    keys = ("rows", "questions", "positives", "positive_tokens", "dropped_no_negative", "teacher_fallback",
            "nll_only")
    if not pairs:
        return {}
    return {k: float(np.mean([float(e.get(k, 0) or 0) for e in pairs.values()])) for k in keys}


def _config_line(plan: Plan) -> dict[str, Any]:
    b = plan.base
    return {
        "student": b.student.source,
        "teacher": b.teacher.kind + ("" if b.teacher.kind == "scripted" else f":{b.teacher.source}"),
        "dataset": b.dataset.kind,
        "task": b.task.kind,
        "train_size": b.dataset.train_size,
        "eval_size": b.dataset.eval_size,
        "phi": b.train.phi,
    }


def aggregate(plan: Plan) -> dict[str, Any]:
    """The comparison table from what is on disk: every finished run of the plan; missing ones listed."""
    layout = plan.layout
    split, epochs = plan.base.eval.split, plan.base.train.epochs
    base_rows: dict[int, list[dict[str, Any]]] = {}
    for s in plan.seeds:
        rows = _eval_rows(layout.shared(s), split, 0)
        if rows is not None:
            base_rows[s] = rows
    result: dict[str, Any] = {
        "dir": str(plan.dir),
        "split": split,
        "epochs": epochs,
        "seeds": plan.seeds,
        "variants": {},
        "missing": [],
        "runs": {},
        "shared": {str(s): str(layout.shared(s).root.relative_to(plan.dir)) for s in plan.seeds},
        "config": _config_line(plan),
    }
    correct_by_variant: dict[str, Correct] = {}
    correct_at_best_dev: dict[str, Correct] = {}  # each arm on the test split at its best dev epoch
    if base_rows:
        summary, correct = summarise(base_rows)
        result["base"] = summary
        correct_by_variant["base"] = correct
    base_dev: dict[int, dict[int, list[dict[str, Any]]]] = {}
    base_logps: dict[int, dict[int, float]] = {}
    for s in plan.seeds:
        _epoch_evaluations(layout.shared(s), "dev", s, base_dev, base_logps)
    if base_dev.get(0):
        result["base_dev"] = epoch_curve({0: base_dev[0]}, {0: base_logps.get(0, {})})["0"]
    for variant in plan.variants:
        finished: dict[int, list[dict[str, Any]]] = {}
        events: dict[int, list[dict[str, Any]]] = {}  # each finished run's metrics.jsonl, read once
        per_epoch_rows: dict[int, dict[int, list[dict[str, Any]]]] = {}
        dev_rows: dict[int, dict[int, list[dict[str, Any]]]] = {}
        dev_logps: dict[int, dict[int, float]] = {}
        best_rows: dict[int, list[dict[str, Any]]] = {}
        best_epochs: dict[str, int] = {}
        result["runs"][variant] = {}
        for s in plan.seeds:
            run = layout.run(variant, s)
            done = is_finished(run.root, variant_config(plan.base, plan.dir, variant, s))
            rows = _eval_rows(run, split, epochs) if done else None
            if rows is None:
                result["missing"].append(run.root.relative_to(plan.dir).as_posix())
                continue
            result["runs"][variant][str(s)] = str(run.root.relative_to(plan.dir))
            finished[s] = rows
            events[s] = read_metrics(run.metrics)
            _epoch_evaluations(run, split, s, per_epoch_rows, {})
            _epoch_evaluations(run, "dev", s, dev_rows, dev_logps)
            best = best_dev_epoch(run.eval_summaries(), epochs)
            if best is not None and (ev := _eval_rows(run, split, best)) is not None:
                best_rows[s], best_epochs[str(s)] = ev, best
        if not finished:
            continue
        summary, correct = summarise(finished)
        data = [x for x in (training_data(events[s]) for s in finished) if x]
        if data:  # per epoch, mean over the seeds: shows that arms are matched on their positives
            summary["trained_on"] = {k: float(np.mean([x[k] for x in data])) for k in data[0]}
        timings = [run_timing(events[s]) for s in finished]
        summary["train_minutes"] = float(np.mean([t["train_seconds"] for t in timings])) / 60
        summary["refresh_sampling_minutes"] = float(np.mean([t["sampling_seconds"] for t in timings])) / 60
        # what the odds-ratio term did, epoch by epoch (JSON keys are strings)
        runs = [events[s] for s in finished]
        per_epoch_training = {str(e): m for e, m in epoch_means(runs).items()}
        for e, kinds in pair_similarity_means(runs).items():  # how close the negatives were (ORPO arms)
            if str(e) in per_epoch_training:
                per_epoch_training[str(e)]["negative_similarity"] = kinds
        summary["per_epoch_training"] = per_epoch_training
        summary["computed_with"] = sorted({line for s in finished for line in computed_with(events[s])})
        summary["overrides"] = variant_overrides(variant)
        summary["per_epoch"] = epoch_curve(per_epoch_rows)
        if dev_rows:
            summary["per_epoch_dev"] = epoch_curve(dev_rows, dev_logps)
        if best_rows:
            at_best, correct_at_best_dev[variant] = summarise(best_rows)
            summary["best_dev"] = {"epoch_per_seed": best_epochs, **at_best}
        result["variants"][variant] = summary
        correct_by_variant[variant] = correct
    if correct_at_best_dev:  # what a user who picks the epoch count on dev would compare
        result["paired_best_dev"] = paired_rows(
            [(v, "sft-diverse") for v in plan.variants if v.startswith("orpo")], correct_at_best_dev)
    result["paired"] = paired_rows(comparison_pairs(plan.variants), correct_by_variant)
    result["claims"] = read_claims(result["paired"], plan.variants)
    return result


def write_comparison(compare_dir: Path, result: dict[str, Any]) -> None:
    """comparison.json (``result``) and comparison.md (its tables) in ``compare_dir``."""
    layout = CompareLayout(compare_dir)
    atomic_write_json(layout.comparison_json, result)
    atomic_write_text(layout.comparison_md, render_markdown([*comparison_blocks(result)], layout.root))
