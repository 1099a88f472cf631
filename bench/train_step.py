"""Training-step speed and peak memory: TRL's ORPOTrainer against our plain and packed layouts.

Why: DESIGN.md section 4 claims the packed (prefix-shared) layout and the chunked log-probabilities
make an ORPO step cheaper than TRL's. This script measures that claim on the machine it runs on, with
everything but the layout held equal:

(a) ``TRL``: ``trl.experimental.orpo.ORPOTrainer``'s own code: its ``tokenize_row`` on the
    (prompt, chosen, rejected) texts, its ``DPODataCollatorWithPadding``, and its ``compute_loss``
    (``concatenated_forward`` + ``get_batch_loss_metrics``: full logits, ``selective_log_softmax``,
    NLL over prompt and response) on a minimal trainer instance (no Trainer machinery around it);
(b) ``plain``: ``batching.collate_plain`` + ``pair_logps`` + ``losses.orpo_loss`` (TRL's row layout,
    our chunked log-probabilities);
(c) ``packed``: ``group_pairs`` + ``collate_packed`` + ``pair_logps_packed`` + ``orpo_loss`` (one row
    per question, the prompt once).

Workload: the demo's pairs without running the demo: the demo config's synthetic mcq questions, the
task's chat prompt, K = 4 pairs per question whose chosen side is a correct scripted-teacher trace and
whose rejected side a wrong one. Wrong *teacher* traces stand in for the demo's student negatives
(same task, same trace styles, similar length), so no student generation is needed. One step is
``--batch-size`` pairs (default 8 = 2 questions x K, the demo's ``train.batch_size``); ``--steps``
distinct batches make a repeat, and every arm trains on the same batches.

A step is: collate, forward + loss under ``torch.autocast(bf16)`` (where the CPU has bf16 units; loss
in fp32), backward, ``zero_grad``; no optimizer (its cost is the same for every layout). Tokenizing
is done once beforehand for every arm (TRL does it in ``dataset.map``, we before the epoch).

Method: one process, one loaded model. A warm-up pass over every batch per arm, then ``--repeats``
rounds; in each round the arms run in turn (a, b, c), each its ``--steps`` timed steps then one
untimed step under the memory sampler, then the matmul probe. Tables give medians over rounds.

Peak memory on a CPU: torch keeps no peak counter for host memory, so a thread samples the process's
resident set (``/proc/self/statm``, psutil elsewhere) every millisecond during one step, after
``gc.collect()`` and glibc's ``malloc_trim(0)``; the figure is the peak RSS minus the RSS before the
step. It includes what every arm shares (the fp32 gradients, autocast's bf16 weight copies).

Model FLOPs utilisation of (c): ``6 x parameters x trained tokens/s`` over the matmul rate of the
same machine in the same run, in the dtype the step's matmuls run in (bf16 where the CPU has bf16
units, else fp32: a CPU without them emulates bf16 far below its fp32 rate, and the step runs in fp32
there) (``2 n^3`` FLOPs of an ``n x n @ n x n`` ``torch.matmul``, median
of calls). Trained tokens are the packed rows' real tokens (no padding). Attention FLOPs and the
log-prob chunks recomputed in the backward are not counted, as usual for MFU.

Run it with nothing else busy on the machine: ``python bench/train_step.py --markdown`` (``--quick``
is a smoke test whose numbers mean nothing).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import functools
import gc
import os
import platform
import shlex
import statistics
import sys
import threading
import time
import warnings
from collections import defaultdict
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, NamedTuple, Sequence

import torch

from orpo_distill.batching import (
    TokenizedPair,
    collate_packed,
    collate_plain,
    group_pairs,
    tokenize_pair,
)
from orpo_distill.forward import orpo_loss_of, pair_logps, pair_logps_packed
from orpo_distill.config import RunConfig, load_config
from orpo_distill.datasets import load_splits
from orpo_distill.errors import UserError
from orpo_distill.generators.base import Request
from orpo_distill.generators.scripted import ScriptedTeacher
from orpo_distill.models import autocast, cpu_supports_bf16, load_model, load_tokenizer, render_prompt
from orpo_distill.tasks import build_task
from machine import cpu_line, positive_int  # bench/machine.py (bench/ is on sys.path when run as a script)

DEFAULT_MODEL = "builtin:smollm2-135m-instruct"
PAIRS_PER_QUESTION = 4  # K
TEACHER_ERROR_RATE = 0.5  # about half the traces wrong: enough negatives from few samples
TEACHER_SAMPLES = 8  # per question; topped up to 64 for a question short of K of either kind
DEFAULTS = dict(batch_size=8, repeats=5, steps=3, warmup=1, matmul_size=2048, matmul_calls=5)
QUICK = dict(batch_size=4, repeats=1, steps=1, warmup=1, matmul_size=256, matmul_calls=3)
FP32_TOL = 1e-4  # relative, loss of the same batch: only summation order differs
BF16_TOL = 5e-3  # relative: TRL's log-softmax runs in bf16 under autocast, ours in fp32 (SmolLM2: ~4e-4)
SAMPLE_INTERVAL_S = 0.001
ARM_NAMES = ("(a) TRL ORPOTrainer", "(b) ours, plain", "(c) ours, packed")
TARGET_SPEEDUP = 1.5


class PairText(NamedTuple):
    prompt: str  # rendered with the student's chat template
    chosen: str
    rejected: str


# ---- machine -----------------------------------------------------------------------------------


def machine_lines() -> list[str]:
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = "not installed"
    bf16 = "active" if cpu_supports_bf16() else "INACTIVE (no bf16 units here): every arm runs in fp32"
    return [
        cpu_line(),
        f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl_version}, "
        f"Python {platform.python_version()}",
        f"bf16 autocast: {bf16}",
    ]


# ---- workload ----------------------------------------------------------------------------------


def demo_config() -> RunConfig:
    """The embedded demo's configuration: its dataset, task, lambda and max_length are the workload's."""
    return load_config(str(files("orpo_distill") / "configs" / "demo.yaml"))


def split_traces(task: Any, record: Any, texts: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(correct, wrong)`` distinct traces in order, checked by the task exactly as the pipeline checks them.

    Distinct, because the packed layout computes a repeated response once: duplicates would flatter it.
    """
    correct: list[str] = []
    wrong: list[str] = []
    for text in dict.fromkeys(texts):
        (correct if task.check(task.extract(text, record=record), record) else wrong).append(text)
    return correct, wrong


