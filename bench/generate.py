"""Generation throughput of the student generator on this machine, as one command.

Why: the student samples negatives (and refreshes them under the mixed policy) on whatever machine
the user has, often a CPU. Two questions decide how that code should look, and this script answers
both with numbers from the machine it runs on:

(a) does bf16 autocast pay off? ``hf fp32`` against ``hf bf16`` (:class:`HFGenerator` with and
    without :func:`orpo_distill.models.autocast`) at each batch size;
(b) does our batched, left-padded, length-sorted generator beat the obvious code? ``hf ...`` against
    ``loop fp32``, a plain one-prompt-at-a-time ``model.generate`` loop over the same prompts.

Method: real prompts (the synthetic task's mcq messages through the model's chat template), greedy,
a fixed ``max_new_tokens``. For batch size B the workload is the first B prompts (one full batch for
the generator; B calls for the loop), or ``--prompts N`` of them. Tokens counted are the generated
ones up to and including the first EOS, never the padding after it, so
``tokens/s = generated tokens / wall seconds`` (rendering and tokenizing the prompts included, for
every arm alike). All arms run in one process on one loaded model: each batch size first warms up
every arm (a short run), then runs the repeats with the arms alternating (their order rotating
each repeat, so no arm always runs first); the table gives the median of the repeats.

Run it with nothing else busy on the machine: ``python bench/generate.py`` (``--markdown`` for
docs/benchmarks.md; ``--quick`` is a smoke test whose numbers mean nothing).

``--backend vllm`` (a CUDA GPU and ``pip install 'orpo-distill[vllm]'``) asks a third question on the
same prompts: (c) how much faster is the ``vllm`` generator than ``hf bf16``? Arms ``hf bf16`` (our
generator, fp32 weights under bf16 autocast, ``batch_size`` prompts per ``generate`` call) and
``vllm bf16`` (:class:`VLLMGenerator` on a ``vllm.LLM`` with bf16 weights, every prompt of the
workload in one engine call, prefix caching off so that repeats do not reuse the previous repeat's
prompts). Tokens are the sampled ones as each generator counts them (vLLM: the completion's token ids,
EOS included, as in our count). The vLLM engine is built first, with ``--gpu-memory-utilization`` of
the GPU, and the hf model then loads beside it. Give a Hub id or a folder (``--model``).
"""

from __future__ import annotations

import argparse
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch

from orpo_distill.config import DatasetConfig
from orpo_distill.datasets import load_splits
from orpo_distill.errors import UserError
from orpo_distill.generators.base import Request
from orpo_distill.generators.hf import HFGenerator
from orpo_distill.models import cpu_supports_bf16, load_model, load_tokenizer, pick_device, render_prompt, resolve_model
from orpo_distill.tasks import build_task
from machine import cpu_line  # bench/machine.py (bench/ is on sys.path when run as a script)

DEFAULT_MODEL = "builtin:smollm2-135m-instruct"
DEFAULT_BATCH_SIZES = (1, 16, 64)
QUICK = dict(batch_sizes=(1, 2), max_new_tokens=8, repeats=1, warmup_tokens=2)
BACKENDS = ("hf", "vllm")
VLLM_GPU_MEMORY_UTILIZATION = 0.5  # the hf model shares the GPU with the engine

Messages = tuple[dict[str, str], ...]
RunFn = Callable[[int, int | None], int]  # (max_new_tokens, prompts limit) -> generated tokens


@dataclass(frozen=True)
class Row:
    """One table line: an arm at one batch size, summarised over the repeats."""

    batch_size: int
    arm: str
    prompts: int
    tokens: int  # median generated tokens per repeat
    seconds: float  # median wall seconds per repeat
    tokens_per_s: float  # median of the per-repeat tokens/s
    low: float  # slowest repeat, tokens/s
    high: float  # fastest repeat, tokens/s
    speedup: float | None = None  # tokens/s against the loop arm at the same batch size


# ---- machine -----------------------------------------------------------------------------------


def bf16_autocast_active(device: torch.device) -> bool:
    """Whether ``autocast(device)`` really switches to bf16 here (else the bf16 arm is plain fp32)."""
    return device.type == "cuda" or (device.type == "cpu" and cpu_supports_bf16())


