"""Which tokens of real wrong traces the odds-ratio term acts on under ``pairs.rejected_span: first_error``
(issue 33, design 2): the share of wrong traces whose first error is located, the share of their tokens
the term then reads, and examples with the part it leaves alone in brackets.

    python bench/error_spans.py RUN_DIR [--file eval/eval_epoch_2.jsonl] [--examples 5]

RUN_DIR is a run folder (archived ones included: docs/results/archive/compare-synthetic/sft-diverse/seed_0)
whose config.yaml names the task, the dataset and the student tokenizer. ``--file`` is any file of its rows
with a ``text`` (trace stores, evaluations) or a ``rejected`` side (pairs files); only wrong traces count.
The default is the run's last evaluation: the errors the trained student makes at test time, which is
what its negatives look like after an SFT stage (``train.sft_epochs``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from orpo_distill.batching import token_at
from orpo_distill.config import load_config
from orpo_distill.datasets import load_all_splits
from orpo_distill.models import load_tokenizer
from orpo_distill.store import read_jsonl
from orpo_distill.tasks import build_task


def wrong_texts(path: Path) -> list[tuple[str, str]]:
    """(question id, text) of each wrong trace in a store, evaluation or pairs file."""
    out = []
    for row in read_jsonl(path):
        if row.get("rejected"):
            out.append((row["id"], row["rejected"][0]["content"]))
        elif "text" in row and row.get("correct") is False:
            out.append((row["id"], row["text"]))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--file", help="rows to read, relative to RUN_DIR (default: the last eval/eval_epoch_E.jsonl)")
    ap.add_argument("--examples", type=int, default=4, help="examples to print")
    args = ap.parse_args(argv)
    cfg = load_config(args.run_dir / "config.yaml")
    if args.file:
        path = args.run_dir / args.file
    else:
        evals = sorted((args.run_dir / "eval").glob("eval_epoch_*.jsonl"), key=lambda p: int(p.stem.split("_")[-1]))
        if not evals:
            sys.exit(f"{args.run_dir}: no eval/eval_epoch_E.jsonl; name a file with --file")
        path = evals[-1]
    task = build_task(cfg.task)
    splits = load_all_splits(cfg.dataset, task_kind=cfg.task.kind)
    records = {r.id: r for r in [*splits.train, *splits.eval, *splits.dev]}
    tok = load_tokenizer(cfg.local_student.model)
    rows = wrong_texts(path)
    if not rows:
        sys.exit(f"{path}: no wrong traces")
    acted, located, examples = [], 0, []
    for qid, text in rows:
        offset = task.first_error(text, records.get(qid))
        n = len(tok(text, add_special_tokens=False)["input_ids"]) + 1  # eos, as training appends it
        start = token_at(tok, text, offset) if offset else 0
        located += offset is not None
        acted.append((n - start) / n)
        if offset is not None and len(examples) < args.examples:
            examples.append(f"[{text[:offset]}]{text[offset:]}")
    share = [a for a in acted if a < 1]
    print(f"{path} ({cfg.task.kind} task, tokenizer {cfg.local_student.model})\n")
    print("| wrong traces | first error located | tokens the term reads, all wrong traces | "
          "of a located one (median) |")
    print("| ---: | ---: | ---: | ---: |")
    print(f"| {len(rows)} | {located} ({located / len(rows):.0%}) | {statistics.fmean(acted):.0%} | "
          f"{statistics.median(share) if share else 1:.0%} |")
    print("\nExamples (in brackets: the correct prefix the term leaves alone; after it: what it pushes down):\n")
    for e in examples:
        print("  " + e.replace("\n", "\n  ") + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
