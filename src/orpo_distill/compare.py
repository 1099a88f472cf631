"""``orpo-distill compare``: the paper's variants and seeds, each its own run, in one table.

Layout of a comparison folder (the config's ``run_dir`` unless ``--out`` names another)::

    COMPARE_DIR/
      plan.json                 the base configuration, the variants and the seeds asked for so far
      shared/seed_S/            a run directory holding what every variant of seed S shares:
                                teacher/traces.jsonl (generated once, for the first seed, and copied
                                to the others), student/epoch_1.jsonl (the initial student, per seed)
                                and eval/eval_epoch_0.jsonl (the base model, evaluated once)
      VARIANT/seed_S/           one ordinary run directory per variant and seed
      comparison.json, comparison.md, report.md, report.html, plots/

Why share: the variants differ only in how they train, so giving them the same teacher traces, the
same initial student negatives and the same base evaluation both saves the generation time and makes
their comparison paired (the same data, only the method changes). The shared files are copied into
each run directory before its stages start; the trace stores then find them complete and generate
nothing. The stores check the settings hash (generator, sampling settings, task), and the variants
only touch training fields, so a copied file is accepted exactly when it is what the run would have
generated itself.

Seeds: seed ``S`` sets the run's ``seed`` (data order, pairing, refresh choice, the start of
training) and shifts ``student.sampling.seed`` by the same amount, so each seed has its own initial
student samples. The dataset split and the teacher traces are the same for every seed: the interval
then measures the noise of training and student sampling, paired over the same held-out questions.

Every run is resumable like ``orpo-distill run``: rerunning ``compare`` skips finished runs (a run is
finished when its final evaluation is on disk) and continues a killed one from its last checkpoint.
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .config import RunConfig, build_config, resolved_dict
from .errors import UserError
from .metrics import read_metrics
from .store import atomic_write_json, atomic_write_text, read_jsonl

# ---- variants ------------------------------------------------------------------------------------

# The paper's variants as config overrides (dotted keys). ``orpo-mixed`` keeps the config's phi (and
# its schedule); ``orpo-mixed@X`` sets a constant phi = X.
VARIANTS: dict[str, dict[str, Any]] = {
    "sft-single": {"train.method": "sft", "train.traces": "single"},
    "sft-diverse": {"train.method": "sft", "train.traces": "all"},
    "orpo-teacher-neg": {"train.method": "orpo", "pairs.negatives": "teacher"},
    "orpo-off": {"train.method": "orpo", "pairs.negatives": "student", "train.policy": "off"},
    "orpo-on": {"train.method": "orpo", "pairs.negatives": "student", "train.policy": "on"},
    "orpo-mixed": {"train.method": "orpo", "pairs.negatives": "student", "train.policy": "mixed"},
}
DEFAULT_VARIANTS = list(VARIANTS)
BASELINE = "sft-single"

# ``--quick``: the same comparison, smaller. Sized for all six variants with one seed in about 20
# minutes on a 2-core CPU with SmolLM2-135M (see configs/compare-synthetic.yaml).
QUICK_SIZES = {"dataset.train_size": 64, "dataset.eval_size": 100, "train.epochs": 2}
QUICK_SEEDS = 1


# ``VARIANT+lambda=X`` and ``VARIANT+lr=X`` change one training knob of any variant: the ablations
# (``orpo-mixed+lambda=0`` trains on the same rows with the odds-ratio term off) and an equal
# learning-rate sweep for every arm.
MODIFIERS = {"lambda": "train.lambda", "lr": "train.lr"}


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
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not math.isfinite(number) or number < 0 or (key == "lr" and number == 0):
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
        return {**VARIANTS["orpo-mixed"], "train.phi": phi, "train.phi_schedule": "constant"}
    raise UserError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}, or orpo-mixed@PHI (e.g. orpo-mixed@0.25), "
                    f"each optionally followed by +lambda=X or +lr=X")


def parse_variants(specs: Iterable[str] | None) -> list[str]:
    """``["sft-single,orpo-off", "orpo-mixed@0.25"]`` -> the names in order, checked, without repeats."""
    names: list[str] = []
    for spec in specs or []:
        for name in (s.strip() for s in spec.split(",")):
            if name and name not in names:
                variant_overrides(name)  # fails on a bad name before anything runs
                names.append(name)
    return names or list(DEFAULT_VARIANTS)


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value


def _derive(base: RunConfig, run_dir: Path, seed: int, overrides: dict[str, Any], source: str) -> RunConfig:
    data = resolved_dict(base)
    offset = seed - base.seed
    data["run_dir"] = str(run_dir)
    data["seed"] = seed
    data["student"]["sampling"]["seed"] = base.student.sampling.seed + offset
    for key, value in overrides.items():
        _set(data, key, value)
    return build_config(data, source)


def shared_dir(compare_dir: Path, seed: int) -> Path:
    return Path(compare_dir) / "shared" / f"seed_{seed}"


def run_dir(compare_dir: Path, variant: str, seed: int) -> Path:
    return Path(compare_dir) / variant / f"seed_{seed}"


def shared_config(base: RunConfig, compare_dir: Path, seed: int) -> RunConfig:
    """The configuration of the shared run of a seed: the base, with student negatives on so that its
    ``student`` stage is the one the ORPO variants would run."""
    return _derive(base, shared_dir(compare_dir, seed), seed,
                   {"train.method": "orpo", "pairs.negatives": "student"}, f"shared run of seed {seed}")


def variant_config(base: RunConfig, compare_dir: Path, variant: str, seed: int) -> RunConfig:
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


# ---- the plan --------------------------------------------------------------------------------------


@dataclass
class Plan:
    """What a comparison folder holds: one base configuration and the variants and seeds run on it."""

    dir: Path
    base: RunConfig
    variants: list[str]
    seeds: list[int]

    def to_dict(self) -> dict[str, Any]:
        return {"base_config": _comparable(self.base), "variants": self.variants, "seeds": self.seeds}


def _comparable(cfg: RunConfig) -> dict[str, Any]:
    data = resolved_dict(cfg)
    data.pop("run_dir")
    return data


def _upgraded(old_base: dict[str, Any]) -> dict[str, Any]:
    """A plan's base config as this version reads it: fields added since it was written take their
    defaults (they did not exist, so they cannot have differed). A field this version no longer knows is
    left in, and then shows as the difference."""
    try:
        return _comparable(build_config({**old_base, "run_dir": "."}, "plan.json"))
    except UserError:
        return old_base


def _first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
            if d:
                return d
        return None
    return None if a == b else f"{prefix.rstrip('.')} ({a!r} there, {b!r} now)"


def open_plan(compare_dir: Path, base: RunConfig, variants: Sequence[str], seeds: Sequence[int]) -> Plan:
    """Create ``plan.json``, or extend the one there with new variants and seeds.

    The base configuration must be the one the folder was started with: a run finished under other
    settings would otherwise be counted as if it belonged to this comparison.
    """
    compare_dir = Path(compare_dir)
    path = compare_dir / "plan.json"
    variants, seeds = list(variants), list(seeds)
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        diff = _first_difference(_upgraded(old["base_config"]), _comparable(base))
        if diff:
            raise UserError(f"{compare_dir} holds a comparison of another configuration (first difference: {diff}); "
                            "use --out NEW_DIR for this one, or delete the old folder")
        variants = [*old["variants"], *(v for v in variants if v not in old["variants"])]
        seeds = [*old["seeds"], *(s for s in seeds if s not in old["seeds"])]
    plan = Plan(compare_dir, base, variants, seeds)
    atomic_write_json(path, plan.to_dict())
    return plan


def load_plan(compare_dir: Path) -> Plan:
    path = Path(compare_dir) / "plan.json"
    if not path.is_file():
        raise UserError(f"{compare_dir} is not a comparison folder (no plan.json); run `orpo-distill compare` first")
    d = json.loads(path.read_text(encoding="utf-8"))
    base = build_config({**d["base_config"], "run_dir": str(compare_dir)}, str(path))
    return Plan(Path(compare_dir), base, list(d["variants"]), [int(s) for s in d["seeds"]])


# ---- running ---------------------------------------------------------------------------------------


def final_eval_key(cfg: RunConfig) -> str:
    return f"{cfg.eval.split}_epoch_{cfg.train.epochs}"


def eval_summaries(directory: Path) -> dict[str, Any]:
    path = Path(directory) / "eval" / "summary.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def is_finished(directory: Path, cfg: RunConfig) -> bool:
    """A run is finished when its final evaluation (predictions and summary entry) is on disk and its
    model is exported. (With ``eval.every_epoch`` the last evaluation runs before the export; a run
    killed between the two is not finished: its rerun exports the model from the last checkpoint.)"""
    key = final_eval_key(cfg)
    d = Path(directory)
    return ((d / "eval" / f"{key}.jsonl").is_file() and key in eval_summaries(d)
            and (d / "model" / "config.json").is_file())


def copy_atomic(src: Path, dst: Path) -> None:
    """Copy through a temp file and a rename: a kill mid-copy leaves no half file for a store to trust."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def seed_from_shared(shared: Path, target: Path, files: Sequence[str], eval_key: str | None) -> None:
    """Put the shared files into a run directory (where it has none yet) and the base evaluation's
    summary entry into its ``eval/summary.json``."""
    for rel in files:
        src, dst = shared / rel, target / rel
        if src.is_file() and not dst.exists():
            copy_atomic(src, dst)
    if eval_key is not None:
        entry = eval_summaries(shared).get(eval_key)
        mine = eval_summaries(target)
        if entry is not None and eval_key not in mine:
            atomic_write_json(target / "eval" / "summary.json", {**mine, eval_key: entry})


