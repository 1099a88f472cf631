"""Where a real trainer step spends its time, part by part, and the process's memory through it (issue 36).

Why: earlier profiles timed the model's forward and backward alone; about 45% of a demo step on the Xeon
was never accounted for. This bench runs the trainer's own ``training.train_epoch`` (the loop the demo
runs: micro-batching, collation, forward, loss, backward, clipping, AdamW, the scheduler, the metrics,
the ``metrics.jsonl`` line, the progress bar) and times each part by wrapping the function the loop calls
for it; "other" is what is left of the step, measured from one step's end to the next, so nothing the loop
does goes uncounted.

Workload: the demo's config (its synthetic task, lambda, max_length, batch size, lr, the packed layout,
bf16 autocast where the CPU has bf16 units) on pairs like the demo's: ``--pairs-per-question`` pairs a
question whose chosen side is a correct scripted-teacher trace and whose rejected side a wrong one (the
wrong teacher traces stand in for the student's, as in ``bench/train_step.py``), so no student is sampled.
The model, optimizer and scheduler are made as the trainer makes them (``make_optimizer``: fused AdamW).

Output: per part, the median milliseconds per step over the steps after ``--warmup``, its share of the
step, and min-max; then the resident memory after each step (``memory.rss_mib``) and the peak.

Run: ``python bench/step_breakdown.py --markdown`` (``--quick``: a smoke test).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from machine import cpu_line, positive_int  # bench/ is on sys.path when run as a script
from orpo_distill import training
from orpo_distill.batching import group_pairs
from orpo_distill.losses import OrpoOutput
from orpo_distill.memory import lifetime_peak_rss_mib, rss_mib
from orpo_distill.metrics import MetricsLog
from orpo_distill.models import cpu_supports_bf16, load_model, load_tokenizer
from train_step import DEFAULT_MODEL, build_questions, demo_config, tokenized_batches

PARTS = ("collate", "forward + log-probs", "loss", "metrics (.item)", "backward", "clip", "optimizer",
         "scheduler", "zero_grad", "step metrics", "log line", "other")


class Timer:
    """Accumulates wall time per part for the step under way."""

    def __init__(self) -> None:
        self.current: dict[str, float] = defaultdict(float)
        self.rss_after: dict[str, float] = {}  # the resident memory after each part's last call (MiB)

    def wrap(self, part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.current[part] += time.perf_counter() - t0
                self.rss_after[part] = max(self.rss_after.get(part, 0.0), rss_mib())
        return timed


def breakdown(model_name: str, steps: int, warmup: int, pairs_per_question: int,
              chunk_tokens: int | None = None, pad_multiple: int = 1) -> tuple[list[dict[str, float]], list[float], str]:
    """Run ``steps`` trainer steps; per step the seconds of each part (``other``: the rest), the RSS after
    each step, and the precision."""
    from accelerate import Accelerator

    cfg = demo_config()
    tcfg = cfg.train.model_copy(update={"warmup_ratio": 0.0,  # every step updates the weights
                                        "chunk_tokens": chunk_tokens or cfg.train.chunk_tokens,
                                        "pad_multiple": pad_multiple})
    tokenizer = load_tokenizer(model_name)
    per_step = tcfg.batch_size // pairs_per_question
    questions = build_questions(tokenizer, per_step * (steps + warmup), cfg, k=pairs_per_question)
    pairs = tokenized_batches(tokenizer, questions, tcfg.max_length)
    examples = group_pairs([p for q in pairs for p in q])
    model = load_model(model_name)
    acc = Accelerator(cpu=True)
    optimizer = training.make_optimizer(model, tcfg)
    scheduler = training.make_scheduler(optimizer, tcfg, steps + warmup)
    model, optimizer = acc.prepare(model, optimizer)

    timer = Timer()
    rows: list[dict[str, float]] = []
    rss: list[float] = []
    mark = [time.perf_counter()]
    patches = {"collate_packed": "collate", "pair_logps_packed": "forward + log-probs", "orpo_loss_of": "loss",
               "step_metrics": "step metrics", "reduce_sum": "step metrics"}
    saved = {name: getattr(training, name) for name in patches}
    saved_metrics = OrpoOutput.metrics
    for name, part in patches.items():
        setattr(training, name, timer.wrap(part, saved[name]))
    OrpoOutput.metrics = timer.wrap("metrics (.item)", saved_metrics)
    acc.backward = timer.wrap("backward", acc.backward)
    acc.clip_grad_norm_ = timer.wrap("clip", acc.clip_grad_norm_)
    optimizer.step = timer.wrap("optimizer", optimizer.step)
    optimizer.zero_grad = timer.wrap("zero_grad", optimizer.zero_grad)
    scheduler.step = timer.wrap("scheduler", scheduler.step)
    with tempfile.TemporaryDirectory() as tmp:
        metrics = MetricsLog(Path(tmp) / "metrics.jsonl")
        log_line = timer.wrap("log line", lambda row: metrics.log("train", **row))

        def on_step(row: dict[str, Any]) -> None:
            log_line(row)
            now = time.perf_counter()
            parts = dict(timer.current)
            parts["other"] = (now - mark[0]) - sum(parts.values())
            parts["step"] = now - mark[0]
            rows.append(parts)
            rss.append(rss_mib())
            timer.current = defaultdict(float)
            mark[0] = time.perf_counter()

        try:
            result = training.train_epoch(model, examples, optimizer, scheduler, tcfg, 1, tokenizer.pad_token_id,
                                          acc, log=on_step, progress=True)
        finally:
            for name in patches:
                setattr(training, name, saved[name])
            OrpoOutput.metrics = saved_metrics
    return rows[warmup:], rss, result.precision


def render(rows: list[dict[str, float]], rss: list[float], precision: str, args: argparse.Namespace) -> str:
    step = statistics.median(r["step"] for r in rows)
    lines = [f"# A trainer step, part by part ({len(rows)} steps after {args.warmup} warm-up)", "",
             cpu_line(), f"torch {torch.__version__}; precision {precision} (bf16 units: "
             f"{'yes' if cpu_supports_bf16() else 'no'}); {args.model}; the demo's config; "
             f"{args.pairs_per_question} pairs a question; train.chunk_tokens {args.chunk_tokens or demo_config().train.chunk_tokens}; "
             f"train.pad_multiple {args.pad_multiple}", "",
             "| part | ms/step (median) | share of the step | min-max ms |", "|---|---:|---:|---:|"]
    for part in (*PARTS, "step"):
        values = [1000 * r.get(part, 0.0) for r in rows]
        med = statistics.median(values)
        lines.append(f"| {part} | {med:.1f} | {100 * med / (1000 * step):.1f}% | {min(values):.1f}-{max(values):.1f} |")
    lines += ["", "Resident memory after each step (MiB): " + ", ".join(f"{x:.0f}" for x in rss),
              f"Peak resident memory of the process: {lifetime_peak_rss_mib():.0f} MiB"]
    text = "\n".join(lines)
    return text if args.markdown else text.replace("| ", "").replace(" |", "")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--steps", type=positive_int, default=8, help="steps timed after the warm-up")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the medians")
    p.add_argument("--pairs-per-question", type=positive_int, default=2,
                   help="pairs a question (the demo: one per correct trace of 3, about 2.25)")
    p.add_argument("--chunk-tokens", type=positive_int, default=None,
                   help="train.chunk_tokens (default: the demo config's)")
    p.add_argument("--pad-multiple", type=positive_int, default=1,
                   help="train.pad_multiple: padded widths rounded up to a multiple of this")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--quick", action="store_true", help="smoke test: 2 steps, 1 warm-up")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup = 2, 1
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    rows, rss, precision = breakdown(args.model, args.steps, args.warmup, args.pairs_per_question, args.chunk_tokens,
                                     args.pad_multiple)
    print(render(rows, rss, precision, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