def build_questions(
    tokenizer: Any, n_questions: int, cfg: RunConfig, k: int = PAIRS_PER_QUESTION
) -> list[list[PairText]]:
    """``n_questions`` lists of K pairs: chosen = the i-th distinct correct teacher trace, rejected = the i-th
    distinct wrong one. 8 samples per question, 64 for one short of K of either kind; a question still
    short (a problem with too few ways to go wrong) is skipped, as the pipeline would leave it out."""
    dataset = cfg.dataset.model_copy(update={"train_size": 2 * n_questions + 8})
    train, _ = load_splits(dataset, cfg.task.kind)
    task = build_task(cfg.task)
    teacher = ScriptedTeacher(train, error_rate=TEACHER_ERROR_RATE, seed=cfg.seed, task_kind=cfg.task.kind)
    questions = []
    for record in train:
        messages = tuple(task.messages(record))
        for n in (TEACHER_SAMPLES, 64):
            samples = teacher.generate([Request(key=record.id, messages=messages, n=n, seed=cfg.seed)])[0]
            correct, wrong = split_traces(task, record, [s.text for s in samples])
            if len(correct) >= k and len(wrong) >= k:
                prompt = render_prompt(tokenizer, messages)
                questions.append([PairText(prompt, correct[i], wrong[i]) for i in range(k)])
                break
        if len(questions) == n_questions:
            return questions
    raise UserError(f"the demo dataset gave only {len(questions)} questions with {k} distinct correct and {k} "
                    f"distinct wrong teacher traces; the benchmark needs {n_questions}")


def make_batches(questions: list[list[PairText]], pairs_per_step: int, steps: int) -> list[list[PairText]]:
    """``steps`` batches of ``pairs_per_step`` pairs, whole questions each (a question's pairs stay together)."""
    flat = [pair for q in questions for pair in q]
    if len(flat) < pairs_per_step * steps:
        raise ValueError(f"{len(flat)} pairs cannot fill {steps} steps of {pairs_per_step}")
    return [flat[s * pairs_per_step : (s + 1) * pairs_per_step] for s in range(steps)]


# ---- arms --------------------------------------------------------------------------------------

Amp = Callable[[], AbstractContextManager[Any]]