def _check_same_settings(shared_run: Any, run: Any, variant: str) -> None:
    """The variants must not change what the shared traces were generated with."""
    from .recipe import uses_student_negatives

    pairs = [("teacher/traces.jsonl", shared_run.teacher_store(), run.teacher_store())]
    if uses_student_negatives(run.cfg):
        pairs.append(("student/epoch_1.jsonl", shared_run.student_store(1), run.student_store(1)))
    for rel, a, b in pairs:
        if a.settings != b.settings:
            raise UserError(f"variant {variant} would sample {rel} with other settings than the shared run "
                            f"({b.settings} vs {a.settings}); variants may only change training fields")


def prepare_shared(plan: Plan, seed: int, variants: Sequence[str], progress: bool, overwrite: bool) -> Any:
    """The shared run of ``seed``: teacher traces (copied from the first seed's), the initial
    student's samples (when one of ``variants`` uses them), and the base model's evaluation (copied
    from the first seed's when greedy)."""
    from .pipeline import Run
    from .recipe import uses_student_negatives

    cfg = shared_config(plan.base, plan.dir, seed)
    first = shared_dir(plan.dir, plan.seeds[0])
    here = shared_dir(plan.dir, seed)
    eval_key = f"{cfg.eval.split}_epoch_0"
    if here != first:
        if not (first / "teacher" / "traces.jsonl").is_file():  # the teacher traces come from the first seed
            prepare_shared(plan, plan.seeds[0], [], progress, overwrite)
        files = ["teacher/traces.jsonl"]
        greedy_only = cfg.eval.self_consistency == 0  # greedy decoding of the base does not depend on the seed
        if greedy_only:
            files.append(f"eval/{eval_key}.jsonl")
        seed_from_shared(first, here, files, eval_key if greedy_only else None)
    run = Run(cfg, overwrite=overwrite, progress=progress)
    _require_complete(run.teacher(), cfg.teacher.sampling.samples, "teacher traces", here)
    if any(uses_student_negatives(variant_config(plan.base, plan.dir, v, seed)) for v in variants):
        _require_complete(run.student(epoch=1), cfg.student.sampling.samples, "initial student samples", here)
    run.evaluate(0)
    return run


