"""A/B (issue 16): attention by segments as it is now against the same module at an earlier git revision,
inside the packed ORPO step (forward + loss + backward of 8 pairs, bench/train_step.py's demo pairs, bf16
autocast where the CPU has bf16 units), the two alternating batch by batch in one process on one model.

Reports per arm: the median step time and its range, the loss of every batch (bf16 rounding apart, the
two agree: they compute the same attention; batch 0 is also computed in fp32, where they must agree to
1e-5), and, from one profiled step each, how many zero-fills (``aten::fill_``) and
copies (``aten::copy_``) the step runs and their self CPU time: counts do not depend on the machine's load.

Run: python bench/segments_ab.py --rev b857520 [--rounds 3] [--steps 3]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_line, positive_int  # noqa: E402
from orpo_distill import forward  # noqa: E402
from orpo_distill.batching import collate_packed, group_pairs  # noqa: E402
from orpo_distill.models import autocast, cpu_supports_bf16, load_model, load_tokenizer  # noqa: E402
from train_step import (  # noqa: E402
    DEFAULT_MODEL, PAIRS_PER_QUESTION, _orpo, build_questions, demo_config, make_batches, tokenized_batches,
)

MODULE = "src/orpo_distill/segmented_attention.py"


def module_at(rev: str) -> types.ModuleType:
    """``segmented_attention`` as it was at ``rev`` (it imports only torch and the standard library)."""
    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(["git", "show", f"{rev}:{MODULE}"], cwd=root, check=True, capture_output=True,
                            text=True).stdout
    module = types.ModuleType(f"segmented_attention_{rev}")
    exec(compile(source, f"{rev}:{MODULE}", "exec"), module.__dict__)
    return module


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rev", required=True, help="the git revision whose segmented_attention.py is arm (a)")
    p.add_argument("--rounds", type=positive_int, default=3)
    p.add_argument("--steps", type=positive_int, default=3, help="distinct batches of 8 pairs")
    args = p.parse_args()
    torch.set_num_threads(2)
    arms = {f"at {args.rev}": module_at(args.rev).segmented_attention, "now": forward.segmented_attention}
    cfg = demo_config()
    tok = load_tokenizer(DEFAULT_MODEL)
    model = load_model(DEFAULT_MODEL, dtype="float32", device="cpu")
    model.train()
    qs = build_questions(tok, args.steps * 8 // PAIRS_PER_QUESTION, cfg)
    pairs = tokenized_batches(tok, make_batches(qs, 8, args.steps), cfg.train.max_length)
    batches = [collate_packed(group_pairs(b, max_pairs=PAIRS_PER_QUESTION), pad_id=tok.pad_token_id,
                              nll_on_prompt=False) for b in pairs]
    dev = torch.device("cpu")

    def step(arm: str, i: int) -> tuple[float, float]:
        forward.segmented_attention = arms[arm]  # what pair_logps_packed enters around the model's forward
        t0 = time.perf_counter()
        with autocast(dev):
            out = _orpo(forward.pair_logps_packed(model, batches[i]), cfg.train.lambda_or)
        out.loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, out.loss.item()

    def fp32_loss(arm: str) -> float:  # the parity check: in fp32 the two compute the same numbers
        forward.segmented_attention = arms[arm]
        with torch.no_grad():
            return _orpo(forward.pair_logps_packed(model, batches[0]), cfg.train.lambda_or).loss.item()

    times: dict[str, list[float]] = {a: [] for a in arms}
    losses: dict[str, list[float]] = {a: [] for a in arms}
    for i in range(args.steps):  # warm-up
        for a in arms:
            losses[a].append(step(a, i)[1])
    for _ in range(args.rounds):
        for i in range(args.steps):
            for a in arms:
                times[a].append(step(a, i)[0])
    ops: dict[str, dict[str, tuple[int, float]]] = {}
    for a in arms:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step(a, 0)
        ops[a] = {e.key: (e.count, e.self_cpu_time_total / 1e3) for e in prof.key_averages()
                  if e.key in ("aten::fill_", "aten::copy_", "aten::index_add_")}
    fp32 = {a: fp32_loss(a) for a in arms}
    forward.segmented_attention = arms["now"]
    print(f"{cpu_line()}; bf16 autocast {'active' if cpu_supports_bf16() else 'INACTIVE'}; torch {torch.__version__}")
    print(f"command: python bench/segments_ab.py {' '.join(sys.argv[1:])}")
    print(f"{len(batches)} batches of 8 pairs; {sum(b['input_ids'].numel() for b in batches) / len(batches):.0f} "
          f"packed tokens a step (with padding); {args.rounds} rounds after a warm-up, arms alternating\n")
    base = statistics.median(times[f"at {args.rev}"])
    print("| arm | step, s (median) | min-max | speed vs (a) | fill_ calls / ms | copy_ calls / ms | "
          "index_add_ calls / ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for a in arms:
        med = statistics.median(times[a])
        cells = " | ".join(f"{ops[a].get(k, (0, 0.0))[0]} / {ops[a].get(k, (0, 0.0))[1]:.0f}"
                           for k in ("aten::fill_", "aten::copy_", "aten::index_add_"))
        print(f"| {a} | {med:.2f} | {min(times[a]):.2f}-{max(times[a]):.2f} | {base / med:.2f}x | {cells} |")
    worst = max(abs(x - y) / abs(y) for x, y in zip(losses["now"], losses[f"at {args.rev}"]))
    print(f"\nlosses (a): {', '.join(f'{x:.5f}' for x in losses[f'at {args.rev}'])}; "
          f"now: {', '.join(f'{x:.5f}' for x in losses['now'])}; worst relative difference {worst:.1e} "
          f"(bf16 where autocast is active)")
    a, b = fp32["now"], fp32[f"at {args.rev}"]
    print(f"fp32 parity, batch 0: (a) {b:.7f}, now {a:.7f}, relative difference {abs(a - b) / abs(b):.1e} "
          f"(tolerance 1e-5): {'PASS' if abs(a - b) <= 1e-5 * abs(b) else 'FAIL'}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
