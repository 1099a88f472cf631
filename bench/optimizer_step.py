"""AdamW's step on the student's weights: torch's implementations side by side.

Why: issue 16 (speed): the demo's training steps cost more than their forward and backward, and
torch's default AdamW on a CPU is the multi-tensor one; ``training.make_optimizer`` now asks for the
fused kernel. This times
one ``optimizer.step()`` (and the gradient clipping the training loop does before it) over fp32 weights
shaped like the model's (default: SmolLM2-135M's parameter shapes, built from its config, random values,
no download), for the fused, the multi-tensor (``foreach``, torch's default on a CPU) and the
per-parameter loop implementations, in turn, ``--repeats`` times; medians.

Run: ``python bench/optimizer_step.py --markdown`` (``--quick``: a small model, a smoke test).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Sequence

import torch

from machine import cpu_line, positive_int  # bench/ is on sys.path when run as a script

KINDS = {"fused": {"fused": True}, "foreach (torch's CPU default)": {"foreach": True}, "for-loop": {"foreach": False}}


def shapes(model: str, quick: bool) -> list[torch.Size]:
    """The trainable parameters' shapes of ``model`` (built from its config on the meta device)."""
    if quick:
        return [torch.Size([512, 64])] + [torch.Size([64, 64])] * 8
    from transformers import AutoConfig, AutoModelForCausalLM

    from orpo_distill.models import resolve_model

    config = AutoConfig.from_pretrained(resolve_model(model))
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(config)
    return [p.shape for p in m.parameters()]


def time_steps(params: list[torch.nn.Parameter], kwargs: dict, repeats: int) -> tuple[float, float]:
    """Median seconds of ``clip_grad_norm_`` and of ``AdamW.step`` over ``repeats`` steps (one warm-up)."""
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, **kwargs)
    opt.step()
    clip, step = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        t1 = time.perf_counter()
        opt.step()
        step.append(time.perf_counter() - t1)
        clip.append(t1 - t0)
    return statistics.median(clip), statistics.median(step)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin:smollm2-135m-instruct")
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes(args.model, args.quick)]
    for q in params:
        q.grad = torch.randn_like(q)
    n = sum(q.numel() for q in params)
    results = {name: time_steps(params, kw, 1 if args.quick else args.repeats) for name, kw in KINDS.items()}
    bar = "|" if args.markdown else " "
    base = results["foreach (torch's CPU default)"][1]
    lines = [f"{cpu_line()}; torch {torch.__version__}", f"command: python bench/optimizer_step.py {' '.join(argv)}",
             f"{len(params)} fp32 tensors, {n / 1e6:.1f}M parameters ({args.model if not args.quick else 'quick'})", "",
             f"{bar} AdamW {bar} step, ms {bar} vs foreach {bar} clip_grad_norm_, ms {bar}"]
    if args.markdown:
        lines.append("| --- | ---: | ---: | ---: |")
    for name, (clip, step) in results.items():
        lines.append(f"{bar} {name} {bar} {1e3 * step:.2f} {bar} {base / step:.2f}x {bar} {1e3 * clip:.2f} {bar}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