def _require_complete(summary: Any, k: int, what: str, where: Path) -> None:
    """Shared samples must be complete: a variant that found a gap would fill it with its own draw, and
    the variants would no longer train on the same data."""
    if summary.samples < summary.questions * k:
        raise UserError(f"{where}: {summary.questions * k - summary.samples} {what} are missing "
                        f"({summary.failed_requests} failed requests); rerun the same command to retry them")


def run_variant(plan: Plan, variant: str, seed: int, shared_run: Any, progress: bool, overwrite: bool,
                keep_checkpoints: bool) -> bool:
    """One variant and seed, resumed where it stopped. Returns False when it was already finished."""
    from .pipeline import Run
    from .recipe import uses_student_negatives

    cfg = variant_config(plan.base, plan.dir, variant, seed)
    target = Path(cfg.run_dir)
    if is_finished(target, cfg):
        if not keep_checkpoints:  # a kill may have come in the middle of the removal
            shutil.rmtree(target / "checkpoints", ignore_errors=True)
        return False
    eval_key = f"{cfg.eval.split}_epoch_0"
    files = ["teacher/traces.jsonl", f"eval/{eval_key}.jsonl"]
    if uses_student_negatives(cfg):
        files.append("student/epoch_1.jsonl")
    seed_from_shared(shared_run.dir, target, files, eval_key)
    run = Run(cfg, overwrite=overwrite, progress=progress)
    _check_same_settings(shared_run, run, variant)
    run.run_all()
    del run
    gc.collect()
    # 1.6 GB per epoch for a 135M model (weights and Adam state): the exported model/ is what stays
    if not keep_checkpoints and is_finished(target, cfg):
        shutil.rmtree(target / "checkpoints", ignore_errors=True)
    return True


