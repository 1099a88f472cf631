"""The training step under glibc's default malloc against ``allocator.keep_freed_memory`` (issue 16).

Why: glibc returns every freed block above its mmap threshold (128 KiB, rising with what is freed to
at most 32 MiB) to the kernel (``munmap``) and maps it again on the next request, so each step page-faults and zeroes its large buffers (autocast's weight copies,
gradients, the head's logit chunks) again. ``orpo-distill`` keeps freed memory in the process
(``allocator.py``); this bench measures what that is worth and what it costs.

Method: the setting is process-wide, so each arm is a fresh child process (``--child``) that runs the
same steps: ``bench/train_step.py``'s workload (the demo's pairs, K = 4, ``--batch-size`` pairs a step,
packed layout, bf16 autocast where the CPU has bf16 units) and a whole optimizer step (forward, loss,
backward, gradient clipping, fused AdamW, zero_grad). Per step: wall time and minor page faults
(getrusage); per child: peak RSS (ru_maxrss) and the step losses, which must be identical in every child.
The arms alternate for ``--repeats`` rounds; the table gives medians over the steps after the first
``--warmup`` of every round.

Run: ``python bench/allocator.py --markdown`` (``--quick``: a smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Sequence

import torch

from machine import cpu_line, positive_int  # bench/ is on sys.path when run as a script
from orpo_distill.allocator import OPT_OUT, keep_freed_memory, without_malloc_settings
from orpo_distill.batching import collate_packed, group_pairs
from orpo_distill.forward import pair_logps_packed
from orpo_distill.models import autocast, cpu_supports_bf16, load_model, load_tokenizer
from orpo_distill.training import make_optimizer
from train_step import DEFAULT_MODEL, PAIRS_PER_QUESTION, _orpo, build_questions, demo_config, make_batches, tokenized_batches

ARMS = {"glibc default": {OPT_OUT: "system"}, "kept in the process (default)": {}}


def child(args: argparse.Namespace) -> None:
    setting = keep_freed_memory()
    cfg = demo_config()
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype="float32", device="cpu")
    model.train()
    questions = build_questions(tokenizer, args.steps * args.batch_size // PAIRS_PER_QUESTION, cfg)
    pairs = tokenized_batches(tokenizer, make_batches(questions, args.batch_size, args.steps), cfg.train.max_length)
    optimizer = make_optimizer(model, cfg.train)
    device = torch.device("cpu")
    seconds, faults, losses = [], [], []
    for batch in pairs:
        before, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        with autocast(device):
            groups = group_pairs(batch, max_pairs=PAIRS_PER_QUESTION)
            out = _orpo(pair_logps_packed(model, collate_packed(groups, pad_id=tokenizer.pad_token_id, nll_on_prompt=cfg.train.nll_on_prompt)), cfg.train.lambda_or)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(out.loss))
        seconds.append(time.perf_counter() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"setting": setting, "seconds": seconds, "faults": faults, "losses": losses, "peak_mb": peak_mb}))


def run_child(argv: Sequence[str], env: dict[str, str]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--child", *argv], env={**without_malloc_settings(os.environ), **env},
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"child failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--steps", type=positive_int, default=6, help="optimizer steps per child")
    p.add_argument("--warmup", type=int, default=2, help="first steps of each child left out of the medians")
    p.add_argument("--batch-size", type=positive_int, default=8, help="pairs a step (whole questions of K=4)")
    p.add_argument("--repeats", type=positive_int, default=2, help="rounds, the arms alternating")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--quick", action="store_true", help="smoke test: 3 steps, 1 warm-up, 1 round")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.repeats = 3, 1, 1
    if args.warmup >= args.steps:
        p.error("--warmup must be below --steps")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    passed = [a for a in argv if a not in ("--markdown", "--quick")]
    passed += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in ARMS}
    for r in range(args.repeats):
        for name, env in ARMS.items():
            print(f"round {r + 1}/{args.repeats}: {name} ...", file=sys.stderr, flush=True)
            results[name].append(run_child(passed, env))
    rows = []
    for name, runs in results.items():
        secs = [s for run in runs for s in run["seconds"][args.warmup:]]
        flts = [f for run in runs for f in run["faults"][args.warmup:]]
        rows.append((name, statistics.median(secs), min(secs), max(secs), statistics.median(flts) * resource.getpagesize() / 2**20,
                     max(run["peak_mb"] for run in runs), runs[0]["setting"]))
    base = rows[0][1]
    losses = {name: runs[0]["losses"] for name, runs in results.items()}
    same = len({tuple(run["losses"]) for runs in results.values() for run in runs}) == 1  # every child
    bf16 = "active" if cpu_supports_bf16() else "inactive (no bf16 units)"
    lines = [cpu_line(), f"command: python bench/allocator.py {' '.join(argv)}".rstrip(),
             f"torch {torch.__version__}; bf16 autocast {bf16}; {args.batch_size} pairs a step, {args.steps} steps a child "
             f"({args.warmup} warm-up left out), {args.repeats} round(s), arms alternating", ""]
    header = ["malloc", "s/step (median)", "min-max", "vs glibc default", "MiB faulted in/step", "peak RSS MiB"]
    sep = "| " + " | ".join(header) + " |\n|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"
    body = [f"| {n} | {m:.2f} | {lo:.2f}-{hi:.2f} | {base / m:.2f}x | {f:.0f} | {p:.0f} |" for n, m, lo, hi, f, p, _ in rows]
    lines += [sep, *body, "", f"step losses identical in both arms: {'yes' if same else 'NO'} "
              f"({', '.join(f'{x:.5f}' for x in losses[rows[0][0]])})",
              *[f"{n}: {s}" for n, *_, s in rows]]
    text = "\n".join(lines)
    print(text if args.markdown else text.replace("|", " "))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
