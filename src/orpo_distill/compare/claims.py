"""The paper's three claims, read from a comparison's paired differences.

ORPO-Distill (Singh, Vaddina, Birru, arXiv 2509.25100) reports, on MedQA: (1) mixed-policy student
negatives beat off-policy ones, which beat on-policy ones; (2) student negatives beat teacher-only
negatives; (3) ORPO-Distill beats SFT on the teacher's chains of thought (black-box distillation). Each
claim here is the list of (variant, reference) differences it needs to be positive, and it is read from
their paired 95% intervals (``statistics.paired_difference``), by one rule for all three:

- **not held**: some difference's interval lies wholly below zero (the opposite is shown);
- **held**: every difference is measured and its interval lies wholly above zero;
- **incomplete**: some difference is not measured yet (and none contradicts the claim);
- **inconclusive**: otherwise (every difference measured, some interval holds zero).

Claim 1 is read only where the comparison runs all three policies. Claim 2 asks it of every
student-negative arm the comparison runs; claim 3 asks mixed-policy ORPO to beat every SFT baseline it
runs: SFT on one trace a question (the paper's baseline) and SFT on every correct trace (the baseline
matched on positives: the same traces, no odds-ratio term).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence


@dataclass(frozen=True)
class Claim:
    name: str
    differences: tuple[tuple[str, str], ...]  # (variant, reference): variant should be the better
    any_subset: bool = False  # read over the differences whose arms the comparison runs (else all or none)


CLAIMS = (
    Claim("1. mixed > off > on (student negatives' policy)", (("orpo-mixed", "orpo-off"), ("orpo-off", "orpo-on"))),
    Claim("2. student negatives > teacher negatives",
          (("orpo-mixed", "orpo-teacher-neg"), ("orpo-off", "orpo-teacher-neg"), ("orpo-on", "orpo-teacher-neg")),
          any_subset=True),
    Claim("3. ORPO > SFT on CoT", (("orpo-mixed", "sft-single"), ("orpo-mixed", "sft-diverse")), any_subset=True),
)


def reading(intervals: Sequence[Sequence[float] | None]) -> str:
    """One claim's reading from its differences' 95% intervals (None: not measured), by the rule above."""
    measured = [ci for ci in intervals if ci is not None]
    if any(hi < 0 for _, hi in measured):
        return "not held"
    if len(measured) < len(intervals):
        return "incomplete"
    if all(lo > 0 for lo, _ in measured):
        return "held"
    return "inconclusive"


def read_claims(paired: Sequence[Mapping[str, Any]], variants: Sequence[str]) -> list[dict[str, Any]]:
    """Each claim whose arms the comparison plans (``variants``): its differences (None where not measured
    yet) and its reading. Claim 2 keeps only the student-negative arms the comparison has."""
    found = {(p["variant"], p["reference"]): p for p in paired}
    out = []
    for claim in CLAIMS:
        needed = [d for d in claim.differences if d[0] in variants and d[1] in variants]
        if not needed or (not claim.any_subset and len(needed) < len(claim.differences)):
            continue  # the comparison does not run this claim's arms
        diffs = [{"variant": a, "reference": b, **({k: found[(a, b)][k] for k in ("diff", "ci95", "seeds",
                  "questions")} if (a, b) in found else {"diff": None, "ci95": None})} for a, b in needed]
        out.append({"claim": claim.name, "differences": diffs, "reading": reading([d["ci95"] for d in diffs])})
    return out
