"""The built-in offline task: short multi-step arithmetic word problems, posed as multiple choice.

Why it exists: the whole pipeline (teacher, student negatives, ORPO, mixed policy, eval) must run and be
tested on a CPU with no network and no dataset download. The problems are small enough that the
embedded 135M student can learn them, and each record carries its solution program in ``meta`` so the
scripted teacher (``generators/scripted.py``) can write right and wrong step-by-step traces.

``meta`` of every record (JSON-serialisable):

- ``task``: ``"synthetic"``; ``frame``: ``person``, ``container`` or ``shop``
- ``holder``: who or what holds the things (``"Mia"``, ``"the jar"``); ``unit``: ``"marbles"``
- ``actor``: the lower-case subject the step clauses take (``"she"``, ``"it"``, or ``""`` when each
  clause names its own actor, as in ``"Tom puts in 3 more"``)
- ``count_phrase``: ``"marbles Mia has"``, for "Let x count the ..." sentences
- ``start``: the starting quantity; ``steps``: ``[[op, amount, phrase], ...]`` with op ``"add"`` or ``"sub"``
  and ``phrase`` the clause as the question words it (it holds the amount once, as digits)
- ``values``: the running totals, ``values[0] == start`` and ``values[-1] == correct``
- ``correct``: the right number; ``distractors``: the wrong numbers among the choices
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..config import DatasetConfig, SyntheticConfig
from ..errors import UserError
from ..records import Record

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# Eval records come from a separate index range, so train and eval never share an id, and growing
# train_size never reaches into the eval range.
EVAL_OFFSET = 500_000
DEFAULT_TRAIN_SIZE = 200
DEFAULT_EVAL_SIZE = 100

NAMES = [
    ("Mia", "she"), ("Tom", "he"), ("Ana", "she"), ("Leo", "he"), ("Sara", "she"), ("Ben", "he"),
    ("Nora", "she"), ("Omar", "he"), ("Lily", "she"), ("Sam", "he"), ("Emma", "she"), ("Jack", "he"),
    ("Zoe", "she"), ("Raj", "he"), ("Ivy", "she"), ("Max", "he"),
]
PERSON_UNITS = ["marbles", "stickers", "apples", "pencils", "cards", "coins", "shells", "stamps", "books", "cookies"]
PERSON_ADD = ["buys {n} more", "finds {n} more", "gets {n} more from {other}", "wins {n} more"]
PERSON_SUB = ["gives {n} to {other}", "loses {n}", "sells {n}", "gives away {n}"]

CONTAINERS = [("jar", "cookies"), ("basket", "apples"), ("box", "crayons"), ("bag", "marbles"), ("bowl", "grapes")]
CONTAINER_ADD = ["{other} puts in {n} more", "{other} adds {n} more"]
CONTAINER_SUB = ["{other} takes out {n}", "{other} removes {n}"]

# (place, unit, add phrases, sub phrases)
SHOPS = [
    ("bakery", "cakes", ["bakes {n} more"], ["sells {n}"]),
    ("library", "books", ["buys {n} more", "gets {n} back"], ["lends out {n}"]),
    ("farm", "eggs", ["collects {n} more"], ["sells {n}", "uses {n}"]),
    ("shop", "hats", ["orders {n} more"], ["sells {n}"]),
]


@dataclass(frozen=True)
class Problem:
    """One word problem and its solution program, before it is posed as a record."""

    question: str
    start: int
    steps: tuple[tuple[str, int, str], ...]
    values: tuple[int, ...]
    frame: str
    holder: str
    unit: str
    actor: str
    count_phrase: str

    @property
    def correct(self) -> int:
        return self.values[-1]


def apply_op(value: int, op: str, amount: int) -> int:
    return value + amount if op == "add" else value - amount


def run_program(start: int, steps: list[tuple[str, int]]) -> list[int]:
    """Running totals of a program: ``[start, after step 1, ...]``."""
    values = [start]
    for op, amount in steps:
        values.append(apply_op(values[-1], op, amount))
    return values


def _ops(rng: random.Random, start: int, n_steps: int, max_value: int) -> list[tuple[str, int]]:
    """Random add/sub steps that keep every running total at 1 or more (no negative counts)."""
    cap_amount = max(2, max_value // 2)
    value, ops = start, []
    for _ in range(n_steps):
        if value >= 2 and rng.random() < 0.5:
            amount = rng.randint(1, min(cap_amount, value - 1))
            ops.append(("sub", amount))
        else:
            amount = rng.randint(1, cap_amount)
            ops.append(("add", amount))
        value = apply_op(value, *ops[-1])
    return ops


def make_problem(rng: random.Random, cfg: SyntheticConfig) -> Problem:
    """Draw one problem: a frame (person, container, shop), names, objects and a program."""
    start = rng.randint(2, max(2, cfg.max_value))
    ops = _ops(rng, start, cfg.steps, cfg.max_value)
    frame = rng.choice(["person", "person", "container", "shop"])
    if frame == "person":
        name, pronoun = rng.choice(NAMES)
        others = [n for n, _ in NAMES if n != name]
        unit = rng.choice(PERSON_UNITS)
        holder, actor, count_phrase = name, pronoun, f"{unit} {name} has"
        add_t, sub_t = PERSON_ADD, PERSON_SUB
        intro = f"{name} has {start} {unit}."
        ask = f"How many {unit} does {name} have now?"
    elif frame == "container":
        container, unit = rng.choice(CONTAINERS)
        others = [n for n, _ in NAMES]
        holder, actor, count_phrase = f"the {container}", "", f"{unit} in the {container}"
        add_t, sub_t = CONTAINER_ADD, CONTAINER_SUB
        intro = f"A {container} holds {start} {unit}."
        ask = f"How many {unit} are in the {container} now?"
    else:
        place, unit, add_t, sub_t = rng.choice(SHOPS)
        others = [n for n, _ in NAMES]
        holder, actor, count_phrase = f"the {place}", "it", f"{unit} the {place} has"
        intro = f"A {place} has {start} {unit}."
        ask = f"How many {unit} does the {place} have now?"
    steps = tuple(
        (op, amount, rng.choice(add_t if op == "add" else sub_t).format(n=amount, other=rng.choice(others)))
        for op, amount in ops
    )
    clauses = ", then ".join(phrase for _, _, phrase in steps)
    body = f"{actor} {clauses}" if actor else clauses
    question = f"{intro} {body[0].upper()}{body[1:]}. {ask}"
    return Problem(
        question=question,
        start=start,
        steps=steps,
        values=tuple(run_program(start, [(op, a) for op, a, _ in steps])),
        frame=frame,
        holder=holder,
        unit=unit,
        actor=actor,
        count_phrase=count_phrase,
    )


def mistaken_finals(start: int, steps: list[tuple[str, int]]) -> list[int]:
    """Finals a solver reaches by a plausible slip: one operation flipped, or one step skipped.

    Only slips whose running totals stay non-negative count, since a count below zero would be an
    obviously wrong option.
    """
    finals = []
    for j in range(len(steps)):
        flipped = list(steps)
        flipped[j] = ("sub" if steps[j][0] == "add" else "add", steps[j][1])
        for variant in (flipped, steps[:j] + steps[j + 1 :]):
            if variant:
                vals = run_program(start, variant)
                if min(vals) >= 0:
                    finals.append(vals[-1])
    return finals


def make_distractors(rng: random.Random, start: int, steps: list[tuple[str, int]], k: int) -> list[int]:
    """``k`` distinct, non-negative wrong values: step slips mixed with near values (±1, ±2), then ±3...

    Every distractor is one a solver could reach by one mistake (a flipped operation, a skipped step,
    or an arithmetic slip of a few units), which is also what lets the scripted teacher's wrong traces
    land on a listed option.
    """
    correct = run_program(start, steps)[-1]
    pool = set(mistaken_finals(start, steps)) | {correct + d for d in (-2, -1, 1, 2)}
    pool = sorted(v for v in pool if v >= 0 and v != correct)
    rng.shuffle(pool)
    chosen = pool[:k]
    d = 3
    while len(chosen) < k:
        for v in (correct + d, correct - d):
            if len(chosen) < k and v >= 0 and v not in chosen:
                chosen.append(v)
        d += 1
    return chosen


def make_record(cfg: DatasetConfig, index: int, task_kind: str = "mcq") -> Record:
    """Record number ``index`` of the task: depends only on the seed, the synthetic config and the index."""
    s = cfg.synthetic
    rng = random.Random(f"orpo-distill-synthetic|{cfg.seed}|{s.steps}|{s.max_value}|{s.num_choices}|{index}")
    p = make_problem(rng, s)
    ops = [(op, a) for op, a, _ in p.steps]
    distractors = make_distractors(rng, p.start, ops, s.num_choices - 1)
    meta = {
        "task": "synthetic",
        "frame": p.frame,
        "holder": p.holder,
        "unit": p.unit,
        "actor": p.actor,
        "count_phrase": p.count_phrase,
        "start": p.start,
        "steps": [list(step) for step in p.steps],
        "values": list(p.values),
        "correct": p.correct,
        "distractors": distractors,
    }
    rid = f"syn-{index:06d}"
    if task_kind != "mcq":
        return Record(id=rid, question=p.question, answer=str(p.correct), choices=None, meta=meta)
    position = rng.randrange(s.num_choices)
    values = distractors[:position] + [p.correct] + distractors[position:]
    return Record(
        id=rid, question=p.question, answer=LETTERS[position], choices=tuple(str(v) for v in values), meta=meta
    )


def load_synthetic(cfg: DatasetConfig, task_kind: str = "mcq") -> tuple[list[Record], list[Record]]:
    """Train records from indices ``0..train_size-1``, eval from ``EVAL_OFFSET`` on.

    With ``task_kind`` ``mcq`` the answer is the correct letter and the choices are numbers as strings;
    with ``numeric`` or ``exact`` the answer is the number itself and there are no choices.
    """
    if task_kind == "yesno":
        raise UserError("dataset.kind 'synthetic' has numeric answers; use task.kind mcq or numeric, not yesno")
    n_train = cfg.train_size if cfg.train_size is not None else DEFAULT_TRAIN_SIZE
    n_eval = cfg.eval_size if cfg.eval_size is not None else DEFAULT_EVAL_SIZE
    if n_train > EVAL_OFFSET:
        raise UserError(f"dataset.train_size: the synthetic task offers at most {EVAL_OFFSET} training questions")
    train = [make_record(cfg, i, task_kind) for i in range(n_train)]
    eval_ = [make_record(cfg, EVAL_OFFSET + i, task_kind) for i in range(n_eval)]
    return train, eval_