def run_comparison(base: RunConfig, variants: Sequence[str], seeds: Sequence[int], compare_dir: Path | None = None,
                   progress: bool = True, overwrite: bool = False, keep_checkpoints: bool = False,
                   log: Any = print) -> dict[str, Any]:
    """Run every requested variant and seed not yet finished, then write comparison.json/.md and the
    report, which cover everything the folder's plan holds (earlier invocations included)."""
    compare_dir = Path(compare_dir or base.run_dir)
    variants, seeds = parse_variants(variants), list(seeds)
    plan = open_plan(compare_dir, base, variants, seeds)
    total, i = len(variants) * len(seeds), 0
    for seed in seeds:
        shared_run = prepare_shared(plan, seed, variants, progress, overwrite)
        for variant in variants:
            i += 1
            log(f"[compare] ({i}/{total}) {variant}, seed {seed}")
            if not run_variant(plan, variant, seed, shared_run, progress, overwrite, keep_checkpoints):
                log(f"[compare] ({i}/{total}) {variant}, seed {seed}: finished earlier, skipped")
        del shared_run
        gc.collect()
    result = aggregate(plan)
    write_comparison(plan.dir, result)
    from .report import write_report

    write_report(plan.dir)
    return result


# ---- statistics -------------------------------------------------------------------------------------