@dataclass
class Arm:
    """One way to train: ``step(i)`` runs one optimizer-free step on batch ``i``; ``loss(i, amp)`` the
    loss of batch ``i`` without gradients, TRL's objective (NLL over prompt and response)."""

    name: str
    step: Callable[[int], None]
    loss: Callable[[int, Amp], float]
    tokens: list[int]  # real (non-padding) tokens per batch
    padded: list[int]  # tokens the model computes per batch, padding included
    sequences: list[tuple[list[int], list[int]]] = field(default_factory=list)  # (prompt+chosen, prompt+rejected) ids


def import_trl() -> tuple[Any, Any]:
    """``(ORPOTrainer, DPODataCollatorWithPadding)`` from ``trl.experimental``, without its warning."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from trl.experimental.orpo import ORPOTrainer
            from trl.experimental.utils import DPODataCollatorWithPadding
    except ImportError:
        raise UserError("arm (a) needs TRL: pip install 'trl>=1.0' (the project's dev extra)") from None
    return ORPOTrainer, DPODataCollatorWithPadding


def trl_trainer(tokenizer: Any, beta: float, max_length: int) -> Any:
    """A bare ``ORPOTrainer`` with just the attributes its tokenizing and loss methods read.

    ``ORPOTrainer.__init__`` would build a whole HF Trainer (accelerator, datasets, callbacks) that
    plays no part in a step's cost; the methods called here are TRL's own, unchanged.
    """
    orpo_trainer, _ = import_trl()
    trainer = orpo_trainer.__new__(orpo_trainer)
    device = torch.device("cpu")
    trainer.processing_class = tokenizer
    trainer.is_encoder_decoder = False
    trainer.max_length = max_length
    trainer.max_completion_length = None
    trainer.padding_value = tokenizer.pad_token_id
    trainer.beta = beta
    trainer.aux_loss_enabled = False
    trainer.aux_loss_coef = 0.0
    trainer.accelerator = SimpleNamespace(device=device, gather_for_metrics=lambda x: x)
    trainer.args = SimpleNamespace(device=device)
    trainer._peft_has_been_casted_to_bf16 = False
    trainer._stored_metrics = defaultdict(lambda: defaultdict(list))  # what store_metrics appends to
    return trainer


def trl_arm(model: Any, tokenizer: Any, batches: list[list[PairText]], lambda_or: float, max_length: int, amp: Amp) -> Arm:
    _, collator_class = import_trl()
    trainer = trl_trainer(tokenizer, lambda_or, max_length)
    collator = collator_class(pad_token_id=tokenizer.pad_token_id, is_encoder_decoder=False)
    features = [[trainer.tokenize_row(p._asdict()) for p in batch] for batch in batches]

    def step(i: int) -> None:
        batch = collator(features[i])
        with amp():
            loss = trainer.compute_loss(model, batch)
        loss.backward()
        model.zero_grad(set_to_none=True)

    @torch.no_grad()
    def loss(i: int, precision: Amp) -> float:
        with precision():
            value, _ = trainer.get_batch_loss_metrics(model, collator(features[i]))
        return float(value)

    tokens = [sum(len(f["chosen_input_ids"]) + len(f["rejected_input_ids"]) for f in fs) for fs in features]
    padded = [2 * len(fs) * max(max(len(f["chosen_input_ids"]), len(f["rejected_input_ids"])) for f in fs)
              for fs in features]
    seqs = [(list(f["chosen_input_ids"]), list(f["rejected_input_ids"])) for fs in features for f in fs]
    return Arm(ARM_NAMES[0], step, loss, tokens, padded, seqs)


def tokenized_batches(tokenizer: Any, batches: list[list[PairText]], max_length: int) -> list[list[TokenizedPair]]:
    return [[tokenize_pair(tokenizer, p.prompt, p.chosen, p.rejected, max_length) for p in b] for b in batches]


def _orpo(sums: dict[str, torch.Tensor], lambda_or: float) -> Any:
    return orpo_loss_of(sums, lambda_or)


def plain_arm(
    model: Any, pairs: list[list[TokenizedPair]], pad_id: int, lambda_or: float, nll_on_prompt: bool, amp: Amp
) -> Arm:
    def forward(i: int, nll: bool) -> Any:
        out = _orpo(pair_logps(model, collate_plain(pairs[i], pad_id=pad_id, nll_on_prompt=nll)), lambda_or)
        out.metrics()  # what the training loop logs (one sync), as TRL's .item() calls
        return out

    def step(i: int) -> None:
        with amp():
            out = forward(i, nll_on_prompt)
        out.loss.backward()
        model.zero_grad(set_to_none=True)

    @torch.no_grad()
    def loss(i: int, precision: Amp) -> float:
        with precision():
            return float(forward(i, True).loss)

    tokens = [sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in b) for b in pairs]
    padded = [2 * len(b) * max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in b)
              for b in pairs]
    seqs = [(p.prompt_ids + p.chosen_ids, p.prompt_ids + p.rejected_ids) for b in pairs for p in b]
    return Arm(ARM_NAMES[1], step, loss, tokens, padded, seqs)


def packed_arm(model: Any, pairs: list[list[TokenizedPair]], pad_id: int, lambda_or: float, nll_on_prompt: bool, amp: Amp,
               k: int = PAIRS_PER_QUESTION) -> Arm:
    def forward(i: int, nll: bool) -> Any:
        groups = group_pairs(pairs[i], max_pairs=k)
        out = _orpo(pair_logps_packed(model, collate_packed(groups, pad_id=pad_id, nll_on_prompt=nll)), lambda_or)
        out.metrics()
        return out

    def step(i: int) -> None:
        with amp():
            out = forward(i, nll_on_prompt)
        out.loss.backward()
        model.zero_grad(set_to_none=True)

    @torch.no_grad()
    def loss(i: int, precision: Amp) -> float:
        with precision():
            return float(forward(i, True).loss)

    groups = [group_pairs(b, max_pairs=k) for b in pairs]
    tokens = [sum(g.packed_length() for g in gs) for gs in groups]
    padded = [len(gs) * max(g.packed_length() for g in gs) for gs in groups]
    return Arm(ARM_NAMES[2], step, loss, tokens, padded)


# ---- measuring ---------------------------------------------------------------------------------


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim") if name else None
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _malloc_trim()


def trim_heap() -> None:
    """glibc's ``malloc_trim(0)``: hand freed heap pages back, so RSS before a step is live memory only."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