def machine_lines(device: torch.device) -> list[str]:
    import transformers

    lines = [
        cpu_line(),
        f"torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}",
        f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
    ]
    active = bf16_autocast_active(device)
    lines.append(
        "bf16 autocast: " + ("active" if active else "INACTIVE (no bf16 units): the bf16 arm runs in fp32")
    )
    return lines


# ---- workload ----------------------------------------------------------------------------------


def load_prompts(n: int) -> list[Messages]:
    """The first ``n`` training prompts of the default synthetic dataset, as mcq chat messages."""
    cfg = DatasetConfig()
    train, _ = load_splits(cfg, "mcq")
    if len(train) < n:
        train, _ = load_splits(DatasetConfig(train_size=n), "mcq")
    task = build_task("mcq")
    return [tuple(task.messages(r)) for r in train[:n]]


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """The stop tokens, chosen exactly as HFGenerator chooses them (model's generation config + tokenizer)."""
    ids: list[int] = []
    gc = getattr(model, "generation_config", None)
    if gc is not None and gc.eos_token_id is not None:
        ids.extend(gc.eos_token_id if isinstance(gc.eos_token_id, list) else [gc.eos_token_id])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


def count_generated(row: Sequence[int], eos: set[int]) -> int:
    """Generated tokens up to and including the first EOS (all of them when none): HFGenerator's count."""
    for t, tid in enumerate(row):
        if tid in eos:
            return t + 1
    return len(row)


def hf_arm(
    model: Any, tokenizer: Any, prompts: list[Messages], batch_size: int, bf16: bool, decoding: str = "fast",
    samples: int = 1, temperature: float = 0.0, texts: dict[int, list[list[str]]] | None = None,
) -> RunFn:
    """Our generator: all prompts in one ``generate`` call, batched ``batch_size`` rows at a time,
    ``samples`` rows per prompt. ``texts``, when given, receives each run's texts keyed by its token
    budget (to check that two arms wrote the same samples)."""
    gen = HFGenerator.from_model(model, tokenizer, name="bench", batch_size=batch_size, progress=False, bf16=bf16,
                                 decoding=decoding)

    def run(max_new_tokens: int, limit: int | None = None) -> int:
        requests = [Request(key=str(i), messages=m, n=samples, temperature=temperature, max_tokens=max_new_tokens,
                            seed=1000 * i) for i, m in enumerate(prompts[:limit])]
        out = gen.generate(requests)
        if texts is not None:
            texts[max_new_tokens] = [[s.text for s in per] for per in out]
        return sum(s.num_tokens for per in out for s in per)

    return run


def loop_arm(model: Any, tokenizer: Any, prompts: list[Messages]) -> RunFn:
    """The obvious baseline: one ``model.generate`` per prompt, no padding, no autocast."""
    eos = eos_ids(model, tokenizer)
    device = next(model.parameters()).device

    @torch.no_grad()
    def run(max_new_tokens: int, limit: int | None = None) -> int:
        model.eval()
        total = 0
        for messages in prompts[:limit]:
            text = render_prompt(tokenizer, messages)
            ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]], dtype=torch.long)
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=torch.ones_like(ids).to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=eos,
            )
            total += count_generated(out[0, ids.shape[1] :].tolist(), set(eos))
        return total

    return run


def build_vllm_engine(model: str, gpu_memory_utilization: float, seed: int = 0) -> Any:
    """A ``vllm.LLM`` for the benchmark: bf16 weights, prefix caching off (the repeats send the same
    prompts, which a prefix cache would answer from the previous repeat). Raises :class:`UserError`
    with the install hint when vLLM is missing."""
    from orpo_distill.generators.vllm import import_vllm

    vllm = import_vllm()
    return vllm.LLM(model=resolve_model(model), dtype="bfloat16", seed=seed,
                    gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=False)


def vllm_arm(engine: Any, prompts: list[Messages]) -> RunFn:
    """The vllm generator: every prompt of the workload in one engine call; vLLM batches by itself."""
    from orpo_distill.generators.vllm import VLLMGenerator

    gen = VLLMGenerator(engine, name="bench", progress=False)

    def run(max_new_tokens: int, limit: int | None = None) -> int:
        requests = [Request(key=str(i), messages=m, max_tokens=max_new_tokens) for i, m in enumerate(prompts[:limit])]
        return sum(s.num_tokens for samples in gen.generate(requests) for s in samples)

    return run


