"""Per-row seeded sampling (issue 12) on the real student: how exact, and what it costs.

Two questions, answered on the machine it runs on:

(a) exactness: every sample is meant to be a function of (seed, question, sample index, weights). In
    fp32 (``student.dtype: float32``) that holds bit for bit; under bf16 autocast some kernels round
    differently with the batch shape. The table gives, per precision and batch size, the share of
    samples whose text equals the batch-1 sample of the same (question, index).
(b) cost: tokens/s of the seeded sampler (greedy ``generate`` with :class:`RowSeededSampler`) against
    transformers' own ``do_sample=True`` at the same batch, temperature and token budget, arms
    alternating, median of the repeats.

Workload: the synthetic task's prompts through the student's chat template, ``--samples`` per prompt
at temperature 0.8 (the demo's), ``--max-new-tokens`` each.

    python bench/seeded_sampling.py --markdown
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from contextlib import nullcontext
from typing import Any, Sequence

import torch
from transformers import LogitsProcessorList

from orpo_distill.config import DatasetConfig
from orpo_distill.datasets import load_splits
from orpo_distill.generators import hf as hf_module
from orpo_distill.generators.base import Request
from orpo_distill.generators.hf import HFGenerator
from orpo_distill.models import autocast, load_model, load_tokenizer, render_prompt
from orpo_distill.tasks import build_task
from machine import cpu_line  # bench/machine.py

MODEL = "builtin:smollm2-135m-instruct"


def requests(n: int, samples: int, max_new_tokens: int) -> list[Request]:
    records = load_splits(DatasetConfig(train_size=n, eval_size=1))[0]
    task = build_task("mcq")
    return [Request(key=r.id, messages=tuple(task.messages(r)), n=samples, temperature=0.8,
                    max_tokens=max_new_tokens, seed=1000 + i) for i, r in enumerate(records)]


def texts(model: Any, tok: Any, reqs: list[Request], batch: int, bf16: bool) -> list[list[str]]:
    gen = HFGenerator.from_model(model, tok, name="bench", batch_size=batch, progress=False, bf16=bf16)
    if not bf16:  # the module-level autocast is what HFGenerator enters; plain fp32 means none at all
        saved = hf_module.autocast
        hf_module.autocast = lambda device, enabled=True: nullcontext()
        try:
            return [[s.text for s in out] for out in gen.generate(reqs)]
        finally:
            hf_module.autocast = saved
    return [[s.text for s in out] for out in gen.generate(reqs)]


def exactness(model: Any, tok: Any, reqs: list[Request], batches: Sequence[int]) -> list[list[str]]:
    rows = []
    for bf16 in (False, True):
        ref = texts(model, tok, reqs, 1, bf16)
        for b in batches:
            got = texts(model, tok, reqs, b, bf16)
            same = sum(x == y for rx, ry in zip(ref, got) for x, y in zip(rx, ry))
            total = sum(len(r) for r in ref)
            rows.append(["bf16 autocast" if bf16 else "fp32", str(b), f"{same}/{total}", f"{same / total:.1%}"])
        distinct = sum(len(set(r)) == len(r) for r in ref)
        rows.append(["bf16 autocast" if bf16 else "fp32", "K distinct", f"{distinct}/{len(ref)} questions", ""])
    return rows


def logit_drift(model: Any, tok: Any, reqs: list[Request], batches: Sequence[int]) -> list[list[str]]:
    """Largest next-token logit difference of one prompt alone against the same prompt repeated ``b``
    times (no padding at all), per precision: what the batch shape alone does to a row."""
    ids = tok(render_prompt(tok, reqs[0].messages), return_tensors="pt", add_special_tokens=False)["input_ids"]
    rows = []
    for bf16 in (False, True):
        ctx = (lambda: autocast(torch.device("cpu"))) if bf16 else nullcontext
        with torch.no_grad(), ctx():
            alone = model(input_ids=ids).logits[0, -1].float()
            for b in batches:
                many = model(input_ids=ids.repeat(b, 1)).logits[0, -1].float()
                rows.append(["bf16 autocast" if bf16 else "fp32", str(b), f"{(many - alone).abs().max().item():.3g}"])
    return rows


def timed_generate(model: Any, tok: Any, reqs: list[Request], seeded: bool) -> tuple[int, float]:
    """One batch of every row; returns (generated tokens up to EOS, seconds)."""
    prompts = [render_prompt(tok, r.messages) for r in reqs for _ in range(r.n)]
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    width = enc["input_ids"].shape[1]
    kw: dict[str, Any] = dict(max_new_tokens=reqs[0].max_tokens, pad_token_id=tok.pad_token_id,
                              eos_token_id=tok.eos_token_id)
    if seeded:
        from orpo_distill.generators.row_sampling import RowSeededSampler

        seeds = [r.sample_seed(j) for r in reqs for j in range(r.n)]
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None,
                  logits_processor=LogitsProcessorList([RowSeededSampler(seeds, width, 0.8)]))
    else:
        torch.manual_seed(0)
        kw.update(do_sample=True, temperature=0.8, top_p=1.0, top_k=0)
    start = time.perf_counter()
    with torch.no_grad(), autocast(torch.device("cpu")):
        out = model.generate(**enc, **kw)
    seconds = time.perf_counter() - start
    new = out[:, width:]
    tokens = 0
    for row in new.tolist():
        tokens += next((t + 1 for t, x in enumerate(row) if x == tok.eos_token_id), len(row))
    return tokens, seconds


def speed(model: Any, tok: Any, reqs: list[Request], repeats: int) -> list[list[str]]:
    runs: dict[str, list[float]] = {"do_sample (global RNG)": [], "seeded rows": []}
    timed_generate(model, tok, reqs[:2], True)  # warm-up
    for i in range(repeats):
        order = list(runs) if i % 2 == 0 else list(runs)[::-1]
        for arm in order:
            tokens, seconds = timed_generate(model, tok, reqs, arm == "seeded rows")
            runs[arm].append(tokens / seconds)
    base = statistics.median(runs["do_sample (global RNG)"])
    return [[arm, str(sum(r.n for r in reqs)), f"{statistics.median(v):.1f}", f"{statistics.median(v) / base:.2f}x"]
            for arm, v in runs.items()]


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=MODEL, help=f"model name or folder (default {MODEL})")
    p.add_argument("--prompts", type=int, default=12)
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--batch-sizes", default="4,24")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    tok = load_tokenizer(args.model)
    model = load_model(args.model, dtype="float32", device="cpu").eval()
    reqs = requests(args.prompts, args.samples, args.max_new_tokens)
    batches = [int(x) for x in args.batch_sizes.split(",")]
    drift = logit_drift(model, tok, reqs, batches)
    exact = exactness(model, tok, reqs, batches)
    fast = speed(model, tok, reqs, args.repeats)
    print(f"command: python bench/seeded_sampling.py {shlex.join(sys.argv[1:])}")
    print(f"machine: {cpu_line()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"workload: {args.prompts} prompts x {args.samples} samples, temperature 0.8, "
          f"{args.max_new_tokens} new tokens, {args.model}\n")
    print(table(["precision", "same prompt x batch size", "max next-token logit difference vs alone"], drift))
    print()
    print(table(["precision", "batch size", "samples equal to batch 1", "share"], exact))
    print()
    print(table(["sampler (bf16 autocast, one batch of all rows)", "rows", "tokens/s (median)", "vs do_sample"], fast))
    return 0


if __name__ == "__main__":
    sys.exit(main())