@functools.cache
def rss_reader() -> tuple[Callable[[], int] | None, str]:
    """``(read, source)``: a cheap resident-set-size reader in bytes, and what it reads."""
    if Path("/proc/self/statm").is_file():
        page = os.sysconf("SC_PAGE_SIZE")
        fd = os.open("/proc/self/statm", os.O_RDONLY)
        return (lambda: int(os.pread(fd, 256, 0).split()[1]) * page), "/proc/self/statm"
    try:
        import psutil
    except ImportError:
        return None, "unavailable"
    proc = psutil.Process()
    return (lambda: int(proc.memory_info().rss)), "psutil"


def settle() -> None:
    """Free what the last step left (cycles, glibc's cached pages) so every arm starts alike."""
    gc.collect()
    trim_heap()


def peak_rss_increase(run: Callable[[], None], read: Callable[[], int], interval: float = SAMPLE_INTERVAL_S) -> int:
    """Peak RSS during ``run()`` minus RSS just before it, sampled by a thread every ``interval`` s."""
    settle()
    base = read()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            value = read()
            if value > peak[0]:
                peak[0] = value
            time.sleep(interval)

    old = sys.getswitchinterval()
    sys.setswitchinterval(interval / 2)  # the sampler gets the GIL back promptly from Python code
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        run()
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(old)
    return max(peak[0], read()) - base


def step_matmul_dtype() -> torch.dtype:
    """The dtype of the step's matmuls on this CPU: bf16 under autocast where it has bf16 units, else fp32."""
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


