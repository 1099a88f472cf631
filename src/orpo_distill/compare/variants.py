"""The paper's variants as config overrides, and the configuration of each run of a comparison.

A variant name is a head (a key of :data:`VARIANTS`, or ``orpo-mixed@PHI``) optionally followed by
modifiers (``+lambda=X``, ``+lr=X``). Seed ``S`` sets the run's ``seed`` (data order, pairing, refresh
choice, the start of training) and shifts ``student.sampling.seed`` by the same amount, so each seed
has its own initial student samples; the dataset split and the teacher traces are the same for every
seed. See docs/architecture.md.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..config import RunConfig, build_config, resolved_dict, set_dotted
from ..errors import UserError
from ..layout import CompareLayout

# The paper's variants as config overrides (dotted keys). ``orpo-mixed`` keeps the config's phi (a
# number between 0 and 1, a list or a ramp); ``orpo-mixed@X`` sets a constant phi = X.
VARIANTS: dict[str, dict[str, Any]] = {
    "sft-single": {"train.method": "sft", "train.traces": "single"},
    "sft-diverse": {"train.method": "sft", "train.traces": "all"},
    "orpo-teacher-neg": {"train.method": "orpo", "pairs.negatives": "teacher"},
    "orpo-off": {"train.method": "orpo", "pairs.negatives": "student", "train.phi": 0.0},
    "orpo-on": {"train.method": "orpo", "pairs.negatives": "student", "train.phi": 1.0},
    "orpo-mixed": {"train.method": "orpo", "pairs.negatives": "student"},
}
DEFAULT_VARIANTS = list(VARIANTS)
BASELINE = "sft-single"

# ``--quick``: the same comparison, smaller. Sized for all six variants with one seed in about 20
# minutes on a 2-core CPU with SmolLM2-135M (see configs/compare-synthetic.yaml).
QUICK_SIZES = {"dataset.train_size": 64, "dataset.eval_size": 100, "train.epochs": 2}
QUICK_SEEDS = 1


# ``VARIANT+lambda=X`` and ``VARIANT+lr=X`` change one training knob of any variant: the ablations
# (``orpo-mixed+lambda=0`` pairs as orpo-mixed does with the odds-ratio term off) and an equal
# learning-rate sweep for every arm. ``+rows=N`` caps a question's pairs in one packed row
# (``train.pairs_per_row``): ``orpo-mixed+lambda=0+rows=1`` batches ORPO's rows as SFT batches its examples.
# Issue 33's designs: ``+sft=N`` trains N epochs of SFT first (``train.sft_epochs``), ``+span=first_error``
# localises the rejected side (``pairs.rejected_span``), ``+maxsim=X`` leaves out negatives closer than X to
# a positive (``pairs.max_similarity``), ``+protect=X`` protects the chosen side (``train.protect_chosen``).
MODIFIERS = {"lambda": "train.lambda", "lr": "train.lr", "rows": "train.pairs_per_row", "sft": "train.sft_epochs",
             "span": "pairs.rejected_span", "maxsim": "pairs.max_similarity", "protect": "train.protect_chosen"}
DESIGNS = ("sft", "span", "maxsim", "protect")  # each paired against the same variant without it
SPANS = ("whole", "first_error")


def variant_overrides(name: str) -> dict[str, Any]:
    """The config overrides of a variant name: ``orpo-mixed@0.25``, ``orpo-mixed+lambda=0``,
    ``sft-diverse+lr=5e-5`` and their combinations included."""
    head, *mods = name.split("+")
    out = _base_overrides(head, name)
    for mod in mods:
        key, sep, value = mod.partition("=")
        if key not in MODIFIERS or not sep:
            raise UserError(f"variant {name!r}: after '+' comes {' or '.join(k + '=X' for k in MODIFIERS)}, "
                            f"got {mod!r}")
        if key == "span":
            if value not in SPANS:
                raise UserError(f"variant {name!r}: span must be {' or '.join(SPANS)}, got {value!r}")
            out[MODIFIERS[key]] = value
            continue
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if key in ("rows", "sft"):
            least = 1 if key == "rows" else 0
            if not (math.isfinite(number) and number >= least and number == int(number)):
                raise UserError(f"variant {name!r}: {key} must be a whole number of at least {least}, got {value!r}")
            number = int(number)
        elif key == "maxsim" and not 0 < number <= 1:
            raise UserError(f"variant {name!r}: maxsim must be a number above 0 and at most 1, got {value!r}")
        elif not math.isfinite(number) or number < 0 or (key == "lr" and number == 0):
            raise UserError(f"variant {name!r}: {key} must be a {'positive' if key == 'lr' else 'non-negative'} "
                            f"number, got {value!r}")
        out[MODIFIERS[key]] = number
    return out


def _base_overrides(head: str, name: str) -> dict[str, Any]:
    if head in VARIANTS:
        return dict(VARIANTS[head])
    base, sep, value = head.partition("@")
    if base == "orpo-mixed" and sep:
        try:
            phi = float(value)
        except ValueError:
            phi = math.nan
        if not 0.0 <= phi <= 1.0:
            raise UserError(f"variant {name!r}: phi after '@' must be a number between 0 and 1")
        return {**VARIANTS["orpo-mixed"], "train.phi": phi}
    raise UserError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}, or orpo-mixed@PHI (e.g. orpo-mixed@0.25), "
                    f"each optionally followed by +lambda=X, +lr=X, +rows=N, +sft=N, +span=first_error, +maxsim=X or +protect=X")


def parse_variants(specs: Iterable[str] | None) -> list[str]:
    """``["sft-single,orpo-off", "orpo-mixed@0.25"]`` -> the names in order, checked, without repeats."""
    names: list[str] = []
    for spec in specs or []:
        for name in (s.strip() for s in spec.split(",")):
            if name and name not in names:
                variant_overrides(name)  # fails on a bad name before anything runs
                names.append(name)
    return names or list(DEFAULT_VARIANTS)


def comparison_pairs(variants: Sequence[str]) -> list[tuple[str, str]]:
    """The questions the paper asks, as (variant, reference) pairs: every variant against SFT on one
    trace (black-box CoT distillation); student negatives against teacher negatives; mixed policy
    against off- and on-policy, and off- against on-policy; and every variant against the base model."""
    pairs: list[tuple[str, str]] = []
    student_neg = [v for v in variants if v in ("orpo-off", "orpo-on") or v.startswith("orpo-mixed")]
    for v in variants:
        if v != BASELINE and BASELINE in variants:
            pairs.append((v, BASELINE))
    if "orpo-teacher-neg" in variants:
        pairs += [(v, "orpo-teacher-neg") for v in student_neg]
    if "sft-diverse" in variants:  # the matched baseline: the same positives, no odds-ratio term
        pairs += [(v, "sft-diverse") for v in variants if v.startswith("orpo")]
    for v in (v for v in variants if v.startswith("orpo-mixed") and "+" not in v):
        pairs += [(v, ref) for ref in ("orpo-off", "orpo-on") if ref in variants]
    if "orpo-off" in variants and "orpo-on" in variants:  # the paper's mixed > off > on: its second step
        pairs.append(("orpo-off", "orpo-on"))
    for v in (v for v in variants if v.startswith("orpo-mixed@")):  # another phi against the configured one
        if "orpo-mixed" in variants:
            pairs.append((v, "orpo-mixed"))
    for v in (v for v in variants if "+lambda=" in v and "+rows=" not in v):  # the odds-ratio term's own effect, same rows
        head = v.split("+")[0]
        if head in variants:
            pairs.append((head, v))
    for v in (v for v in variants if "+rows=" in v):  # ORPO's batching against one pair a row, same rows
        grouped = "+".join(m for m in v.split("+") if not m.startswith("rows="))
        if grouped in variants and (grouped, v) not in pairs:
            pairs.append((grouped, v))
    for v in variants:  # each of issue 33's designs against the same variant without it
        mods = v.split("+")
        for m in mods[1:]:
            if m.split("=")[0] in DESIGNS:
                without = "+".join(x for x in mods if x != m)
                if without in variants and (v, without) not in pairs:
                    pairs.append((v, without))
    pairs += [(v, "base") for v in variants]
    return pairs


# ---- the configuration of each run -------------------------------------------------------------------


def _derive(base: RunConfig, run_dir: Path, seed: int, overrides: dict[str, Any], source: str) -> RunConfig:
    data = resolved_dict(base)
    offset = seed - base.seed
    data["run_dir"] = str(run_dir)
    data["seed"] = seed
    data["student"]["sampling"]["seed"] = base.student.sampling.seed + offset
    for key, value in overrides.items():
        set_dotted(data, key, value)
    return build_config(data, source)


def shared_dir(compare_dir: Path, seed: int) -> Path:
    """The folder of the shared run of ``seed`` (:meth:`CompareLayout.shared`)."""
    return CompareLayout(compare_dir).shared(seed).root


def run_dir(compare_dir: Path, variant: str, seed: int) -> Path:
    """The run folder of ``variant`` and ``seed`` (:meth:`CompareLayout.run`)."""
    return CompareLayout(compare_dir).run(variant, seed).root


def shared_config(base: RunConfig, compare_dir: Path, seed: int) -> RunConfig:
    """The configuration of the shared run of a seed: the base, with student negatives on so that its
    ``student`` stage is the one the ORPO variants would run."""
    return _derive(base, shared_dir(compare_dir, seed), seed,
                   {"train.method": "orpo", "pairs.negatives": "student"}, f"shared run of seed {seed}")


def variant_config(base: RunConfig, compare_dir: Path, variant: str, seed: int) -> RunConfig:
    if variant.split("+")[0] == "orpo-mixed" and base.train.policy != "mixed":
        raise UserError(f"variant {variant} keeps the config's train.phi, which is {base.train.phi} ({base.train.policy}-"
                        "policy); set train.phi between 0 and 1 in the config, or name orpo-mixed@PHI")
    return _derive(base, run_dir(compare_dir, variant, seed), seed, variant_overrides(variant),
                   f"variant {variant}, seed {seed}")


def quick_config(base: RunConfig) -> RunConfig:
    """The ``--quick`` size: training and held-out questions and epochs capped at QUICK_SIZES."""
    data = resolved_dict(base)
    for key, cap in QUICK_SIZES.items():
        section, field = key.split(".")
        current = data[section][field]
        data[section][field] = cap if current is None else min(current, cap)
    data["run_dir"] = str(base.run_dir).rstrip("/") + "-quick"
    return build_config(data, "--quick")
