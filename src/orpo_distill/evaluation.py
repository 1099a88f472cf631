"""Evaluation: greedy accuracy on held-out questions through the same task code as training.

Also reported: parse failures, mean response length in tokens, a 95% interval for the accuracy
(Wilson score), and optionally self-consistency@k (majority vote over k sampled answers).

Accuracy alone can hide a student that gives one answer to everything: on a 4-option task, "(D)" for
every question scores the share of D in the gold (measured: 26.5% with the right value computed for 94
of 200 questions). So each evaluation also records what it predicted against the gold
(:func:`answer_distribution`), flags one answer taking most predictions (:func:`answer_collapse`),
and, for multiple choice, whether the working computes the gold option at all
(:func:`option_text_agreement`): "right working, wrong letter" is a different fault from "wrong
working", and the letter accuracy does not tell them apart.
The paired comparison of two evaluations of the same questions (before and after training) uses a
bootstrap over questions, which is the noise that matters for "did training help".
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass, fields
from fractions import Fraction
from typing import Any, Mapping, Sequence

from .generators.base import Generator, Request
from .records import Record
from .tasks.base import extract_answer
from .tasks.extract import LETTERS, last_number, answer_spans, normalize_exact, parse_number


@dataclass
class EvalSummary:
    n: int
    correct: int
    accuracy: float
    ci95: tuple[float, float]
    parse_failures: int
    parse_failure_rate: float
    mean_length: float
    failed_requests: int = 0
    self_consistency_k: int = 0
    self_consistency_accuracy: float | None = None
    # what was predicted (all default, so summary.json files written before these fields still load)
    predicted_answers: dict[str, int] | None = None  # answer -> count; "unparsed", "other" buckets
    gold_answers: dict[str, int] | None = None  # the gold over the same answers ("other" bucket too)
    collapsed_answer: str | None = None  # the answer taking most predictions, see answer_collapse
    warning: str | None = None  # the sentence to show the user when collapsed_answer is set
    option_text_match: float | None = None  # mcq: share whose working computes the gold option
    letter_text_agreement: float | None = None  # mcq: share whose letter is the option it computed

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EvalSummary":
        names = {f.name for f in fields(cls)}
        kept = {k: v for k, v in d.items() if k in names}
        kept["ci95"] = tuple(kept["ci95"])
        return cls(**kept)


def base_splits(cfg: Any) -> list[str]:
    """The splits the base model (epoch 0) is evaluated on when ``eval.before_training``: the held-out one,
    and dev when there is a dev split and per-epoch evaluations to start its curve from. ``Run.run_all`` and
    a comparison's shared run both follow it."""
    return [cfg.eval.split, *(["dev"] if cfg.dataset.dev_size and cfg.eval.every_epoch else [])]


def best_dev_epoch(summaries: Mapping[str, Any], epochs: int) -> int | None:
    """The trained epoch (1..``epochs``) with the highest dev accuracy in ``eval/summary.json``'s entries,
    the earliest on a tie: what a user who tunes the epoch count on dev would ship. None without any."""
    from .layout import eval_key_epoch

    accs = {e: v["accuracy"] for k, v in summaries.items()
            if (e := eval_key_epoch(k, "dev")) is not None and 1 <= e <= epochs}
    return max(sorted(accs), key=lambda e: accs[e]) if accs else None


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval for a binomial share; sound at 0% and 100% too."""
    if n == 0:
        return (0.0, 0.0)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_bootstrap_diff(before: Sequence[bool], after: Sequence[bool], iters: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Accuracy difference (after - before) on the same questions, with a 95% bootstrap interval."""
    assert len(before) == len(after), "paired comparison needs the same questions"
    n = len(before)
    if n == 0:
        return (0.0, 0.0, 0.0)
    diffs = [int(a) - int(b) for a, b in zip(after, before)]
    rng = random.Random(seed)
    stats = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(iters))
    return (sum(diffs) / n, stats[int(0.025 * iters)], stats[int(0.975 * iters) - 1])


