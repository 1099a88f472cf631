"""Where the packed ORPO training step spends its time: torch.profiler over the step of
``bench/train_step.py``'s arm (c), the ops' own (self) CPU time grouped by what they do.

Why: issue 16 asks for the step's parts measured before anything is made faster. The workload, model
and step are train_step.py's (the demo's pairs, K = 4, ``--batch-size`` pairs a step, bf16 autocast where
the CPU has bf16 units, forward + loss + backward, no optimizer).

Groups (by aten op name, and for matrix products by shape):
- matmul, LM head: products with the vocabulary as one dimension (the logits and their gradients);
- matmul, body: every other matrix product (attention projections, MLP);
- attention: scaled_dot_product_attention's kernels (and the 4-D mask it reads);
- log-probs: log_softmax, logsumexp, gather and their backward (over the vocabulary, fp32);
- dtype casts: ``_to_copy``/``copy_`` (autocast's bf16 copies of fp32 weights and activations);
- elementwise & norms: everything else that is pointwise or a reduction (RMSNorm, SiLU, adds, RoPE);
- other: the rest (indexing, views, allocator).

Method: one warm-up step per batch, then ``--steps`` profiled steps (``record_shapes``); the table gives
each group's share of the summed self CPU time and its milliseconds per step. A second table times
forward + loss and backward apart (perf_counter, median over ``--repeats`` rounds, not under the
profiler) for the step as it is (the fused log-prob head, ``logprobs._FusedHeadLogprobs``, and
attention by segments, ``segmented_attention``), with the dense mask, and as it was before issue 16
(checkpointed head, dense mask), the variants in turn on every batch.
Profiling adds overhead per op: shares are the figures to read, not absolute times.

Run: ``python bench/profile_step.py --markdown`` (``--quick``: a smoke test).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from typing import Any, Sequence

import torch

from machine import cpu_line, positive_int  # bench/ is on sys.path when run as a script
from orpo_distill.batching import collate_packed, group_pairs
from orpo_distill.forward import pair_logps_packed
from orpo_distill.models import autocast, cpu_supports_bf16, load_model, load_tokenizer
from train_step import (
    DEFAULT_MODEL,
    PAIRS_PER_QUESTION,
    _orpo,
    build_questions,
    demo_config,
    make_batches,
    tokenized_batches,
)

BEFORE = "checkpointed head, dense mask (before issue 16)"
VARIANTS = {  # name: (fused head, segmented attention)
    "fused head, segmented attention (default)": (True, True),
    "fused head, dense mask": (True, False),
    BEFORE: (False, False),
}
GROUPS = ("matmul, LM head", "matmul, body", "attention", "log-probs", "dtype casts", "elementwise & norms", "other")
MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation", "mkldnn::", "onednn::")
ATTENTION = ("scaled_dot_product", "flash_attention", "_efficient_attention", "aten::_softmax", "aten::masked_fill")
LOGPROBS = ("log_softmax", "logsumexp", "aten::gather", "aten::scatter", "aten::exp", "_log_softmax_backward")
CASTS = ("aten::_to_copy", "aten::copy_", "aten::to", "aten::_copy_from")
POINTWISE = ("aten::add", "aten::mul", "aten::sub", "aten::div", "aten::neg", "aten::pow", "aten::rsqrt",
             "aten::mean", "aten::sum", "aten::silu", "aten::sigmoid", "aten::cat", "aten::where", "aten::fill_",
             "aten::zero_", "aten::cos", "aten::sin", "aten::sqrt", "aten::clamp", "aten::threshold",
             "aten::silu_backward", "aten::sigmoid_backward", "aten::embedding_dense_backward",
             "aten::index_add_", "aten::lt", "aten::ge", "aten::eq", "aten::ne", "aten::abs", "aten::max", "aten::min")


def group_of(name: str, shapes: Sequence[Sequence[int]], vocab: int) -> str:
    """The group of one profiled op (see the module docstring)."""
    if any(m in name for m in MATMUL):
        return GROUPS[0] if any(vocab in s for s in shapes if s) else GROUPS[1]
    if any(m in name for m in ATTENTION):
        return GROUPS[2]
    if any(m in name for m in LOGPROBS):
        return GROUPS[3]
    if any(name == m or name.startswith(m + ".") for m in CASTS):
        return GROUPS[4]
    if any(name.startswith(m) for m in POINTWISE):
        return GROUPS[5]
    return GROUPS[6]


def grouped_self_time(events: Any, vocab: int) -> dict[str, float]:
    """Microseconds of self CPU time per group, over ``events`` (``key_averages(group_by_input_shape=True)``)."""
    out: dict[str, float] = defaultdict(float)
    for e in events:
        out[group_of(e.key, e.input_shapes or [], vocab)] += e.self_cpu_time_total
    return dict(out)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--batch-size", type=positive_int, default=8, help="pairs per step (default 8, the demo's)")
    p.add_argument("--steps", type=positive_int, default=3, help="profiled steps (distinct batches; default 3)")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed rounds for the forward/backward split")
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--quick", action="store_true", help="smoke test: 4 pairs, 1 step, 1 round")
    p.add_argument("--top", type=int, default=0, help="also list the N ops with the most self CPU time")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.batch_size, args.steps, args.repeats = 4, 1, 1
    if args.batch_size % PAIRS_PER_QUESTION:
        p.error(f"--batch-size must be a multiple of K={PAIRS_PER_QUESTION}, got {args.batch_size}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = demo_config()
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype="float32", device="cpu")
    model.train()
    vocab = int(model.config.vocab_size)
    questions = build_questions(tokenizer, args.steps * args.batch_size // PAIRS_PER_QUESTION, cfg)
    pairs = tokenized_batches(tokenizer, make_batches(questions, args.batch_size, args.steps), cfg.train.max_length)
    groups_per_step = [group_pairs(b, max_pairs=PAIRS_PER_QUESTION) for b in pairs]
    batches = [collate_packed(gs, pad_id=tokenizer.pad_token_id, nll_on_prompt=False) for gs in groups_per_step]
    tokens = sum(g.packed_length() for gs in groups_per_step for g in gs) / args.steps
    device = torch.device("cpu")

    def forward(i: int, fused: bool = True, segmented: bool = True) -> Any:
        with autocast(device):
            return _orpo(pair_logps_packed(model, batches[i], fused=fused, segmented=segmented), cfg.train.lambda_or)

    def step(i: int) -> None:
        forward(i).loss.backward()
        model.zero_grad(set_to_none=True)

    for i in range(args.steps):  # warm-up, every variant
        for fused, segmented in VARIANTS.values():
            forward(i, fused, segmented).loss.backward()
            model.zero_grad(set_to_none=True)
    times: dict[str, dict[str, list[float]]] = {h: {"fwd": [], "bwd": []} for h in VARIANTS}
    for _ in range(args.repeats):  # the variants in turn, batch by batch: side by side under the same load
        for i in range(args.steps):
            for name, (fused, segmented) in VARIANTS.items():
                t0 = time.perf_counter()
                out = forward(i, fused, segmented)
                t1 = time.perf_counter()
                out.loss.backward()
                model.zero_grad(set_to_none=True)
                times[name]["fwd"].append(t1 - t0)
                times[name]["bwd"].append(time.perf_counter() - t1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        for i in range(args.steps):
            step(i)
    groups = grouped_self_time(prof.key_averages(group_by_input_shape=True), vocab)
    total = sum(groups.values())
    bar = "|" if args.markdown else " "
    lines = [
        f"{cpu_line()}; bf16 autocast {'active' if cpu_supports_bf16() else 'INACTIVE'}; torch {torch.__version__}",
        f"command: python bench/profile_step.py {' '.join(argv)}",
        f"{args.batch_size} pairs a step ({args.batch_size // PAIRS_PER_QUESTION} questions x K={PAIRS_PER_QUESTION}), "
        f"{args.steps} profiled steps, vocabulary {vocab}, {tokens:.0f} packed tokens a step",
        "",
        f"{bar} part of the step {bar} share of self CPU time {bar} ms per step (under the profiler) {bar}",
    ]
    if args.markdown:
        lines.append("| --- | ---: | ---: |")
    for g in GROUPS:
        t = groups.get(g, 0.0)
        lines.append(f"{bar} {g} {bar} {100 * t / total:.1f}% {bar} {t / 1e3 / args.steps:.0f} {bar}")
    lines += ["", f"{bar} packed step {bar} forward + loss, ms {bar} backward, ms {bar} step, ms {bar} speed vs "
              f"before issue 16 {bar}"]
    if args.markdown:
        lines.append("| --- | ---: | ---: | ---: | ---: |")
    medians = {h: (1e3 * statistics.median(t["fwd"]), 1e3 * statistics.median(t["bwd"])) for h, t in times.items()}
    base = sum(medians[BEFORE])
    for name, (f_ms, b_ms) in medians.items():
        lines.append(f"{bar} {name} {bar} {f_ms:.0f} {bar} {b_ms:.0f} {bar} {f_ms + b_ms:.0f} {bar} "
                     f"{base / (f_ms + b_ms):.2f}x {bar}")
    lines.append(f"(medians of {len(times[BEFORE]['fwd'])} steps each, no profiler)")
    if args.top:
        by_op: dict[str, float] = defaultdict(float)
        for e in prof.key_averages():
            by_op[e.key] += e.self_cpu_time_total
        lines += ["", f"{bar} op {bar} group {bar} share {bar}"] + (["| --- | --- | ---: |"] if args.markdown else [])
        for name, t in sorted(by_op.items(), key=lambda kv: -kv[1])[: args.top]:
            group = group_of(name, [], vocab)  # no shapes here: a product's row is head and body together
            group = "matmul (head and body)" if group.startswith("matmul") else group
            lines.append(f"{bar} {name} {bar} {group} {bar} {100 * t / total:.1f}% {bar}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