def matmul_flops_per_s(n: int, calls: int, dtype: torch.dtype = torch.bfloat16) -> float:
    """``n x n @ n x n`` rate in ``dtype``: ``2 n^3`` over the median seconds of ``calls`` timed calls
    (one warm-up)."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.matmul(a, b)
    seconds = []
    for _ in range(calls):
        start = time.perf_counter()
        torch.matmul(a, b)
        seconds.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(seconds)


@dataclass
class Measurements:
    seconds: dict[str, list[float]] = field(default_factory=dict)  # per arm, one per round: all steps
    peaks: dict[str, list[int]] = field(default_factory=dict)  # per arm, one per round: bytes
    matmul: list[float] = field(default_factory=list)  # FLOP/s, one per round


def measure(
    arms: Sequence[Arm],
    steps: int,
    repeats: int,
    warmup: int,
    memory_batch: int,
    read_rss: Callable[[], int] | None,
    probe: Callable[[], float],
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
) -> Measurements:
    """Warm-up passes, then ``repeats`` rounds of: each arm in turn (its timed steps, then one sampled
    step on ``memory_batch``), then the matmul probe."""
    for arm in arms:
        for _ in range(warmup):
            for i in range(steps):
                arm.step(i)
    m = Measurements({a.name: [] for a in arms}, {a.name: [] for a in arms}, [])
    for r in range(repeats):
        for arm in arms:
            settle()
            start = time.perf_counter()
            for i in range(steps):
                arm.step(i)
            m.seconds[arm.name].append(time.perf_counter() - start)
            if read_rss is not None:
                m.peaks[arm.name].append(peak_rss_increase(lambda: arm.step(memory_batch), read_rss))
            log(f"  round {r + 1}: {arm.name}: {steps} steps in {m.seconds[arm.name][-1]:.2f} s")
        m.matmul.append(probe())
    return m


# ---- summary -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    arm: str
    pairs_per_step: int
    tokens_per_step: float  # mean real tokens
    padded_per_step: float  # mean tokens computed, padding included
    pairs_per_s: float  # median over rounds
    low: float
    high: float
    tokens_per_s: float  # median over rounds, real tokens
    peak_bytes: float | None  # median over rounds
    speedup: float = 1.0  # pairs/s over arm (a)
    memory_ratio: float | None = None  # peak over arm (a)


def summarise(arms: Sequence[Arm], m: Measurements, pairs_per_step: int) -> list[Row]:
    rows = []
    for arm in arms:
        secs = m.seconds[arm.name]
        steps = len(arm.tokens)
        rates = [steps * pairs_per_step / s for s in secs]
        peaks = m.peaks.get(arm.name) or []
        rows.append(Row(
            arm=arm.name,
            pairs_per_step=pairs_per_step,
            tokens_per_step=sum(arm.tokens) / steps,
            padded_per_step=sum(arm.padded) / steps,
            pairs_per_s=statistics.median(rates),
            low=min(rates),
            high=max(rates),
            tokens_per_s=statistics.median(sum(arm.tokens) / s for s in secs),
            peak_bytes=statistics.median(peaks) if peaks else None,
        ))
    base = rows[0]
    out = []
    for r in rows:
        mem = r.peak_bytes / base.peak_bytes if r.peak_bytes is not None and base.peak_bytes else None
        out.append(Row(**{**r.__dict__, "speedup": r.pairs_per_s / base.pairs_per_s, "memory_ratio": mem}))
    return out


def check_losses(losses: dict[str, float], rel_tol: float) -> tuple[bool, float]:
    """``(ok, worst relative difference)`` of every arm's loss against the first arm's."""
    values = list(losses.values())
    ref = values[0]
    worst = max(abs(v - ref) / max(1.0, abs(ref)) for v in values)
    return worst <= rel_tol and all(v == v for v in values), worst


def mfu(parameters: int, tokens_per_s: float, matmul_rate: float) -> float:
    """Model FLOPs utilisation: ``6 N`` FLOPs per trained token against the measured matmul rate."""
    return 6 * parameters * tokens_per_s / matmul_rate


# ---- output ------------------------------------------------------------------------------------

HEADERS = ["arm", "pairs/step", "tokens/step", "computed/step", "pairs/s", "min-max pairs/s", "vs (a)",
           "peak MB", "memory vs (a)"]


def cells(row: Row) -> list[str]:
    return [
        row.arm,
        str(row.pairs_per_step),
        f"{row.tokens_per_step:.0f}",
        f"{row.padded_per_step:.0f}",
        f"{row.pairs_per_s:.2f}",
        f"{row.low:.2f}-{row.high:.2f}",
        f"{row.speedup:.2f}x",
        "-" if row.peak_bytes is None else f"{row.peak_bytes / 2**20:.0f}",
        "-" if row.memory_ratio is None else f"{row.memory_ratio:.2f}x",
    ]


def render(rows: list[Row], header: list[str], footer: list[str], markdown: bool) -> str:
    table = [HEADERS] + [cells(r) for r in rows]
    if markdown:
        out = [f"- {line}" for line in header] + ["", "| " + " | ".join(HEADERS) + " |"]
        out.append("|" + "|".join("---" if h == "arm" else "---:" for h in HEADERS) + "|")
        out += ["| " + " | ".join(c) + " |" for c in table[1:]]
        return "\n".join(out + [""] + [f"- {line}" for line in footer])
    widths = [max(len(r[i]) for r in table) for i in range(len(HEADERS))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in table]
    return "\n".join(header + ["", "ORPO training step"] + lines + [""] + footer)


def loss_check(arms: Sequence[Arm], label: str, precision: Amp, tol: float) -> tuple[bool, str]:
    """Every arm's loss of batch 0 under ``precision`` (TRL's objective), compared; ``(ok, report line)``."""
    losses = {a.name: a.loss(0, precision) for a in arms}
    ok, worst = check_losses(losses, tol)
    values = ", ".join(f"{name.split()[0]} {v:.5f}" for name, v in losses.items())
    return ok, (f"loss check ({label}, batch 0, TRL's objective): {values}; worst relative difference "
                f"{worst:.1e} (tolerance {tol:.0e}): {'PASS' if ok else 'FAIL'}")


def header_lines(
    argv: Sequence[str], args: argparse.Namespace, arms: Sequence[Arm], pairs: list[list[TokenizedPair]],
    n_params: int, grad_mb: float, lambda_or: float, rss_source: str,
) -> list[str]:
    """What was measured, on what, and how: the lines above the table."""
    prompt_len = statistics.mean(len(p.prompt_ids) for b in pairs for p in b)
    resp_len = statistics.mean(len(r) for b in pairs for p in b for r in (p.chosen_ids, p.rejected_ids))
    same_ids = sum(x == y for x, y in zip(arms[0].sequences, arms[1].sequences))
    nll = ("prompt + response in every arm (TRL's objective)" if not args.response_only_nll
           else "prompt + response in (a), response only in (b) and (c)")
    return [
        "command: `" + shlex.join(["python", "bench/train_step.py", *argv]) + "`",
        *machine_lines(),
        f"model: {args.model} ({n_params / 1e6:.1f}M parameters, fp32 weights, full fine-tuning)",
        f"pairs: the demo's synthetic mcq questions (demo.yaml dataset), chat-template prompt, K={PAIRS_PER_QUESTION} "
        "pairs per question; chosen = correct scripted-teacher traces, rejected = wrong teacher traces (a stand-in "
        f"for the demo's student negatives, similar length); mean prompt {prompt_len:.0f} tokens, mean response "
        f"{resp_len:.0f} tokens; TRL's tokenize_row and our tokenize_pair give identical ids for {same_ids} of "
        f"{len(arms[1].sequences)} pairs",
        f"step: {args.batch_size} pairs ({plural(args.batch_size // PAIRS_PER_QUESTION, 'question')}): collate, "
        f"forward + loss ({'bf16 autocast' if cpu_supports_bf16() else 'fp32: no bf16 units here'}, loss fp32), "
        f"backward, zero_grad; no optimizer; lambda {lambda_or}; NLL over {nll}",
        f"timing: median of {plural(args.repeats, 'round')} of {plural(args.steps, 'step')} after "
        f"{plural(args.warmup, 'warm-up pass', 'warm-up passes')}, arms alternating a, b, c in each round",
        f"peak memory: RSS increase over the step ({rss_source} sampled every {SAMPLE_INTERVAL_S * 1e3:.0f} ms by a "
        "thread, after gc + malloc_trim), one step per round on the largest batch, median; includes "
        f"{grad_mb:.0f} MB of fp32 gradients that every arm has",
    ]


def footer_lines(rows: list[Row], n_params: int, matmul_rate: float, matmul_size: int,
                 matmul_dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """The targets and the MFU of (c): the lines below the table."""
    c = rows[2]
    lines = [f"target (c) >= {TARGET_SPEEDUP}x (a) in pairs/s: {c.speedup:.2f}x, "
             f"{'met' if c.speedup >= TARGET_SPEEDUP else 'NOT met'}"]
    if c.memory_ratio is not None:
        lines.append(f"target (c) peak memory <= (a): {c.memory_ratio:.2f}x, "
                     f"{'met' if c.memory_ratio <= 1.0 else 'NOT met'}")
    n = matmul_size
    lines.append(
        f"MFU of (c): 6 x {n_params / 1e6:.1f}M params x {c.tokens_per_s:.0f} trained tokens/s = "
        f"{6 * n_params * c.tokens_per_s / 1e9:.1f} GFLOP/s over the {str(matmul_dtype).removeprefix('torch.')} "
        f"matmul rate {matmul_rate / 1e9:.1f} GFLOP/s "
        f"({n}x{n} @ {n}x{n}, median) = {mfu(n_params, c.tokens_per_s, matmul_rate):.1%}"
    )
    return lines


# ---- command -----------------------------------------------------------------------------------


def plural(n: int, word: str, words: str | None = None) -> str:
    return f"{n} {word if n == 1 else words or word + 's'}"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/train_step.py",
        description="ORPO step speed and peak memory: TRL's ORPOTrainer vs our plain and packed layouts.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model name or folder (default {DEFAULT_MODEL})")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help=f"pairs per optimizer step, a multiple of K={PAIRS_PER_QUESTION} (default 8, the demo's)")
    p.add_argument("--repeats", type=positive_int, default=None, help="timed rounds; medians reported (default 5)")
    p.add_argument("--steps", type=positive_int, default=None, help="distinct batches (steps) per round (default 3)")
    p.add_argument("--warmup", type=positive_int, default=None,
                   help="untimed passes over the batches first (default 1)")
    p.add_argument("--matmul-size", type=positive_int, default=None, help="n of the bf16 matmul probe (default 2048)")
    p.add_argument("--matmul-calls", type=positive_int, default=None, help="timed matmuls per round (default 5)")
    p.add_argument("--response-only-nll", action="store_true",
                   help="time (b) and (c) with the NLL over responses only (the project default) instead of "
                        "TRL's prompt+response NLL; the loss check always uses TRL's")
    p.add_argument("--threads", type=positive_int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 1 round of 1 step of 4 pairs, small matmul; numbers mean nothing")
    p.add_argument("--markdown", action="store_true", help="print a markdown block for docs/benchmarks.md")
    args = p.parse_args(list(argv))
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.batch_size % PAIRS_PER_QUESTION:
        p.error(f"--batch-size must be a multiple of K={PAIRS_PER_QUESTION} (whole questions per step), "
                f"got {args.batch_size}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = demo_config()
    lambda_or, max_length = cfg.train.lambda_or, cfg.train.max_length
    nll_on_prompt = not args.response_only_nll
    try:
        tokenizer = load_tokenizer(args.model)
        model = load_model(args.model, dtype="float32", device="cpu")
        questions = build_questions(tokenizer, args.steps * args.batch_size // PAIRS_PER_QUESTION, cfg)
        batches = make_batches(questions, args.batch_size, args.steps)
        device = torch.device("cpu")
        amp: Amp = lambda: autocast(device)  # noqa: E731  bf16 where the CPU has bf16 units
        fp32: Amp = lambda: autocast(device, enabled=False)  # noqa: E731
        pairs = tokenized_batches(tokenizer, batches, max_length)
        arms = [
            trl_arm(model, tokenizer, batches, lambda_or, max_length, amp),
            plain_arm(model, pairs, tokenizer.pad_token_id, lambda_or, nll_on_prompt, amp),
            packed_arm(model, pairs, tokenizer.pad_token_id, lambda_or, nll_on_prompt, amp),
        ]
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model.train()
    checks = [loss_check(arms, label, precision, tol) for label, precision, tol in
              (("fp32", fp32, FP32_TOL), ("bf16 autocast", amp, BF16_TOL))]

    read_rss, rss_source = rss_reader()
    memory_batch = max(range(args.steps), key=lambda i: arms[0].padded[i])
    print(f"{len(arms)} arms, {plural(args.repeats, 'round')} of {plural(args.steps, 'step')} of "
          f"{args.batch_size} pairs ...", file=sys.stderr, flush=True)
    m = measure(arms, args.steps, args.repeats, args.warmup, memory_batch, read_rss,
                lambda: matmul_flops_per_s(args.matmul_size, args.matmul_calls, step_matmul_dtype()))
    rows = summarise(arms, m, args.batch_size)
    n_params = sum(p.numel() for p in model.parameters())
    grad_mb = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) / 2**20
    header = header_lines(argv, args, arms, pairs, n_params, grad_mb, lambda_or, rss_source)
    footer = [line for _, line in checks] + footer_lines(rows, n_params, statistics.median(m.matmul), args.matmul_size,
                                                         step_matmul_dtype())
    print(render(rows, header, footer, args.markdown))
    return 0 if all(ok for ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