def majority(answers: Sequence[str | None]) -> str | None:
    """The most common parsed answer (ties go to the one seen first); None if none parsed."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)


# ---- what the predictions look like ----------------------------------------------------------------

UNPARSED = "unparsed"  # a prediction the task could not read (or a failed request)
OTHER = "other"  # every answer outside the kept ones, so the counts still add up to n
TOP_ANSWERS = 10
COLLAPSE_SHARE = 0.5
COLLAPSE_RATIO = 1.5
COLLAPSE_MIN_N = 10


def answer_distribution(rows: Sequence[Mapping[str, Any]], mcq: bool,
                        top: int = TOP_ANSWERS) -> tuple[dict[str, int], dict[str, int]]:
    """``(predicted, gold)``: how many rows predicted each answer, and how many have it as gold.

    Both dicts have the same answer keys, so they read as two columns of one table. For mcq the keys
    are every letter from A to the last letter either side uses (a letter nobody predicted shows as
    0, which is the point). For other kinds there may be hundreds of values, so only the ``top``
    answers ranked by predicted count (then gold count, then text) are kept and the rest of both
    sides is summed under ``"other"``. Predictions that did not parse are counted under
    ``"unparsed"`` on the predicted side only; ``"other"`` and ``"unparsed"`` appear when non-zero.
    """
    pred = Counter(str(r["prediction"]) for r in rows if r["prediction"] is not None)
    gold = Counter(str(r["gold"]) for r in rows)
    if mcq:
        used = [k for k in (*pred, *gold) if len(k) == 1 and k in LETTERS]
        keys = list(LETTERS[: LETTERS.index(max(used)) + 1]) if used else []
        keys += sorted(k for k in {*pred, *gold} if k not in keys)  # not a letter: kept, never dropped
    else:
        keys = sorted({*pred, *gold}, key=lambda k: (-pred[k], -gold[k], k))[:top]
    predicted = {k: pred[k] for k in keys}
    golds = {k: gold[k] for k in keys}
    rest_pred, rest_gold = sum(pred.values()) - sum(predicted.values()), sum(gold.values()) - sum(golds.values())
    if rest_pred or rest_gold:
        predicted[OTHER], golds[OTHER] = rest_pred, rest_gold
    unparsed = sum(r["prediction"] is None for r in rows)
    if unparsed:
        predicted[UNPARSED] = unparsed
    return predicted, golds


def answer_collapse(rows: Sequence[Mapping[str, Any]]) -> tuple[str | None, str | None]:
    """``(answer, warning)`` when one answer takes most predictions, else ``(None, None)``.

    The rule: at least ``COLLAPSE_MIN_N`` (10) questions, the most predicted answer is given for at
    least ``COLLAPSE_SHARE`` (half) of ALL questions (unparsed ones count in the denominator), and
    that share is at least ``COLLAPSE_RATIO`` (1.5) times the answer's share in the gold. Why these:
    a majority for one answer is already implausible on a 4-option task (gold about 25% each), while
    the ratio keeps a skewed gold from raising it: a yes/no set with 60% "yes" gold answered 70% "yes"
    is a fair reading, answered 95% "yes" it is not. Below 10 questions a share is mostly noise.
    """
    n = len(rows)
    pred = Counter(str(r["prediction"]) for r in rows if r["prediction"] is not None)
    if n < COLLAPSE_MIN_N or not pred:
        return None, None
    answer, count = max(pred.items(), key=lambda kv: (kv[1], kv[0]))
    share = count / n
    gold_share = sum(str(r["gold"]) == answer for r in rows) / n
    if share < COLLAPSE_SHARE or share < COLLAPSE_RATIO * gold_share:
        return None, None
    return answer, (f"one answer takes most predictions: {answer!r} for {count} of {n} questions ({share:.1%}), "
                    f"against {gold_share:.1%} of the gold answers; the accuracy may reflect that answer's share "
                    "of the gold rather than the task")


# ---- mcq: does the working compute the gold option? ---------------------------------------------------

# An option label: "(B)", "[B]", "B)", "B." or "B:" followed by a space ("11 is (D)." is not one).
_LABEL = r"(?<!\w)(?:\([A-Z]\)|\[[A-Z]\]|[A-Z][).:])(?=[ \t])"
_LABEL_RE = re.compile(_LABEL)
_LABEL_LINE_RE = re.compile(r"^[ \t]*" + _LABEL)


def strip_option_listings(text: str) -> str:
    """``text`` without the options it lists, which would otherwise read as the last value stated.

    Two forms count as a listing: a line with labels of two or more different letters ("The options
    are (A) 4, (B) 10, (C) 9, (D) 11; 11 is (D).": the span from the first label to the end of the
    last labelled item, at the next "," ";" or the line's end, goes), and two or more lines that
    start with a label ("A. 4" / "B. 10", an echo of the prompt: those lines go).
    """
    lines = text.split("\n")
    echoed = [i for i, line in enumerate(lines) if _LABEL_LINE_RE.match(line)]
    out = []
    for i, line in enumerate(lines):
        if len(echoed) >= 2 and i in echoed:
            continue
        labels = list(_LABEL_RE.finditer(line))
        if len({m.group(0).strip("()[].:") for m in labels}) >= 2:
            end = re.search(r"[,;]|$", line[labels[-1].end():])
            line = line[: labels[0].start()] + line[labels[-1].end() + (end.start() if end else 0):]
        out.append(line)
    return "\n".join(out)


def _as_number(text: str) -> Fraction | None:
    t = normalize_exact(text).replace("$", "").strip()
    return parse_number(t) if re.fullmatch(r"[-−]?[\d,]*\.?\d+(?:/\d+)?", t) else None


def computed_option(text: str, choices: Sequence[str]) -> tuple[str | None, int | None]:
    """``(value, index)``: the value the response's working arrives at, and the choice it equals.

    The working is the text before the response's last final-answer statement (any marker
    ``extract.answer_spans`` finds, such as "The answer is"; the whole text when there is none), with
    option listings removed (:func:`strip_option_listings`), since a listing states every option.
    When every choice is a number, the value is the LAST number in the working (read as the numeric
    task reads one, so "11.0" equals "11"), the choice is the one equal to it by value, and a value
    that is no option gives index None. Otherwise the value is the choice whose text (case and
    spacing aside, as whole words) ends last in the working, the longer one on a tie. Nothing found:
    ``(None, None)``. The letter the response then gives plays no part: that is what this checks.
    """
    if not text or not choices:
        return None, None
    spans = answer_spans(text)
    work = strip_option_listings(text[: spans[-1].pos] if spans else text)
    numbers = [_as_number(str(c)) for c in choices]
    if all(x is not None for x in numbers):
        value = last_number(work)
        x = parse_number(value) if value is not None else None
        index = next((i for i, c in enumerate(numbers) if x is not None and c == x), None)
        return value, index
    flat = " ".join(work.split()).casefold()
    best: tuple[int, int, int] | None = None  # (where it ends, length, index)
    for i, choice in enumerate(choices):
        c = normalize_exact(str(choice))
        if c:
            for m in re.finditer(r"(?<!\w)" + re.escape(c) + r"(?!\w)", flat):
                best = max(best or (m.end(), len(c), i), (m.end(), len(c), i))
    return (normalize_exact(str(choices[best[2]])), best[2]) if best else (None, None)


def option_text_agreement(rows: Sequence[Mapping[str, Any]],
                          records: Sequence[Record]) -> tuple[float | None, float | None]:
    """``(option_text_match, letter_text_agreement)`` over the records with choices (None: none has).

    option_text_match: the share whose working computes the gold option's text (see
    :func:`computed_option`), whatever letter they answered: beside an accuracy at chance, a high
    share says the student solves the problem and fails only at naming the option. letter_text_agreement:
    the share whose predicted letter is the option their own working computed. A failed request, or a
    response with no computed value, counts as neither.
    """
    hits = agree = total = 0
    for row, record in zip(rows, records):
        if not record.choices:
            continue
        total += 1
        _, index = computed_option(row["text"], record.choices)
        if index is None:
            continue
        letter = LETTERS[index]
        hits += letter == row["gold"]
        agree += row["prediction"] is not None and letter == str(row["prediction"])
    return (hits / total, agree / total) if total else (None, None)


def evaluate(
    records: Sequence[Record],
    task: Any,
    generator: Generator,
    max_tokens: int,
    self_consistency: int = 0,
    temperature: float = 0.7,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], EvalSummary]:
    """Greedy predictions for ``records``; returns (prediction rows, summary)."""
    requests = [Request(key=r.id, messages=tuple(task.messages(r)), n=1, temperature=0.0, max_tokens=max_tokens) for r in records]
    failed_before = generator.stats.failed_requests
    outputs = generator.generate(requests)
    sc_outputs: list[list[Any]] = [[] for _ in records]
    if self_consistency > 0:
        sc_requests = [
            Request(key=r.id, messages=tuple(task.messages(r)), n=self_consistency, temperature=temperature,
                    max_tokens=max_tokens, seed=seed + i)
            for i, r in enumerate(records)
        ]
        sc_outputs = generator.generate(sc_requests)
    rows = []
    for record, samples, sc in zip(records, outputs, sc_outputs):
        ok_samples = [s for s in samples if not s.failed]
        text = ok_samples[0].text if ok_samples else ""
        pred = extract_answer(task, text, record, ok_samples[0].finish_reason) if ok_samples else None
        row = {
            "id": record.id,
            "prediction": pred,
            "gold": task.normalize_gold(record),
            "correct": bool(task.check(pred, record)),
            "num_tokens": ok_samples[0].num_tokens if ok_samples else 0,
            "failed": not ok_samples,
            "text": text,
        }
        if self_consistency > 0:
            votes = [extract_answer(task, s.text, record, s.finish_reason) for s in sc if not s.failed]
            row["sc_prediction"] = majority(votes)
            row["sc_correct"] = bool(task.check(row["sc_prediction"], record))
        rows.append(row)
    n = len(rows)
    correct = sum(r["correct"] for r in rows)
    parse_failures = sum(r["prediction"] is None for r in rows)
    mcq = getattr(task, "kind", None) == "mcq"
    predicted_answers, gold_answers = answer_distribution(rows, mcq)
    collapsed, warning = answer_collapse(rows)
    text_match, agreement = option_text_agreement(rows, records) if mcq else (None, None)
    summary = EvalSummary(
        n=n,
        correct=correct,
        accuracy=correct / n if n else 0.0,
        ci95=wilson_interval(correct, n),
        parse_failures=parse_failures,
        parse_failure_rate=parse_failures / n if n else 0.0,
        mean_length=sum(r["num_tokens"] for r in rows) / n if n else 0.0,
        failed_requests=generator.stats.failed_requests - failed_before,
        self_consistency_k=self_consistency,
        self_consistency_accuracy=(sum(r["sc_correct"] for r in rows) / n if n and self_consistency else None),
        predicted_answers=predicted_answers,
        gold_answers=gold_answers,
        collapsed_answer=collapsed,
        warning=warning,
        option_text_match=text_match,
        letter_text_agreement=agreement,
    )
    return rows, summary