def bootstrap_mean(matrix: np.ndarray, iters: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a seeds x questions matrix with a 95% interval from a two-level bootstrap.

    Each draw resamples the seeds and, independently, the questions (both with replacement), so the
    interval carries both the training noise (seeds) and the test-set noise (questions). With one seed
    it is the plain bootstrap over questions.
    """
    m = np.asarray(matrix, dtype=float)
    if m.ndim != 2 or m.size == 0:
        return (math.nan, math.nan, math.nan)
    s, q = m.shape
    rng = np.random.default_rng(seed)
    stats = np.empty(iters)
    chunk = max(1, 2_000_000 // (s * q))  # bound the memory of the fancy index
    for start in range(0, iters, chunk):
        n = min(chunk, iters - start)
        si = rng.integers(0, s, size=(n, s))
        qi = rng.integers(0, q, size=(n, q))
        stats[start:start + n] = m[si[:, :, None], qi[:, None, :]].mean(axis=(1, 2))
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return (float(m.mean()), float(lo), float(hi))


def _matrix(per_seed: dict[int, dict[str, bool]], seeds: Sequence[int], qids: Sequence[str]) -> np.ndarray:
    return np.array([[float(per_seed[s][q]) for q in qids] for s in seeds])


def paired_difference(a: dict[int, dict[str, bool]], b: dict[int, dict[str, bool]]) -> dict[str, Any] | None:
    """Accuracy of ``a`` minus ``b`` over the seeds and questions both have, with a bootstrap interval
    over the same (paired) seeds and questions."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    qids = sorted(set.intersection(*(set(a[s]) & set(b[s]) for s in seeds)))
    if not qids:
        return None
    diff = _matrix(a, seeds, qids) - _matrix(b, seeds, qids)
    mean, lo, hi = bootstrap_mean(diff)
    return {"diff": mean, "ci95": [lo, hi], "seeds": len(seeds), "questions": len(qids)}


# ---- aggregation -------------------------------------------------------------------------------------


def _eval_rows(directory: Path, key: str) -> list[dict[str, Any]] | None:
    path = Path(directory) / "eval" / f"{key}.jsonl"
    return list(read_jsonl(path)) if path.is_file() else None


def _last_per(rows: Iterable[dict[str, Any]], key: str) -> dict[Any, dict[str, Any]]:
    """The last row per ``key`` value: a resumed run logs again what the killed one had logged."""
    out: dict[Any, dict[str, Any]] = {}
    for r in rows:
        out[r[key]] = r
    return out


def run_timing(directory: Path) -> dict[str, float]:
    """Seconds of training (``epoch`` events) and of the refresh sampling (``sampling`` events)."""
    events = read_metrics(Path(directory) / "metrics.jsonl")
    epochs = _last_per((e for e in events if e.get("event") == "epoch"), "epoch")
    train = sum(float(e.get("seconds", 0.0)) for e in epochs.values())
    sampling = sum(float(e.get("seconds", 0.0)) for e in events if e.get("event") == "sampling")
    return {"train_seconds": train, "sampling_seconds": sampling}


def training_data(directory: Path) -> dict[str, float]:
    """What a run trained on, per epoch (mean over its epochs), from its ``pairs`` events: rows,
    distinct positives on the chosen (or SFT target) side and their tokens, questions covered, and the
    questions left out for want of a negative or paired through the teacher fallback."""
    events = _last_per((e for e in read_metrics(Path(directory) / "metrics.jsonl") if e.get("event") == "pairs"),
                       "epoch")
    keys = ("rows", "questions", "positives", "positive_tokens", "dropped_no_negative", "teacher_fallback")
    if not events:
        return {}
    return {k: float(np.mean([float(e.get(k, 0) or 0) for e in events.values()])) for k in keys}


def _summarise(per_seed_rows: dict[int, list[dict[str, Any]]]) -> dict[str, Any]:
    seeds = sorted(per_seed_rows)
    correct = {s: {str(r["id"]): bool(r["correct"]) for r in per_seed_rows[s]} for s in seeds}
    qids = sorted(set.intersection(*(set(c) for c in correct.values())))
    accs = [sum(correct[s][q] for q in qids) / len(qids) for s in seeds] if qids else []
    mean, lo, hi = bootstrap_mean(_matrix(correct, seeds, qids)) if qids else (math.nan,) * 3
    all_rows = [r for s in seeds for r in per_seed_rows[s]]
    return {
        "seeds": seeds,
        "questions": len(qids),
        "accuracy_per_seed": accs,
        "accuracy": mean,
        "std": float(np.std(accs, ddof=1)) if len(accs) > 1 else None,
        "ci95": [lo, hi],
        "parse_failure_rate": sum(r["prediction"] is None for r in all_rows) / len(all_rows) if all_rows else math.nan,
        "mean_length": sum(r["num_tokens"] for r in all_rows) / len(all_rows) if all_rows else math.nan,
    }, correct


def aggregate(plan: Plan) -> dict[str, Any]:
    """The comparison table from what is on disk: every finished run of the plan; missing ones listed."""
    split, epochs = plan.base.eval.split, plan.base.train.epochs
    final_key = f"{split}_epoch_{epochs}"
    base_rows: dict[int, list[dict[str, Any]]] = {}
    for s in plan.seeds:
        rows = _eval_rows(shared_dir(plan.dir, s), f"{split}_epoch_0")
        if rows is not None:
            base_rows[s] = rows
    result: dict[str, Any] = {
        "dir": str(plan.dir),
        "split": split,
        "epochs": epochs,
        "seeds": plan.seeds,
        "variants": {},
        "missing": [],
        "runs": {},
        "shared": {str(s): str(shared_dir(plan.dir, s).relative_to(plan.dir)) for s in plan.seeds},
        "config": {
            "student": plan.base.student.model,
            "teacher": plan.base.teacher.kind + (f":{plan.base.teacher.model or plan.base.teacher.path}"
                                                 if plan.base.teacher.model or plan.base.teacher.path else ""),
            "dataset": plan.base.dataset.kind,
            "train_size": plan.base.dataset.train_size,
            "eval_size": plan.base.dataset.eval_size,
            "phi": plan.base.train.phi,
        },
    }
    correct_by_variant: dict[str, dict[int, dict[str, bool]]] = {}
    if base_rows:
        summary, correct = _summarise(base_rows)
        result["base"] = summary
        correct_by_variant["base"] = correct
    for variant in plan.variants:
        finished: dict[int, list[dict[str, Any]]] = {}
        timings, per_epoch_rows = [], {}
        result["runs"][variant] = {}
        for s in plan.seeds:
            d = run_dir(plan.dir, variant, s)
            rows = _eval_rows(d, final_key) if is_finished(d, variant_config(plan.base, plan.dir, variant, s)) else None
            if rows is None:
                result["missing"].append(f"{variant}/seed_{s}")
                continue
            result["runs"][variant][str(s)] = str(d.relative_to(plan.dir))
            finished[s] = rows
            timings.append(run_timing(d))
            for key in eval_summaries(d):
                if key.startswith(f"{split}_epoch_"):
                    e = int(key.rsplit("_", 1)[1])
                    ev = _eval_rows(d, key)
                    if ev is not None:
                        per_epoch_rows.setdefault(e, {})[s] = ev
        if not finished:
            continue
        summary, correct = _summarise(finished)
        data = [training_data(run_dir(plan.dir, variant, s)) for s in finished]
        data = [x for x in data if x]
        if data:  # per epoch, mean over the seeds: shows that arms are matched on their positives
            summary["trained_on"] = {k: float(np.mean([x[k] for x in data])) for k in data[0]}
        summary["train_minutes"] = float(np.mean([t["train_seconds"] for t in timings])) / 60
        summary["refresh_sampling_minutes"] = float(np.mean([t["sampling_seconds"] for t in timings])) / 60
        summary["overrides"] = variant_overrides(variant)
        summary["per_epoch"] = {}
        for e in sorted(per_epoch_rows):
            es, _ = _summarise(per_epoch_rows[e])
            summary["per_epoch"][str(e)] = {"accuracy": es["accuracy"], "ci95": es["ci95"], "seeds": es["seeds"]}
        result["variants"][variant] = summary
        correct_by_variant[variant] = correct
    result["paired"] = _paired_rows(plan.variants, correct_by_variant)
    return result


def comparison_pairs(variants: Sequence[str]) -> list[tuple[str, str]]:
    """The questions the paper asks, as (variant, reference) pairs: every variant against SFT on one
    trace (black-box CoT distillation); student negatives against teacher negatives; mixed policy
    against off- and on-policy; and every variant against the base model."""
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
    for v in (v for v in variants if "+lambda=" in v):  # the odds-ratio term's own effect, same rows
        head = v.split("+")[0]
        if head in variants:
            pairs.append((head, v))
    pairs += [(v, "base") for v in variants]
    return pairs


def _paired_rows(variants: Sequence[str], correct: dict[str, dict[int, dict[str, bool]]]) -> list[dict[str, Any]]:
    out = []
    for a, b in comparison_pairs(variants):
        if a not in correct or b not in correct:
            continue
        ref = correct[b]
        if b == "base" and len(ref) == 1:  # one base evaluation serves every seed
            ref = {s: next(iter(ref.values())) for s in correct[a]}
        d = paired_difference(correct[a], ref)
        if d is not None:
            out.append({"variant": a, "reference": b, **d})
    return out


def write_comparison(compare_dir: Path, result: dict[str, Any]) -> None:
    from .report import comparison_blocks, render_markdown

    atomic_write_json(Path(compare_dir) / "comparison.json", result)
    atomic_write_text(Path(compare_dir) / "comparison.md",
                      render_markdown([*comparison_blocks(result)], Path(compare_dir)))
