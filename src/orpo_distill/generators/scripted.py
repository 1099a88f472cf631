"""The scripted teacher: a program that writes step-by-step traces for the synthetic task.

Why it exists: the pipeline needs a teacher that runs offline, instantly and deterministically, yet
behaves like a sampled LLM in the ways ORPO-Distill depends on: its K traces for one question differ
in form (so "diverse positives" means something), and a share of them are wrong for a real reason (a
slip carried through to a wrong option), so teacher negatives exist and the verifier has work to do.

It reads the solution program the synthetic loader puts in ``record.meta`` (see
``datasets/synthetic.py``). Each sample picks a style by rotating from a seeded offset, so the first
six samples of a question are six different layouts, and with probability ``error_rate`` makes one
mistake (a flipped operation, a skipped step, a misread amount or an arithmetic slip), preferring a
mistake whose result is one of the listed wrong options, as a solver's would be.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from ..errors import UserError
from ..records import Record
from .base import GenerationStats, Request, Sample

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
SYM = {"add": "+", "sub": "-"}


@dataclass(frozen=True)
class Step:
    """One step as a trace states it; ``after`` may be wrong (an arithmetic slip)."""

    op: str
    amount: int
    phrase: str  # the clause without its actor: "buys 7 more", "Tom puts in 7 more"
    clause: str  # with the actor, mid-sentence form: "she buys 7 more"
    before: int
    after: int

    @property
    def equation(self) -> str:
        return f"{self.before} {SYM[self.op]} {self.amount} = {self.after}"


@dataclass(frozen=True)
class Ending:
    """How a trace names its final value: the option it picks (mcq) and the canonical last line."""

    value: int
    opt: str  # ", which is option (B)" (mcq) or "" (numeric)
    line: str  # "The answer is (B)." / "The answer is 14."


# ---------------------------------------------------------------------------------------------
# solution paths


def _apply(value: int, op: str, amount: int) -> int:
    return value + amount if op == "add" else value - amount


def _clause(meta: dict[str, Any], phrase: str) -> str:
    return f"{meta['actor']} {phrase}" if meta["actor"] else phrase


def walk(meta: dict[str, Any], steps: Iterable[tuple[str, int, str]], slip: tuple[int, int] | None = None) -> list[Step]:
    """Run ``steps`` from the start value; ``slip=(j, d)`` adds ``d`` to step ``j``'s result, and the
    wrong total is carried into every later step."""
    value, out = meta["start"], []
    for j, (op, amount, phrase) in enumerate(steps):
        after = _apply(value, op, amount) + (slip[1] if slip and slip[0] == j else 0)
        out.append(Step(op, amount, phrase, _clause(meta, phrase), value, after))
        value = after
    return out


def correct_path(meta: dict[str, Any]) -> list[Step]:
    return walk(meta, [tuple(s) for s in meta["steps"]])


def mistaken_paths(meta: dict[str, Any]) -> list[tuple[str, list[Step]]]:
    """Every one-mistake path whose totals stay non-negative and whose result is wrong, by kind."""
    steps = [tuple(s) for s in meta["steps"]]
    out: list[tuple[str, list[Step]]] = []
    for j, (op, amount, phrase) in enumerate(steps):
        flipped = steps[:j] + [("sub" if op == "add" else "add", amount, phrase)] + steps[j + 1 :]
        out.append(("wrong operation", walk(meta, flipped)))
        if len(steps) > 1:
            out.append(("skipped step", walk(meta, steps[:j] + steps[j + 1 :])))
        for d in (-2, -1, 1, 2):
            if amount + d >= 1:
                misread = (op, amount + d, re.sub(rf"\b{amount}\b", str(amount + d), phrase, count=1))
                out.append(("misread amount", walk(meta, steps[:j] + [misread] + steps[j + 1 :])))
        for d in (-3, -2, -1, 1, 2, 3):
            out.append(("arithmetic slip", walk(meta, steps, slip=(j, d))))
    ok = []
    for kind, path in out:
        totals = [meta["start"]] + [s.after for s in path]
        if min(totals) >= 0 and totals[-1] != meta["correct"]:
            ok.append((kind, path))
    return ok


# ---------------------------------------------------------------------------------------------
# styles: each writes the body of a trace from a path; the canonical answer line is appended after


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def style_sentences(meta: dict[str, Any], path: list[Step], end: Ending, rng: random.Random) -> str:
    so = rng.choice(["so", "which gives", "making it"])
    parts = [f"{_cap(meta['holder'])} starts with {meta['start']} {meta['unit']}."]
    for i, s in enumerate(path):
        lead = _cap(s.clause) if i == 0 else f"Then {s.clause}"
        parts.append(f"{lead}, {so} {s.equation}.")
    parts.append(f"{_cap(meta['holder'])} has {end.value} {meta['unit']}{end.opt}.")
    return " ".join(parts)


def style_equations(meta: dict[str, Any], path: list[Step], end: Ending, rng: random.Random) -> str:
    head = rng.choice([f"Start: {meta['start']}.", f"Begin with {meta['start']} {meta['unit']}."])
    return "\n".join([head] + [s.equation for s in path] + [f"Result: {end.value}{end.opt}."])


def style_bullets(meta: dict[str, Any], path: list[Step], end: Ending, rng: random.Random) -> str:
    head = rng.choice(["Running total:", "Track the total:"])
    lines = [head, f"- start: {meta['start']}"] + [f"- {s.phrase}: {s.equation}" for s in path]
    return "\n".join(lines + [f"Total: {end.value}{end.opt}."])


def style_let_x(meta: dict[str, Any], path: list[Step], end: Ending, rng: random.Random) -> str:
    var = rng.choice(["x", "n"])
    parts = [f"Let {var} count the {meta['count_phrase']}. At first {var} = {meta['start']}."]
    parts += [f"{_cap(s.clause)}: {var} = {s.equation}." for s in path]
    parts.append(f"So {var} = {end.value}{end.opt}.")
    return " ".join(parts)


def style_restate(meta: dict[str, Any], path: list[Step], end: Ending, rng: random.Random) -> str:
    story = ", then ".join(s.phrase for s in path)
    story = f"{meta['actor']} {story}" if meta["actor"] else story
    intro = rng.choice(["We know", "The problem says"])
    work = ", and ".join(s.equation for s in path)
    return (
        f"{intro} {meta['holder']} has {meta['start']} {meta['unit']}; {story}.\n"
        f"Working it out: {work}.\nThat leaves {end.value}{end.opt}."
    )


def style_numbered(meta: dict[str, Any], path: list[Step], end: Ending, rng: random.Random) -> str:
    lines = [f"Step {i}: {_cap(s.clause)}. {s.equation}." for i, s in enumerate(path, 1)]
    verb = rng.choice(["ends with", "is left with"])
    return "\n".join(lines + [f"So {meta['holder']} {verb} {end.value} {meta['unit']}{end.opt}."])


STYLES: dict[str, Callable[[dict[str, Any], list[Step], Ending, random.Random], str]] = {
    "sentences": style_sentences,
    "equations": style_equations,
    "bullets": style_bullets,
    "let_x": style_let_x,
    "restate": style_restate,
    "numbered": style_numbered,
}
STYLE_NAMES = tuple(STYLES)


# ---------------------------------------------------------------------------------------------
# one trace


def ending(record: Record, value: int, task_kind: str) -> Ending:
    """How a trace maps its final value to an option. A wrong value that is not listed takes the
    nearest wrong option, so a wrong trace never states the right letter.

    The lookup is written out ("The options are (A) 14, (B) 21, ...; 21 is (B).") rather than
    stated in passing: a small student can copy a list and match a number in it, but cannot learn
    to recall a letter from a list it does not look at (measured: without the lookup line the
    distilled SmolLM2-135M computed the right value 80% of the time and still answered (A) always).
    """
    if task_kind != "mcq":
        return Ending(value, "", f"The answer is {value}.")
    assert record.choices is not None
    values = [int(c) for c in record.choices]
    listed = ", ".join(f"({LETTERS[k]}) {v}" for k, v in enumerate(values))
    if value in values:
        i = values.index(value)
        match = f"{value} is ({LETTERS[i]})"
    else:
        wrong = [i for i in range(len(values)) if LETTERS[i] != record.answer]
        i = min(wrong, key=lambda k: (abs(values[k] - value), k))
        match = f"{value} is not listed; the closest is ({LETTERS[i]})"
    return Ending(value, "", f"The options are {listed}; {match}.\nThe answer is ({LETTERS[i]}).")


def write_trace(record: Record, style: str, wrong: bool, rng: random.Random, task_kind: str = "mcq") -> tuple[str, str | None]:
    """``(text, mistake kind or None)``: a trace in ``style``, with one mistake when ``wrong``."""
    meta, kind = record.meta, None
    path = correct_path(meta)
    if wrong:
        candidates = mistaken_paths(meta)
        if task_kind == "mcq":
            listed = set(meta["distractors"]) & {int(c) for c in record.choices or ()}
            on_option = [c for c in candidates if c[1][-1].after in listed]
            candidates = on_option or candidates
        kind, path = rng.choice(candidates)
    end = ending(record, path[-1].after, task_kind)
    return STYLES[style](meta, path, end, rng) + "\n" + end.line, kind


def is_synthetic(record: Record) -> bool:
    return record.meta.get("task") == "synthetic" and "steps" in record.meta and "start" in record.meta


# ---------------------------------------------------------------------------------------------
# the generator


class ScriptedTeacher:
    """Generator over synthetic records: ``Request.key`` is the record id.

    Deterministic: sample ``i`` of a request depends only on (``seed``, ``request.seed``, key, ``i``).
    """

    name = "scripted"

    def __init__(
        self,
        records: dict[str, Record] | list[Record],
        error_rate: float = 0.25,
        seed: int = 0,
        task_kind: str = "mcq",
    ):
        if not 0.0 <= error_rate <= 1.0:
            raise UserError(f"teacher.error_rate must be between 0 and 1, got {error_rate}")
        self.records = dict(records) if isinstance(records, dict) else {r.id: r for r in records}
        for rid, r in self.records.items():
            if not is_synthetic(r):
                raise UserError(
                    f"the scripted teacher only serves the synthetic task (dataset.kind: synthetic); record "
                    f"'{rid}' has no synthetic solution program. Use an hf, openai, vllm or replay teacher."
                )
            if task_kind == "mcq" and r.choices is None:
                raise UserError(f"scripted teacher: record '{rid}' has no choices but task.kind is mcq")
        self.error_rate = error_rate
        self.seed = seed
        self.task_kind = task_kind
        self.stats = GenerationStats()

    def plan(self, key: str, request_seed: int | None, index: int) -> tuple[str, bool, random.Random]:
        """The style of sample ``index``, whether it is wrong, and the rng for its wording.

        Everything depends on ``request_seed + index`` only. The sampling stage gives a request that
        resumes at sample ``s`` the seed ``base + s``, so sample ``s`` of a question is the same text
        whether it was made in one request or after a kill in a later one.
        """
        slot = (request_seed or 0) + index
        offset = random.Random(f"scripted-style|{self.seed}|{key}").randrange(len(STYLE_NAMES))
        rng = random.Random(f"scripted|{self.seed}|{key}|{slot}")
        return STYLE_NAMES[(offset + slot) % len(STYLE_NAMES)], rng.random() < self.error_rate, rng

    def sample(self, key: str, request_seed: int | None, index: int) -> tuple[Sample, str | None]:
        record = self.records.get(key)
        if record is None:
            raise UserError(
                f"the scripted teacher only serves the synthetic task (dataset.kind: synthetic); it has no "
                f"synthetic record '{key}'"
            )
        style, wrong, rng = self.plan(key, request_seed, index)
        text, kind = write_trace(record, style, wrong, rng, self.task_kind)
        return Sample(text=text, num_tokens=count_tokens(text), finish_reason="stop"), kind

    def generate(self, requests: Sequence[Request]) -> list[list[Sample]]:
        start = time.perf_counter()
        out = []
        for req in requests:
            samples = []
            for i in range(req.n):
                sample, kind = self.sample(req.key, req.seed, i)
                samples.append(sample)
                self.stats.completion_tokens += sample.num_tokens
                if kind:
                    self.stats.extra["wrong_traces"] = self.stats.extra.get("wrong_traces", 0) + 1
            self.stats.requests += 1
            self.stats.samples += len(samples)
            out.append(samples)
        self.stats.seconds += time.perf_counter() - start
        return out


def count_tokens(text: str) -> int:
    """A tokenizer-free estimate (words, numbers and punctuation marks), for the stats only."""
    return len(re.findall(r"\w+|[^\w\s]", text))