# ---- measuring ---------------------------------------------------------------------------------


def measure(
    arms: dict[str, RunFn],
    max_new_tokens: int,
    repeats: int,
    warmup_tokens: int,
    warmup_limits: dict[str, int | None] | None = None,
) -> dict[str, list[tuple[int, float]]]:
    """``{arm: [(tokens, seconds), ...]}``: one short warm-up run per arm, then ``repeats`` rounds, arms
    alternating. ``warmup_limits`` caps the warm-up's prompts per arm (the loop's shapes never depend on
    the batch size, so two prompts warm it; a batched arm needs its full batch to see its shapes)."""
    limits = warmup_limits or {}
    for name, run in arms.items():
        run(min(warmup_tokens, max_new_tokens), limits.get(name))
    names = list(arms)
    timings: dict[str, list[tuple[int, float]]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            tokens = arms[name](max_new_tokens, None)
            seconds = time.perf_counter() - start
            timings[name].append((tokens, seconds))
            print(f"  repeat {r + 1}: {name}: {tokens} tokens in {seconds:.2f} s", file=sys.stderr, flush=True)
    return timings


def summarise(batch_size: int, prompts: int, timings: dict[str, list[tuple[int, float]]], baseline: str) -> list[Row]:
    """Median rows; the speedup is median tokens/s over the baseline arm's median tokens/s."""
    rows = []
    for arm, runs in timings.items():
        rates = [t / s for t, s in runs]
        rows.append(
            Row(
                batch_size=batch_size,
                arm=arm,
                prompts=prompts,
                tokens=round(statistics.median(t for t, _ in runs)),
                seconds=statistics.median(s for _, s in runs),
                tokens_per_s=statistics.median(rates),
                low=min(rates),
                high=max(rates),
            )
        )
    base = next(r.tokens_per_s for r in rows if r.arm == baseline)
    return [replace(r, speedup=r.tokens_per_s / base if base > 0 else None) for r in rows]


# ---- output ------------------------------------------------------------------------------------

HEADERS = ["batch", "arm", "prompts", "gen tokens", "seconds", "tokens/s", "min-max tokens/s", "vs loop"]


def headers(baseline: str = "loop") -> list[str]:
    """The table's columns; the last is the speedup against ``baseline`` ("loop", or "hf bf16" for vllm)."""
    return [*HEADERS[:-1], f"vs {baseline}"]


def cells(row: Row) -> list[str]:
    return [
        str(row.batch_size),
        row.arm,
        str(row.prompts),
        str(row.tokens),
        f"{row.seconds:.2f}",
        f"{row.tokens_per_s:.1f}",
        f"{row.low:.1f}-{row.high:.1f}",
        "-" if row.speedup is None else f"{row.speedup:.2f}x",
    ]


def markdown(rows: list[Row], header: list[str], baseline: str = "loop") -> str:
    cols = headers(baseline)
    out = [f"- {line}" for line in header] + ["", "| " + " | ".join(cols) + " |"]
    out.append("|" + "|".join("---:" if h not in ("arm",) else "---" for h in cols) + "|")
    out += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    return "\n".join(out)


def print_rich(rows: list[Row], header: list[str], baseline: str = "loop") -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Generation throughput")
    for h in headers(baseline):
        table.add_column(h, justify="left" if h == "arm" else "right")
    for r in rows:
        table.add_row(*cells(r))
    console = Console(width=max(120, Console().width))
    for line in header:
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    console.print(table)


def report(rows: list[Row], argv: list[str], device: torch.device, lines: list[str], markdown_out: bool,
           baseline: str = "loop") -> None:
    """Print the table under its header: the command, the machine, then ``lines`` (the workload)."""
    header = ["command: `" + shlex.join(["python", "bench/generate.py", *argv]) + "`", *machine_lines(device), *lines]
    if markdown_out:
        print(markdown(rows, header, baseline))
    else:
        print_rich(rows, header, baseline)


# ---- command -----------------------------------------------------------------------------------


def positive_ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def positive_int(text: str) -> int:
    (value,) = positive_ints(text)
    return value


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/generate.py",
        description="Student generation throughput: hf fp32 vs hf bf16 autocast vs a plain model.generate loop.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model name or folder (default {DEFAULT_MODEL})")
    p.add_argument("--batch-sizes", type=positive_ints, default=None, help="comma-separated (default 1,16,64)")
    p.add_argument("--max-new-tokens", type=positive_int, default=None, help="tokens per prompt at most (default 64)")
    p.add_argument("--repeats", type=positive_int, default=None, help="timed rounds per arm; median reported (default 3)")
    p.add_argument("--warmup-tokens", type=positive_int, default=None, help="max_new_tokens of the warm-up (default 16)")
    p.add_argument("--prompts", type=positive_int, default=None, help="prompts per batch size (default: the batch size)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--backend", choices=BACKENDS, default="hf",
                   help="hf: hf fp32 vs hf bf16 vs a model.generate loop (default); "
                        "vllm: the vllm generator vs hf bf16 on the same prompts (CUDA GPU and vllm needed)")
    p.add_argument("--gpu-memory-utilization", type=float, default=VLLM_GPU_MEMORY_UTILIZATION,
                   help=f"vllm backend: share of GPU memory the engine reserves (default {VLLM_GPU_MEMORY_UTILIZATION}; "
                        "the hf model loads beside it)")
    p.add_argument("--decoding", action="store_true",
                   help="our decoding loop (prefill once per prompt, finished rows dropped) against model.generate, "
                        "in the same generator, with a check that both write the same samples")
    p.add_argument("--samples", type=positive_int, default=1,
                   help="--decoding: samples per prompt; a batch of B rows holds B/samples prompts (default 1)")
    p.add_argument("--temperature", type=float, default=0.0, help="--decoding: sampling temperature (default 0: greedy)")
    p.add_argument("--quick", action="store_true", help="smoke test: batch 1,2, 8 tokens, 1 repeat; numbers mean nothing")
    p.add_argument("--markdown", action="store_true", help="print a markdown block for docs/benchmarks.md")
    args = p.parse_args(list(argv))
    defaults = QUICK if args.quick else dict(
        batch_sizes=DEFAULT_BATCH_SIZES, max_new_tokens=64, repeats=3, warmup_tokens=16
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not 0 < args.gpu_memory_utilization < 1:
        p.error(f"--gpu-memory-utilization must be between 0 and 1, got {args.gpu_memory_utilization}")
    return args


def load_student(args: argparse.Namespace) -> tuple[Any, Any]:
    """The tokenizer and the fp32 model in eval mode (each arm picks its own autocast)."""
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype="float32", device=args.device)
    model.eval()
    return tokenizer, model


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.backend == "vllm":
        return main_vllm(args, argv)
    if args.decoding:
        return main_decoding(args, argv)
    try:
        tokenizer, model = load_student(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = pick_device(args.device)
    all_prompts = load_prompts(max(args.prompts or b for b in args.batch_sizes))
    arm_names = ["hf fp32", "hf bf16", "loop fp32"]
    if not bf16_autocast_active(device):
        arm_names[1] = "hf bf16 (inactive)"
    rows: list[Row] = []
    for b in args.batch_sizes:
        prompts = all_prompts[: args.prompts or b]
        arms = {
            arm_names[0]: hf_arm(model, tokenizer, prompts, b, bf16=False),
            arm_names[1]: hf_arm(model, tokenizer, prompts, b, bf16=True),
            arm_names[2]: loop_arm(model, tokenizer, prompts),
        }
        print(f"batch {b}: {len(prompts)} prompts, {args.repeats} repeats ...", file=sys.stderr, flush=True)
        timings = measure(
            arms, args.max_new_tokens, args.repeats, args.warmup_tokens, warmup_limits={arm_names[2]: 2}
        )
        rows += summarise(b, len(prompts), timings, baseline=arm_names[2])
    report(rows, argv, device, [
        f"model: {args.model}; prompts: synthetic mcq (default dataset config), chat template; greedy, "
        f"max_new_tokens {args.max_new_tokens}; tokens counted up to EOS; "
        f"median of {args.repeats} repeats after a warm-up, arms alternating"], args.markdown)
    return 0


def main_decoding(args: argparse.Namespace, argv: list[str]) -> int:
    """``--decoding``: our decoding loop against ``model.generate`` inside the same generator, at the
    given samples per prompt and temperature, with a check that both wrote the same texts."""
    try:
        tokenizer, model = load_student(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = pick_device(args.device)
    all_prompts = load_prompts(max(args.prompts or max(1, b // args.samples) for b in args.batch_sizes))
    precisions = [("fp32", False)] + ([("bf16", True)] if bf16_autocast_active(device) else [])
    rows: list[Row] = []
    same: list[str] = []
    for b in args.batch_sizes:
        prompts = all_prompts[: args.prompts or max(1, b // args.samples)]
        for label, bf16 in precisions:
            texts: dict[str, dict[int, list[list[str]]]] = {"generate": {}, "fast": {}}
            arms = {f"{d} {label}": hf_arm(model, tokenizer, prompts, b, bf16=bf16, decoding=d, samples=args.samples,
                                           temperature=args.temperature, texts=texts[d])
                    for d in ("generate", "fast")}
            print(f"batch {b} {label}: {len(prompts)} prompts x {args.samples} samples, {args.repeats} repeats ...",
                  file=sys.stderr, flush=True)
            timings = measure(arms, args.max_new_tokens, args.repeats, args.warmup_tokens)
            rows += summarise(b, len(prompts), timings, baseline=f"generate {label}")
            a, c = texts["generate"][args.max_new_tokens], texts["fast"][args.max_new_tokens]
            equal = sum(x == y for pa, pc in zip(a, c) for x, y in zip(pa, pc))
            same.append(f"batch {b} {label}: {equal}/{sum(len(p) for p in a)} samples identical between the arms")
    report(rows, argv, device, [
        f"model: {args.model}; prompts: synthetic mcq train questions, chat template; {args.samples} samples per "
        f"prompt at temperature {args.temperature} (per-row seeds), max_new_tokens {args.max_new_tokens}; "
        f"tokens counted up to EOS; median of {args.repeats} repeats after a warm-up, arms alternating",
        *same], args.markdown, baseline="generate")
    return 0


def main_vllm(args: argparse.Namespace, argv: list[str]) -> int:
    """``--backend vllm``: ``vllm bf16`` against ``hf bf16`` on the same prompts, on one CUDA GPU."""
    try:
        device = pick_device(args.device)
        if device.type != "cuda":
            raise UserError(f"--backend vllm needs a CUDA GPU (device here: {device})")
        engine = build_vllm_engine(args.model, args.gpu_memory_utilization)  # first: vLLM checks free memory
        tokenizer, model = load_student(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    all_prompts = load_prompts(max(args.prompts or b for b in args.batch_sizes))
    rows: list[Row] = []
    for b in args.batch_sizes:
        prompts = all_prompts[: args.prompts or b]
        arms = {"hf bf16": hf_arm(model, tokenizer, prompts, b, bf16=True), "vllm bf16": vllm_arm(engine, prompts)}
        print(f"batch {b}: {len(prompts)} prompts, {args.repeats} repeats ...", file=sys.stderr, flush=True)
        timings = measure(arms, args.max_new_tokens, args.repeats, args.warmup_tokens)
        rows += summarise(b, len(prompts), timings, baseline="hf bf16")
    import vllm

    report(rows, argv, device, [
        f"vllm {vllm.__version__}; engine: bf16 weights, gpu_memory_utilization {args.gpu_memory_utilization}, "
        "prefix caching off, all prompts of a row in one call; hf: fp32 weights, bf16 autocast, batch = the row's batch",
        f"model: {args.model}; prompts: synthetic mcq (default dataset config), chat template; greedy, "
        f"max_new_tokens {args.max_new_tokens}; tokens as each generator counts them (EOS included); "
        f"median of {args.repeats} repeats after a warm-up, arms alternating"], args.markdown, baseline="hf bf16")
    return 0


if __name__ == "__main__":
    sys.exit(main())
