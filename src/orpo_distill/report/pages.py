"""The two reports, a run folder's and a comparison folder's: the data gathered from disk, the plots
drawn from it (``plots.py``), the blocks written as report.md and report.html."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Union

from ..config import phi_policy, phi_text, upgrade_train_section
from ..errors import UserError
from ..layout import CompareLayout, RunLayout, eval_key_epoch
from ..metrics import latest_events, read_metrics
from ..store import atomic_write_text, read_jsonl
from .blocks import Block, Heading, Image, Para, Table, fmt_num, render_html, render_markdown
from .gather import generation_cost, refresh_counts, teacher_diversity, training_series
from .tables import answer_blocks, cost_blocks, diversity_blocks, eval_table, refresh_table, comparison_blocks


def _draw_common(layout: Union[RunLayout, CompareLayout], series: dict[str, Any], refresh: dict[str, Any],
                 div: Mapping[str, Any] | None, per_epoch: dict[str, Any], label: str,
                 several_seeds: bool, split_name: str = "Held-out") -> dict[str, Path]:
    from .. import plots

    out: dict[str, Path] = {}
    if series:
        out["training"] = plots.plot_training_curves(series, layout.plot("training_curves"),
                                                     f"Training curves: {label}")
    if per_epoch and any(len(v) >= 2 for v in per_epoch.values()):
        out["epochs"] = plots.plot_accuracy_per_epoch(per_epoch, layout.plot("accuracy_per_epoch"),
                                                      f"{split_name} accuracy per epoch: {label}")
    if refresh:
        out["refresh"] = plots.plot_refresh(refresh, layout.plot("refresh"),
                                            "Mixed-policy refresh: negatives regenerated before each epoch",
                                            "questions (mean over seeds)" if several_seeds else "questions")
    if div:
        out["diversity"] = plots.plot_teacher_diversity(
            div, layout.plot("teacher_diversity"),
            f"Teacher traces: {div['questions']} questions x {div['k']} samples")
    return {k: v.relative_to(layout.root) for k, v in out.items()}


def comparison_report(root: Path) -> list[Block]:
    from .. import plots

    layout = CompareLayout(root)
    result = json.loads(layout.comparison_json.read_text(encoding="utf-8"))
    variants = list(result["variants"])
    runs = {v: [root / p for p in result["runs"].get(v, {}).values()] for v in variants}
    series = {v: s for v in variants if (s := training_series(runs[v])) is not None}
    # variants that never select a question (off-policy, phi 0) have nothing to show there
    refresh = {v: r for v in variants if (r := refresh_counts(runs[v])) and any(x["selected"] for x in r.values())}
    traces = RunLayout(root / result["shared"][str(result["seeds"][0])]).teacher_traces
    div = teacher_diversity(read_jsonl(traces)) if traces.is_file() else None
    dev = {v: result["variants"][v].get("per_epoch_dev") or {} for v in variants}
    on_dev = any(dev.values())  # with a dev split the curves are the dev split's
    per_epoch = {v: {int(e): x for e, x in (dev[v] if on_dev else result["variants"][v].get("per_epoch", {})).items()}
                 for v in variants}
    images = _draw_common(layout, series, refresh, div, per_epoch, f"{len(variants)} variants",
                          len(result["seeds"]) > 1, "Dev" if on_dev else "Held-out")
    if on_dev and any(x.get("chosen_logp") is not None for c in per_epoch.values() for x in c.values()):
        images["logp"] = plots.plot_value_per_epoch(
            {v: {e: x["chosen_logp"] for e, x in c.items() if x.get("chosen_logp") is not None}
             for v, c in per_epoch.items()},
            layout.plot("chosen_logp_per_epoch"), f"Held-out positives' log-probability: {len(variants)} variants",
            "mean token log-probability of the dev positives").relative_to(root)
    if result["variants"]:
        rows = [{"name": v, "accuracy": s["accuracy"], "ci95": s["ci95"], "per_seed": s["accuracy_per_seed"]}
                for v, s in result["variants"].items()]
        images["accuracy"] = plots.plot_accuracy(
            rows, result.get("base"), layout.plot("accuracy"),
            f"Held-out accuracy after {result['epochs']} epochs ({len(result['seeds'])} seed(s))").relative_to(root)
    blocks = [Heading(f"ORPO-Distill comparison report: {root.name}", 1), *comparison_blocks(result)[1:]]
    if "accuracy" in images:
        blocks.append(Image(images["accuracy"], "Accuracy per variant with 95% intervals; dashed: the base model"))
    if "epochs" in images:
        blocks.append(Image(images["epochs"], "Accuracy after each evaluated epoch (mean over seeds)"))
    if "logp" in images:
        blocks.append(Image(images["logp"], "Mean token log-probability of the dev questions' correct teacher traces "
                                            "after each epoch (mean over seeds)"))
    if "training" in images:
        blocks += [Heading("Training"), Image(images["training"],
                                              "Training curves per variant (faint: raw; solid: moving average)")]
    if refresh:
        blocks += [Heading("Mixed-policy refresh"), refresh_table(refresh),
                   Image(images["refresh"], "Questions refreshed before each epoch (mean over seeds)")]
    if div:
        blocks += diversity_blocks(div, images["diversity"])
    return blocks


def run_report(root: Path) -> list[Block]:
    import yaml

    layout = RunLayout(root)
    cfg = yaml.safe_load(layout.config.read_text(encoding="utf-8"))
    summaries = layout.eval_summaries()
    name = root.name
    series = {name: s} if (s := training_series([root])) is not None else {}
    refresh = {name: r} if (r := refresh_counts([root])) else {}
    traces = layout.teacher_traces
    div = teacher_diversity(read_jsonl(traces)) if traces.is_file() else None
    split = cfg.get("eval", {}).get("split", "eval")
    evals = {e: v for k, v in summaries.items() if (e := eval_key_epoch(k, split)) is not None}
    per_epoch = {name: {e: {"accuracy": v["accuracy"], "ci95": v["ci95"]} for e, v in sorted(evals.items())}}
    per_epoch = per_epoch if evals else {}
    images = _draw_common(layout, series, refresh, div, per_epoch, name, False)
    train = upgrade_train_section(cfg.get("train", {}))  # a config.yaml an older version wrote
    blocks: list[Block] = [
        Heading(f"ORPO-Distill run report: {name}", 1),
        Para(f"Student `{cfg.get('student', {}).get('model')}`, method `{train.get('method')}`, negatives "
             f"`{cfg.get('pairs', {}).get('negatives')}`, phi {phi_text(train.get('phi', 0.5))} (`{phi_policy(train.get('phi', 0.5))}` policy), "
             f"{train.get('epochs')} epochs."),
    ]
    if evals:
        blocks += [Heading("Evaluation"), eval_table(evals),
                   *(Para(f"**Warning (epoch {e}):** {v['warning']}.")
                     for e, v in sorted(evals.items()) if v.get("warning"))]
        if "epochs" in images:
            blocks.append(Image(images["epochs"], "Accuracy after each evaluated epoch (0: before training)"))
        blocks += answer_blocks(evals)
    events = read_metrics(layout.metrics)
    blocks += cost_blocks(generation_cost(events))
    epochs = latest_events(events, "epoch", "epoch")
    if epochs:
        blocks += [Heading("Training"), Table(
            ["epoch", "steps", "examples", "tokens", "seconds", "tokens/s"],
            [[str(e), str(r["steps"]), str(r["examples"]), str(r["tokens"]), fmt_num(r["seconds"]),
              fmt_num(r["tokens"] / r["seconds"] if r["seconds"] else math.nan, 0)] for e, r in sorted(epochs.items())])]
    if "training" in images:
        blocks.append(Image(images["training"], "Training curves (faint: raw; solid: moving average)"))
    if refresh:
        blocks += [Heading("Mixed-policy refresh"), refresh_table(refresh),
                   Image(images["refresh"], "Questions refreshed before each epoch")]
    if div:
        blocks += diversity_blocks(div, images["diversity"])
    return blocks


def detect(path: Path) -> str:
    """``comparison`` or ``run``; a UserError for anything else."""
    path = Path(path)
    run = RunLayout(path)
    if CompareLayout(path).comparison_json.is_file():
        return "comparison"
    if run.config.is_file() and run.metrics.is_file():
        return "run"
    if not path.exists():
        raise UserError(f"{path} does not exist")
    raise UserError(f"{path} is neither a run directory (config.yaml and metrics.jsonl) nor a comparison "
                    "folder (comparison.json); run `orpo-distill run` or `orpo-distill compare` first")


def write_report(path: Path) -> Path:
    """Write report.md, report.html and plots/*.png into ``path``; returns report.md's path."""
    root = Path(path)
    kind = detect(root)
    layout = CompareLayout(root) if kind == "comparison" else RunLayout(root)
    blocks = comparison_report(root) if kind == "comparison" else run_report(root)
    title = blocks[0].text if blocks and isinstance(blocks[0], Heading) else "report"
    atomic_write_text(layout.report_md, render_markdown(blocks, root))
    atomic_write_text(layout.report_html, render_html(blocks, root, title))
    return layout.report_md
